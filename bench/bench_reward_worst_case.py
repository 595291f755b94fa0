"""Reward parsing of 5 MB brace-heavy responses: the vectorised box scan against the plain one.

``extract_prediction`` scans a box that does not close within a few thousand characters with
numpy (linear, a few ns per character). This bench times it on the worst inputs for a
per-brace scanner and, in the same run, times a per-brace regex scan with the same rules
(the scanner before the change) as the baseline, then prints the ratio. The target is at most
0.1 s per 5 MB response. Run: ``python bench/bench_reward_worst_case.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_result  # noqa: E402
from megatron_rpt.reward import extract_prediction  # noqa: E402
from tests.helpers.box_scan import per_brace_extract as per_brace_scan  # noqa: E402


def best_of(fn, text: str, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls (the slow baseline runs once)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(text)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    n = 5 << 20
    inputs = {
        "5 MiB unclosed {": "</think>\\boxed{" + "{" * n,
        "5 MiB nested {...}, closed": "</think>\\boxed{" + "{" * (n // 2) + "}" * (n // 2) + "}",
        "5 MiB {} pairs in a box": "</think>\\boxed{" + "{}" * (n // 2) + "}",
        "5 MiB backslashes in a box": "</think>\\boxed{" + "\\" * n + "}",
        "5 MiB box content": "</think>\\boxed{" + "a" * n + "}",
        "580k \\boxed{a}": "</think>" + "\\boxed{a}" * 580_000,
    }
    rows = []
    for label, text in inputs.items():
        assert extract_prediction(text) == per_brace_scan(text), label
        new, old = best_of(extract_prediction, text), best_of(per_brace_scan, text, repeats=1)
        rows.append(
            {"input": label, "ms": 1e3 * new, "baseline_ms": 1e3 * old, "speedup": old / new}
        )
    print_table(rows)
    print(f"wrote {write_result('reward_worst_case', rows)}")


if __name__ == "__main__":
    main()
