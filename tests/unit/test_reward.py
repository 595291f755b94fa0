r"""The RPT parser and rewards: edge cases from the paper plus property tests.

What is pinned here and why:
* leading spaces are part of the prediction (``\boxed{ 4}`` != ``\boxed{4}``);
* a character split across tokens is matched at byte level;
* predictions that stop mid-token or run past a mismatch/the continuation score 0;
* the last top-level box after the first ``</think>`` is the prediction; braces are counted
  plainly (a backslash escapes nothing, so LaTeX targets ending in ``\`` can be rewarded);
  an unclosed last box (truncation) gives no prediction;
* no input str makes either function raise, and both are linear time.
The reward is checked against an independent re-implementation of the paper's pseudo-code.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rpt.errors import ConfigError
from megatron_rpt.reward import (
    RewardTarget,
    extract_prediction,
    first_token_match,
    get_reward,
    prefix_match_reward,
    reward_names,
)


def paper_reference_reward(pred: str | None, token_bytes: list[bytes]) -> float:
    """The paper's Eq. 3 (docs/METHOD.md §4): prefix of the completion bytes ending on a boundary."""
    if pred is None:
        return 0.0
    try:
        p = pred.encode("utf-8")
    except UnicodeEncodeError:
        return 0.0
    bounds, cum = set(), 0
    for tb in token_bytes:
        cum += len(tb)
        bounds.add(cum)
    gt = b"".join(token_bytes)
    return 1.0 if (len(p) in bounds and gt.startswith(p)) else 0.0


# ----------------------------------------------------------------------------- parser cases


@pytest.mark.parametrize(
    "response, expected",
    [
        ("think</think> \\boxed{ para}", " para"),
        ("</think>\\boxed{ }", " "),  # one-space prediction is valid
        ("</think>\\boxed{}", ""),  # empty box parses to "" (and scores 0)
        ("</think>\\boxed{a} and finally \\boxed{b}", "b"),
        ("</think>\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("</think>\\boxed{{x}}", "{x}"),
        # plain brace counting (verl's / MATH's last_boxed_only_string): a backslash escapes
        # nothing, so a prediction may end in one (LaTeX targets such as " \\" before "frac")
        ("</think>\\boxed{\\{}", None),  # "\\{" opens a group: the box never closes
        ("</think>\\boxed{\\}}", "\\"),  # "\\}" closes the box; the last brace is stray
        ("</think>\\boxed{ \\}", " \\"),
        ("</think>\\boxed{a\\\\}", "a\\\\"),
        ("</think>\\boxed{\\boxed{x}}", "\\boxed{x}"),  # nested: outer (top-level) box
        ("</think>\\boxed{a} \\boxed{b", None),  # last box truncated
        ("</think>\\boxed{a", None),
        ("</think> no box here", None),
        ("\\boxed{a} but no think close", None),
        ("\\boxed{early}</think> nothing after", None),  # box before </think> is ignored
        ("</think>\\boxed{a}</think>\\boxed{b}", "b"),
        ("</think>\\boxed{a}</think> no box", "a"),  # searched after the FIRST </think>
        ("</think>line\n\\boxed{x\ny}", "x\ny"),
        ("</think>\\boxed{é}", "é"),
        ("</think>}}}{{{\\boxed{ok}", "ok"),  # stray braces outside boxes are ignored
        ("</think>\\boxed{:\n}", ":\n"),
    ],
)
def test_extract_prediction_cases(response, expected):
    assert extract_prediction(response) == expected


def test_require_think_close_flag():
    assert extract_prediction("\\boxed{x}", require_think_close=False) == "x"
    assert extract_prediction("\\boxed{x}") is None
    assert extract_prediction("a</think>\\boxed{x}", require_think_close=False) == "x"


@pytest.mark.parametrize("bad", [None, 3, b"</think>\\boxed{x}"])
def test_extract_prediction_non_str(bad):
    assert extract_prediction(bad) is None  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- reward cases

EURO = "€".encode()  # 3 bytes


@pytest.mark.parametrize(
    "prediction, tokens, expected",
    [
        (" 4", [b" 4", b"}."], 1.0),
        ("4", [b" 4"], 0.0),  # leading space missing
        (" 4 ", [b" 4", b"}"], 0.0),  # trailing space: runs past a mismatch
        (" 4}", [b" 4", b"}."], 0.0),  # stops mid-token
        (" 4}.", [b" 4", b"}."], 1.0),  # two whole tokens
        (" 4}.!", [b" 4", b"}."], 0.0),  # longer than the kept continuation
        ("€", [EURO[:1], EURO[1:], b"x"], 1.0),  # char split across two tokens
        ("€x", [EURO[:1], EURO[1:], b"x"], 1.0),
        ("€", [EURO[:2], EURO[2:]], 1.0),
        ("", [b"a"], 0.0),  # empty prediction: 0 is never a boundary
        ("a", [], 0.0),
        (" ", [b" ", b"x"], 1.0),
        ("\ud800", [b"\xed\xa0\x80"], 0.0),  # lone surrogate: unencodable, scores 0
        ("\x00", [b"\x00"], 1.0),  # control characters are ordinary bytes
    ],
)
def test_prefix_match_cases(prediction, tokens, expected):
    assert prefix_match_reward(prediction, tokens) == expected
    assert paper_reference_reward(prediction, tokens) == expected


def test_partial_utf8_prefix_never_matches():
    # The first token alone is half a character: no str can encode to it, so nothing scores
    # on that boundary, but the full character (2 tokens) does.
    tokens = [EURO[:1], EURO[1:]]
    assert prefix_match_reward("\ufffd", tokens) == 0.0
    assert prefix_match_reward("€", tokens) == 1.0


# ----------------------------------------------------------------------------- properties

token_bytes_st = st.lists(st.binary(min_size=1, max_size=6), min_size=1, max_size=8)
any_text = st.text(
    alphabet=st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(pred=any_text, tokens=token_bytes_st)
def test_reward_equals_paper_reference(pred, tokens):
    assert prefix_match_reward(pred, tokens) == paper_reference_reward(pred, tokens)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=8),
    j=st.integers(min_value=1, max_value=8),
)
def test_whole_token_prefixes_score_one(pieces, j):
    tokens = [p.encode("utf-8") for p in pieces]
    j = min(j, len(tokens))
    prediction = "".join(pieces[:j])
    assert prefix_match_reward(prediction, tokens) == 1.0
    # Dropping the last byte makes it stop mid-token (or shorter than a boundary) -> 0,
    # unless that shorter string itself ends on a boundary.
    shorter = b"".join(tokens[:j])[:-1]
    boundaries = {len(b"".join(tokens[:i])) for i in range(1, len(tokens) + 1)}
    try:
        s = shorter.decode("utf-8")
    except UnicodeDecodeError:
        return
    assert prefix_match_reward(s, tokens) == (1.0 if s and len(shorter) in boundaries else 0.0)


