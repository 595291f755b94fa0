"""A per-brace reference scanner for ``\\boxed{}`` (tests and the worst-case reward bench).

It applies the rules of ``reward.next_token.extract_prediction`` with one regex match per
brace (plain brace counting): simple enough to trust, and the baseline the vectorised scan is compared
with, in results and in time.
"""

from __future__ import annotations

import re

_TOKENS = re.compile(r"[{}]")


def per_brace_extract(response: str, require_think_close: bool = True) -> str | None:
    """The content of the last complete top-level box (after ``</think>`` if required)."""
    pos = 0
    if require_think_close:
        cut = response.find("</think>")
        if cut < 0:
            return None
        pos = cut + len("</think>")
    last = None
    while (start := response.find("\\boxed{", pos)) >= 0:
        content, depth = start + len("\\boxed{"), 1
        for m in _TOKENS.finditer(response, content):
            depth += {"{": 1, "}": -1}.get(m.group(), 0)
            if depth == 0:
                last, pos = response[content : m.start()], m.end()
                break
        else:
            return None
    return last


__all__ = ["per_brace_extract"]
