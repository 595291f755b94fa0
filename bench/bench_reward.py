"""Reward throughput: parse the final \\boxed{} and prefix-match, in rewards/s.

Responses are synthetic but shaped like RPT rollouts: a reasoning block with LaTeX, braces and
candidate boxes, ``</think>``, then the final box; the continuation is 32 tokens. Sizes: ~2 KB
(a typical ~500-token response), ~32 KB (an 8k-token maximum-length response) and 1 MB
adversarial inputs. Run: ``python bench/bench_reward.py``.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_result  # noqa: E402
from megatron_rpt.reward import RewardTarget, extract_prediction, get_reward  # noqa: E402


def make_response(rng: random.Random, n_chars: int, answer: str) -> str:
    words = ["Let", "x", "be", "\\frac{1}{2}", "so", "\\{a, b\\}", "maybe", "\\boxed{ y}", "wait", "{z}"]
    parts, size = [], 0
    while size < n_chars:
        w = rng.choice(words)
        parts.append(w)
        size += len(w) + 1
    return " ".join(parts) + f"\n</think>\nThe next token is \\boxed{{{answer}}}"


def time_it(fn, *, min_seconds: float = 1.0) -> tuple[int, float]:
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n, elapsed


def main() -> None:
    rng = random.Random(0)
    target = RewardTarget(continuation_token_bytes=tuple([b" 4", b"}", b"."] + [b" x"] * 29))
    reward = get_reward("prefix_match")
    rows = []
    for label, size in [("typical ~2 KB", 2_000), ("max-length ~32 KB", 32_000)]:
        group = [make_response(rng, size, rng.choice([" 4", "4", " 4}."])) for _ in range(8)]
        n, secs = time_it(lambda g=group: reward(g, target))
        rows.append({"input": label, "rewards_per_s": n * len(group) / secs, "us_per_reward": 1e6 * secs / (n * len(group))})
    adversarial = {
        "1 MB nested \\boxed{": "</think>" + "\\boxed{" * 150_000,
        "1 MB open braces": "</think>\\boxed{" + "{" * 1_000_000,
        "1 MB many boxes": "</think>" + "\\boxed{x}" * 120_000,
    }
    for label, text in adversarial.items():
        n, secs = time_it(lambda t=text: extract_prediction(t), min_seconds=0.5)
        rows.append({"input": label, "rewards_per_s": n / secs, "us_per_reward": 1e6 * secs / n})
    print_table(rows)
    write_result("reward", rows)


if __name__ == "__main__":
    main()
