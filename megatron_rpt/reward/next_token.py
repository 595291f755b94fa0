r"""The RPT reward: read the final ``\boxed{}`` after ``</think>``, then match bytes.

RPT (arXiv 2506.08007, Sec. 3.2, Eq. 3) rewards a prediction y with 1 when its UTF-8 bytes are
an exact prefix of the ground-truth continuation's bytes *and* end on a ground-truth token
boundary, i.e. y reproduces one or more whole continuation tokens byte for byte.

Parsing rules (the paper leaves some of them open; these are ours, pinned by tests):

* With ``require_think_close`` only the text after the **first** ``</think>`` is searched (the
  end of the reasoning block); a response without ``</think>`` has no prediction.
* Boxes are read by plain brace counting (the convention of verl's and MATH's
  ``last_boxed_only_string``): ``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}``. A backslash
  escapes nothing, so ``\boxed{ \}`` is the prediction `` \`` (a LaTeX target such as Qwen's
  `` \`` before ``frac`` can be predicted), and ``\{`` / ``\}`` count as braces. A target whose
  first token closes more braces than it opens (e.g. ``}``) can never be read from a box;
  ``boxable`` tells, and data preparation drops such training targets.
* The prediction is the content of the **last top-level** box. A box nested inside another is
  part of the outer box's content. If the last box is not closed (e.g. the response was
  truncated inside it) there is no prediction, even when an earlier box was complete.
* Whitespace is never stripped: ``\boxed{ }`` is the one-space prediction and ``\boxed{ 4}``
  differs from ``\boxed{4}``.
* Parsing is linear in the response length (one forward scan; no backtracking regex).

Token boundaries come from the document's **original** token ids and their exact bytes in the
byte-level vocabulary (never from re-tokenising the continuation, never from per-token
``decode()``, which breaks multi-byte characters).

Examples (the continuation " 4}." tokenised as " 4" + "}." ):

>>> cont = [b" 4", b"}."]
>>> prefix_match_reward(extract_prediction("...so it is 4.</think> \\boxed{ 4}"), cont)
1.0
>>> prefix_match_reward(" 4}.", cont)          # two whole tokens
1.0
>>> prefix_match_reward("4", cont)             # missing leading space
0.0
>>> prefix_match_reward(" 4}", cont)           # stops mid-token
0.0
>>> prefix_match_reward(" 4}.x", cont)         # runs past the continuation
0.0
>>> prefix_match_reward("", cont), prefix_match_reward(None, cont)
(0.0, 0.0)
>>> extract_prediction("no think close \\boxed{4}") is None
True
>>> extract_prediction("</think> \\boxed{a} then \\boxed{b}")
'b'
>>> extract_prediction("</think> \\boxed{a} then \\boxed{b")   # last box truncated
>>> extract_prediction("</think>\\boxed{\\frac{1}{2}}")
'\\frac{1}{2}'
>>> extract_prediction("</think>\\boxed{ }")
' '
>>> ["é".encode()[:1], "é".encode()[1:]]       # a character split across two tokens
[b'\xc3', b'\xa9']
>>> prefix_match_reward("é", [b"\xc3", b"\xa9", b"!"])
1.0
"""

from __future__ import annotations

import re
from collections.abc import Sequence

THINK_CLOSE = "</think>"
BOX_OPEN = "\\boxed{"

# Inside a box only braces matter (plain counting, no escapes; module docstring).
_INSIDE_BOX = re.compile(r"[{}]")


def _reasoning_end(response: str, require_think_close: bool) -> int | None:
    if not require_think_close:
        return 0
    cut = response.find(THINK_CLOSE)
    return None if cut < 0 else cut + len(THINK_CLOSE)


def extract_prediction(response: str, *, require_think_close: bool = True) -> str | None:
    r"""Content of the last complete top-level ``\boxed{...}`` after ``</think>``, or None.

    Args:
        response: the generated text (special tokens kept as text).
        require_think_close: search only after the first ``</think>``; without one, None.

    Returns:
        The raw box content (whitespace preserved), or None when there is no ``</think>`` (if
        required), no box, or the last box is unclosed.

    >>> extract_prediction("</think>The answer: \\boxed{ para}")
    ' para'
    >>> extract_prediction("</think>\\boxed{\\boxed{x}}")     # nested: outer box wins
    '\\boxed{x}'
    >>> extract_prediction("\\boxed{x}", require_think_close=False)
    'x'
    """
    if not isinstance(response, str):
        return None
    pos = _reasoning_end(response, require_think_close)
    if pos is None:
        return None
    last: str | None = None
    while True:
        start = response.find(BOX_OPEN, pos)
        if start < 0:
            return last
        content_start = start + len(BOX_OPEN)
        end = _box_end(response, content_start)
        if end is None:
            return None  # the last top-level box never closes (truncated output)
        last, pos = response[content_start:end], end + 1


