r"""The ``stop_at_final_box`` criterion: end a response once its answer box has closed.

An RPT response is ``<reasoning> </think> ... \boxed{prediction}``; everything after the box
closes is wasted decode time. The criterion is *"the text after the first ``</think>`` contains
a complete top-level ``\boxed{...}``"*, i.e. exactly the moment at which
``megatron_rpt.reward.extract_prediction`` stops returning None, so the prediction the reward
reads is the box that stopped generation.

Two implementations of the same rule:

* ``FinalBoxStop`` (HF engine): exact. A full ``extract_prediction`` runs only on steps whose
  new token contains ``}`` (the only character that can complete a box), so the cost is a
  vocabulary lookup per step plus a decode per closing brace.
* ``final_box_stop_regex`` (SGLang): SGLang matches ``stop_regex`` against a tail of the
  decoded output whose length is bounded by the regex's maximum match length, decoded on every
  step, so the regex must be bounded. It therefore matches a box whose ``\boxed{`` starts within
  ``max_gap_chars`` characters after ``</think>`` and whose content has at most
  ``max_box_chars`` characters and no nested braces. Responses outside those bounds
  are not cut early; they run to EOS / ``max_new_tokens`` and are scored the same way (the
  reward always re-parses the full text), so the bound costs decode time, never correctness.

>>> import re
>>> rx = re.compile(final_box_stop_regex())
>>> bool(rx.search("think...</think>\n\n\\boxed{ 4}"))
True
>>> bool(rx.search("\\boxed{4} inside reasoning"))        # no </think> yet
False
>>> bool(rx.search("</think> \\boxed{ 4"))                  # box not closed
False
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from megatron_rpt.reward.next_token import THINK_CLOSE, extract_prediction


def final_box_stop_regex(max_gap_chars: int = 32, max_box_chars: int = 32) -> str:
    r"""SGLang ``stop_regex``: ``</think>``, a short gap, then a closed flat ``\boxed{...}``.

    The maximum match length (what SGLang decodes per step) is about
    ``len('</think>') + max_gap_chars + 7 + 2 * max_box_chars + 1`` characters.
    """
    if max_gap_chars < 0 or max_box_chars < 1:
        raise ValueError("max_gap_chars must be >= 0 and max_box_chars >= 1")
    # Inside the box: any char but a brace (plain brace counting, as extract_prediction reads
    # it; a backslash escapes nothing). [\s\S] lets the gap span newlines.
    content = r"[^{}]" + f"{{0,{max_box_chars}}}"
    return re.escape(THINK_CLOSE) + rf"[\s\S]{{0,{max_gap_chars}}}?" + r"\\boxed\{" + content + r"\}"


class FinalBoxStop:
    """Exact per-row incremental check for the HF engine.

    ``closing_token_ids`` are the vocabulary ids whose decoded text contains ``}``; computed
    once per tokenizer with ``closing_brace_ids``.
    """

    def __init__(self, closing_token_ids: set[int], decode: Callable[[Sequence[int]], str]) -> None:
        self._closing = closing_token_ids
        self._decode = decode

    def done(self, token_ids: Sequence[int]) -> bool:
        """True when the response ``token_ids`` (generated so far) has a closed final box."""
        if not token_ids or token_ids[-1] not in self._closing:
            return False
        text = self._decode(token_ids)
        return THINK_CLOSE in text and extract_prediction(text) is not None


def closing_brace_ids(vocab_texts: Sequence[str]) -> set[int]:
    """Ids whose decoded text contains ``}`` (``vocab_texts[i]`` = decode([i])).

    >>> sorted(closing_brace_ids(["a", "}", "x}.", "{"]))
    [1, 2]
    """
    return {i for i, piece in enumerate(vocab_texts) if "}" in piece}