def _balanced(max_leaves: int = 6):
    atom = st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=5)
    escaped = st.sampled_from(["\\", "\\\\", "\\frac", "\\boxed", " \\"])
    leaf = st.one_of(atom, escaped)
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3).map("".join),
            inner.map(lambda s: "{" + s + "}"),
        ),
        max_leaves=max_leaves,
    )


plain = st.text(alphabet=st.characters(blacklist_characters="\\{}"), max_size=20)


@settings(max_examples=400, deadline=None)
@given(thinking=st.text(max_size=30), before=plain, content=_balanced(), after=plain)
def test_extracts_balanced_content(thinking, before, content, after):
    if "</think>" in thinking:
        thinking = thinking.replace("</think>", "")
    # "\boxed" followed by "{" inside content starts a nested (inner) box: still balanced.
    response = f"{thinking}</think>{before}\\boxed{{{content}}}{after}"
    assert extract_prediction(response) == content


@settings(max_examples=500, deadline=None)
@given(response=st.text(alphabet=st.sampled_from(list("ab{}\\ </>thinkoxed\n")), max_size=200))
def test_parser_total_and_returns_substring(response):
    out = extract_prediction(response)
    assert out is None or out in response
    out2 = extract_prediction(response, require_think_close=False)
    assert out2 is None or out2 in response


# ----------------------------------------------------------------------------- linear time

ADVERSARIAL = {
    "nested opens": "</think>" + "\\boxed{" * 150_000,
    "many boxes": "</think>" + "\\boxed{x}" * 120_000,
    "open braces": "</think>\\boxed{" + "{" * 1_000_000,
    "backslashes": "</think>\\boxed{" + "\\" * 1_000_000,
    "think opens": "<think>" * 150_000,
    "no close": "\\boxed{" * 150_000,
}