# A box closing within this many characters is scanned by the regex; a longer one by the
# vectorised scan (linear, ~20 ns per character instead of ~0.2 us per brace).
_SHORT_BOX = 4096


def _box_end(response: str, content_start: int) -> int | None:
    """Index of the ``}`` closing the box whose content starts at ``content_start``, or None."""
    depth = 1
    stop = min(len(response), content_start + _SHORT_BOX)
    for m in _INSIDE_BOX.finditer(response, content_start, stop):
        c = m.group()
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    if stop == len(response):
        return None  # scanned to the end: the box never closes
    return _box_end_vectorised(response, content_start)


def _box_end_vectorised(response: str, content_start: int) -> int | None:
    """``_box_end`` with numpy: the same rule (plain brace counting, no escapes).

    Works on the UTF-8 bytes: braces are ASCII, and ASCII bytes never occur inside a
    multi-byte character, so the depth is the same as on characters.
    """
    import numpy as np

    raw = response[content_start:].encode("utf-8", "surrogatepass")
    codes = np.frombuffer(raw, dtype=np.uint8)
    opening, closing = codes == 123, codes == 125
    depth = np.cumsum(opening.view(np.int8) - closing.view(np.int8), dtype=np.int32)
    first = int(np.argmax(depth < 0))
    if depth[first] >= 0:
        return None
    if response.isascii():
        return content_start + first
    return content_start + len(raw[:first].decode("utf-8", "surrogatepass"))


def prefix_match_reward(
    prediction: str | bytes | None, continuation_token_bytes: Sequence[bytes]
) -> float:
    """1.0 iff ``prediction``'s UTF-8 bytes equal the first j continuation tokens' bytes, j >= 1.

    ``bytes`` are compared as they are (a completion's sampled token bytes).

    Never raises for any ``str``: strings that cannot be encoded (lone surrogates), empty
    predictions and None score 0.0. A prediction longer than the kept continuation scores 0.0
    (keep enough continuation tokens; 32 is the default).

    >>> prefix_match_reward(" par", [b" para", b"graph"])     # stops mid-token
    0.0
    >>> prefix_match_reward(" paragraph", [b" para", b"graph"])
    1.0
    >>> prefix_match_reward("\\ud800", [b"x"])                 # lone surrogate
    0.0
    >>> prefix_match_reward(b"\\xc3", [b"\\xc3", b"\\xa9"])       # half a character, as bytes
    1.0
    """
    if isinstance(prediction, bytes):  # sampled tokens' vocabulary bytes (completion mode)
        pred = prediction
    elif not isinstance(prediction, str):
        return 0.0
    else:
        try:
            pred = prediction.encode("utf-8")
        except UnicodeEncodeError:
            return 0.0
    if not pred:
        return 0.0
    cum = 0
    for token in continuation_token_bytes:
        end = cum + len(token)
        if end > len(pred) or pred[cum:end] != token:
            return 0.0
        cum = end
        if cum == len(pred):
            return 1.0
    return 0.0


def boxable(token: bytes) -> bool:
    r"""True when a prediction starting with ``token`` can be read from a box.

    Under brace counting a box closes at the first ``}`` that brings the depth to 0, so a token
    whose running brace count goes below 0 ends the box inside the prediction.

    >>> [boxable(b) for b in (b" para", b"}", b" }", b"{}", b"}{", b" \\")]
    [True, False, False, True, False, True]
    """
    depth = 0
    for c in token:
        if c == 0x7B:  # {
            depth += 1
        elif c == 0x7D:  # }
            depth -= 1
            if depth < 0:
                return False
    return True


def first_token_match(
    prediction: str | None,
    continuation_token_bytes: Sequence[bytes],
    *,
    prediction_first_id: int | None = None,
    true_first_id: int | None = None,
) -> float:
    """The paper's first-token alternative (Appendix A): does y's first token equal x_t?

    With token ids (``prediction_first_id`` from tokenising the prediction with the policy's
    tokenizer, ``true_first_id`` = x_t) the ids are compared. Without them the byte-level
    reading is used: the prediction's bytes start with x_t's bytes.

    >>> first_token_match(" paragraph", [b" para", b"graph"])
    1.0
    >>> first_token_match(" paragraph", [b" para"], prediction_first_id=7, true_first_id=5)
    0.0
    """
    if not isinstance(prediction, str) or not prediction or not continuation_token_bytes:
        return 0.0
    if prediction_first_id is not None and true_first_id is not None:
        return float(prediction_first_id == true_first_id)
    try:
        pred = prediction.encode("utf-8")
    except UnicodeEncodeError:
        return 0.0
    return float(pred.startswith(continuation_token_bytes[0]))
