"""The vectorised box scan (long boxes) follows exactly the rules of the per-brace scan."""

import random

import pytest

from megatron_rpt.reward import next_token
from megatron_rpt.reward.next_token import extract_prediction
from tests.helpers.box_scan import per_brace_extract as _per_brace


@pytest.mark.parametrize("short_box", [0, 3, 4096])
def test_random_responses_agree_with_the_per_brace_scan(monkeypatch, short_box):
    monkeypatch.setattr(next_token, "_SHORT_BOX", short_box)
    alphabet = ["{", "}", "\\", "a", "\\boxed{", "</think>", "\n", "\ud800", "é", "\\é", "\\}"]
    rng = random.Random(short_box)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for required in (True, False):
            want = _per_brace(text, required)
            assert extract_prediction(text, require_think_close=required) == want, text


def test_long_boxes_use_the_vectorised_scan():
    inner = "x{" * 5000 + "\\}" + "}" * 5000
    text = "</think>\\boxed{a}\\boxed{" + inner + "} tail \\boxed{ é" + "{}" * 3000 + "}"
    assert extract_prediction(text) == _per_brace(text, True) == " é" + "{}" * 3000
    assert extract_prediction("</think>\\boxed{" + "{" * 10000) is None
