r"""Pure statistics of the evaluation: nested buckets, Wilson intervals, Pass@k, subsampling.

Buckets (RPT paper Sec. 4.1): a position is *easy* when its entropy exceeds the first threshold,
*medium* when it exceeds the second, *hard* when it exceeds the third. Read literally the
buckets are nested (hard ⊂ medium ⊂ easy), and that is how they are counted here: a hard
position contributes to all three columns. ``all`` (every evaluated position) is reported too.

Confidence intervals: the Wilson score interval (95 %) with ``n`` = the number of positions in
the bucket and ``p̂`` = the mean of the per-position scores. For standard accuracy each score is
0/1, so this is the textbook Wilson interval. For Random@1 (a position's mean reward over its
n samples) and Pass@k (a per-position probability) it is the interval of the experiment
"draw one position, score it once", which is conservative when several samples per position
are averaged (their within-position noise is smaller). Wilson rather than a bootstrap because
it stays meaningful at 0 or 100 % (a bootstrap of 50 zeros gives [0, 0]).

Pass@k uses the unbiased estimator of Chen et al. 2021 (Codex paper, Eq. 1): with n samples of
which c are correct, ``pass@k = 1 - C(n-c, k) / C(n, k)``, computed as a stable product.

>>> bucket_masks(np.array([0.2, 0.7, 1.2, 2.0]), (0.5, 1.0, 1.5))["medium"].tolist()
[False, False, True, True]
>>> pass_at_k(8, 1, 8), pass_at_k(8, 0, 8), round(pass_at_k(4, 2, 1), 6)
(1.0, 0.0, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_rpt.data.types import BUCKETS

BUCKET_COLUMNS: tuple[str, ...] = (*BUCKETS, "all")
"""Result keys per evaluation: the three nested buckets and every position."""

Z95 = 1.959963984540054
"""Two-sided 95 % standard-normal quantile."""


def bucket_masks(entropy_P: np.ndarray, thresholds: Sequence[float]) -> dict[str, np.ndarray]:
    """bool [P] per bucket (nested: entropy strictly above the bucket's threshold) and 'all'."""
    entropy_P = np.asarray(entropy_P, dtype=np.float64)
    masks = {name: entropy_P > t for name, t in zip(BUCKETS, thresholds, strict=True)}
    masks["all"] = np.ones(len(entropy_P), dtype=bool)
    return masks


def highest_bucket(entropy_P: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """int [P]: 0 below every threshold, 1 easy only, 2 medium (not hard), 3 hard (disjoint).

    >>> highest_bucket(np.array([0.5, 0.51, 1.2, 9.0]), (0.5, 1.0, 1.5)).tolist()
    [0, 1, 2, 3]
    """
    entropy_P = np.asarray(entropy_P, dtype=np.float64)
    return sum((entropy_P > t).astype(np.int64) for t in thresholds)


def wilson_interval(p_hat: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p_hat`` observed over ``n`` trials.

    >>> lo, hi = wilson_interval(0.0, 50); (lo, round(hi, 4))
    (0.0, 0.0713)
    >>> wilson_interval(0.5, 0)
    (nan, nan)
    """
    if n <= 0:
        return (math.nan, math.nan)
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p_hat + z2 / (2 * n)) / denom
    half = z * math.sqrt(max(p_hat * (1 - p_hat), 0.0) / n + z2 / (4 * n * n)) / denom
    lo = 0.0 if p_hat <= 0.0 else max(0.0, center - half)  # exact ends: no rounding residue
    hi = 1.0 if p_hat >= 1.0 else min(1.0, center + half)
    return (lo, hi)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples with c correct (Chen et al. 2021); needs n >= k.

    >>> round(pass_at_k(10, 3, 2), 6)   # 1 - C(7,2)/C(10,2) = 1 - 21/45
    0.533333
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass(frozen=True)
class BucketScore:
    """A metric over the positions of one bucket."""

    value: float
    """Mean per-position score (accuracy as a fraction in [0, 1]); NaN for an empty bucket."""
    n: int
    """Positions in the bucket."""
    ci95: tuple[float, float]
    """Wilson 95 % interval (module docstring)."""

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {"value": _num(self.value), "n": self.n, "ci95": [_num(x) for x in self.ci95]}


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def summarize(scores_P: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, BucketScore]:
    """Per-bucket mean of per-position scores in [0, 1], with counts and Wilson intervals."""
    scores_P = np.asarray(scores_P, dtype=np.float64)
    out = {}
    for name, mask in masks.items():
        n = int(mask.sum())
        value = float(scores_P[mask].mean()) if n else math.nan
        out[name] = BucketScore(value, n, wilson_interval(value, n))
    return out


def bucket_mean(scores: dict[str, BucketScore]) -> float:
    """Unweighted mean of the easy / medium / hard values (the paper's 'mean' column)."""
    values = [scores[b].value for b in BUCKETS if b in scores]
    return float(np.mean(values)) if values and not any(math.isnan(v) for v in values) else math.nan


def stratified_subsample(
    entropy_P: np.ndarray, thresholds: Sequence[float], max_n: int | None, seed: int
) -> np.ndarray:
    """Sorted indices of at most ``max_n`` positions, stratified by bucket.

    Strata are the disjoint highest buckets (none / easy only / medium only / hard). Each
    stratum gets a share proportional to its size (largest remainder), drawn without
    replacement with a generator seeded by ``seed``. Proportional allocation keeps the sample
    self-weighting, so the plain mean over any nested bucket is unbiased, while the stratum
    counts are fixed (less variance than a simple random sample). ``max_n`` None or >= P keeps
    everything.

    >>> ent = np.array([0.1] * 6 + [2.0] * 4)
    >>> idx = stratified_subsample(ent, (0.5, 1.0, 1.5), 5, seed=0)
    >>> len(idx), int((ent[idx] > 1.5).sum())
    (5, 2)
    """
    n_total = len(entropy_P)
    if max_n is None or max_n >= n_total:
        return np.arange(n_total)
    strata = highest_bucket(entropy_P, thresholds)
    sizes = np.bincount(strata, minlength=len(thresholds) + 1)
    quota = sizes * (max_n / n_total)
    take = np.floor(quota).astype(np.int64)
    # largest remainder; ties go to the harder stratum (the scarcer one in practice)
    order = sorted(range(len(sizes)), key=lambda s: (-(quota[s] - take[s]), -s))
    for s in order[: max_n - int(take.sum())]:
        take[s] += 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(strata == s), size=int(take[s]), replace=False)
        for s in range(len(sizes))
        if take[s]
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


__all__ = [
    "BUCKET_COLUMNS",
    "BucketScore",
    "bucket_masks",
    "bucket_mean",
    "highest_bucket",
    "pass_at_k",
    "stratified_subsample",
    "summarize",
    "wilson_interval",
]