@pytest.mark.timeout(20)  # a quadratic parser takes many minutes on these; linear is ~0.1 s
@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_megabyte_inputs_finish(name):
    response = ADVERSARIAL[name]
    assert len(response) >= 1_000_000
    extract_prediction(response)
    extract_prediction(response, require_think_close=False)


def test_long_prediction_reward_is_bounded():
    # A huge prediction against a short continuation exits after the continuation is used up.
    assert prefix_match_reward("a" * 1_000_000, [b"a", b"a"]) == 0.0


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_errors():
    assert {"prefix_match", "first_token", "dense", "conditional_dense"} <= set(reward_names())
    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        get_reward("nope")


def _boxed(x: str) -> str:
    return f"reasoning</think>\\boxed{{{x}}}"


def test_first_token_reward_bytes_and_ids():
    target = RewardTarget(continuation_token_bytes=(b" para", b"graph"), continuation_ids=(7, 9))
    assert get_reward("first_token")([_boxed(" paragraph"), _boxed(" pa"), "x"], target) == [
        1.0,
        0.0,
        0.0,
    ]
    # With a tokenizer hook the ids decide: " paragraph" tokenises to one id (42) != 7.
    hooked = RewardTarget(
        continuation_token_bytes=(b" para", b"graph"),
        continuation_ids=(7, 9),
        tokenize=lambda s: [42] if s == " paragraph" else [7],
    )
    assert get_reward("first_token")([_boxed(" paragraph"), _boxed(" para")], hooked) == [0.0, 1.0]
    assert first_token_match(None, [b"a"]) == 0.0


def test_dense_rewards():
    probs = {" pear": 0.25, " plum": 0.5}
    target = RewardTarget(
        continuation_token_bytes=(b" apple",), first_token_prob=lambda s: probs[s]
    )
    responses = [_boxed(" apple"), _boxed(" pear"), "no answer"]
    assert get_reward("dense")(responses, target) == [1.0, 0.25, 0.0]
    assert get_reward("conditional_dense")(responses, target) == [1.0, 0.25, 0.0]
    all_wrong = [_boxed(" pear"), _boxed(" plum")]
    assert get_reward("conditional_dense")(all_wrong, target) == [0.0, 0.0]
    with pytest.raises(ConfigError, match="first_token_prob"):
        get_reward("dense")([_boxed(" pear")], RewardTarget(continuation_token_bytes=(b" apple",)))


def test_prefix_match_group():
    target = RewardTarget(continuation_token_bytes=(b" 4", b"}"))
    fn = get_reward("prefix_match")
    assert fn([_boxed(" 4"), _boxed(" 4}"), _boxed("4"), "</think>"], target) == [1.0, 1.0, 0.0, 0.0]
    assert fn(["\\boxed{ 4}"], target, require_think_close=False) == [1.0]


# ----------------------------------------------------------------------------- LaTeX targets


@pytest.mark.parametrize(
    "tokens, response",
    [
        # Qwen2's pre-tokenizer splits " \frac" into " \" + "frac": the one-token prediction
        ((b" \\", b"frac", b"{"), "</think> The next token is \\boxed{ \\}"),
        ((b"$\\", b"frac"), "</think>\\boxed{$\\}"),
        ((b"{\\", b"frac", b"}"), "</think>\\boxed{{\\frac}}"),  # "{\\" alone stays open
        ((b" \\", b"frac", b"{", b"1", b"}", b"{"), "</think>\\boxed{ \\frac{1}}"),  # longer
    ],
)
def test_latex_targets_ending_in_a_backslash_can_be_rewarded(tokens, response):
    assert prefix_match_reward(extract_prediction(response), tokens) == 1.0
    assert get_reward("prefix_match")([response], RewardTarget(tokens)) == [1.0]


def test_targets_that_close_a_box_are_not_boxable():
    from megatron_rpt.reward.next_token import boxable

    assert not boxable(b"}") and not boxable(b" }") and not boxable(b"}.")
    assert boxable(b" \\") and boxable(b"{}") and boxable(b"{")
    # and indeed no response gives them reward 1
    for response in ("</think>\\boxed{}}", "</think>\\boxed{}.}"):
        assert prefix_match_reward(extract_prediction(response), [b"}", b"."]) == 0.0
