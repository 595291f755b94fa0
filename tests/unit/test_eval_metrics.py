"""Evaluation statistics: nested buckets, Wilson intervals, the unbiased Pass@k estimator, the
stratified subsample, and the eval config's validation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from megatron_rpt.config import build_config
from megatron_rpt.errors import ConfigError
from megatron_rpt.eval.config import EvalConfig, validate_eval_config
from megatron_rpt.eval.metrics import (
    bucket_masks,
    bucket_mean,
    highest_bucket,
    pass_at_k,
    stratified_subsample,
    summarize,
    wilson_interval,
)

T = (0.5, 1.0, 1.5)


def test_buckets_are_nested_and_strict():
    ent = np.array([0.0, 0.5, 0.5001, 1.0, 1.2, 1.5, 1.51, 3.0, np.float32(0.7)])
    masks = bucket_masks(ent, T)
    # counted by hand: > 0.5 -> 0.5001, 1.0, 1.2, 1.5, 1.51, 3.0, 0.7 ; > 1.0 -> 1.2, 1.5, 1.51, 3.0
    assert masks["easy"].sum() == 7 and masks["medium"].sum() == 4 and masks["hard"].sum() == 2
    assert masks["all"].sum() == len(ent)
    assert (
        not (masks["hard"] & ~masks["medium"]).any()
        and not (masks["medium"] & ~masks["easy"]).any()
    )
    # a hard position counts in all three buckets
    i = int(np.flatnonzero(ent == 3.0)[0])
    assert masks["easy"][i] and masks["medium"][i] and masks["hard"][i]
    assert highest_bucket(ent, T).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 1]


def test_summarize_counts_each_position_in_every_bucket_it_belongs_to():
    ent = np.array([0.2, 0.7, 1.2, 2.0])
    correct = np.array([1.0, 0.0, 1.0, 1.0])
    s = summarize(correct, bucket_masks(ent, T))
    assert (s["easy"].n, s["medium"].n, s["hard"].n, s["all"].n) == (3, 2, 1, 4)
    assert s["easy"].value == pytest.approx(2 / 3) and s["medium"].value == 1.0
    assert s["all"].value == 0.75
    assert bucket_mean(s) == pytest.approx((2 / 3 + 1 + 1) / 3)
    empty = summarize(np.array([1.0]), bucket_masks(np.array([0.1]), T))
    assert (
        empty["hard"].n == 0 and math.isnan(empty["hard"].value) and math.isnan(bucket_mean(empty))
    )


def test_wilson_interval_matches_the_closed_form():
    # p = 0.3, n = 100, z = 1.96: standard textbook values 0.2189 .. 0.3958
    lo, hi = wilson_interval(0.3, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.2189, 0.3958)
    lo, hi = wilson_interval(1.0, 10)
    assert hi == 1.0 and round(lo, 4) == 0.7225
    for p, n in [(0.01, 7), (0.5, 3), (0.99, 1000)]:
        lo, hi = wilson_interval(p, n)
        assert 0 <= lo <= p <= hi <= 1


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_brute_force_over_subsets(n):
    for c in range(n + 1):
        samples = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_stratified_subsample_is_proportional_deterministic_and_nested_in_its_input():
    rng = np.random.default_rng(0)
    ent = np.concatenate([rng.uniform(0, 0.5, 500), rng.uniform(0.6, 0.9, 300),
                          rng.uniform(1.1, 1.4, 150), rng.uniform(1.6, 3, 50)])  # fmt: skip
    idx = stratified_subsample(ent, T, 100, seed=7)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100 and (np.diff(idx) > 0).all()
    counts = np.bincount(highest_bucket(ent[idx], T), minlength=4).tolist()
    assert counts == [50, 30, 15, 5]  # exactly proportional here
    assert np.array_equal(idx, stratified_subsample(ent, T, 100, seed=7))
    assert not np.array_equal(idx, stratified_subsample(ent, T, 100, seed=8))
    assert np.array_equal(stratified_subsample(ent, T, None, seed=7), np.arange(len(ent)))
    assert np.array_equal(stratified_subsample(ent, T, 5000, seed=7), np.arange(len(ent)))
    small = stratified_subsample(ent, T, 7, seed=1)  # largest remainder fills the rounding gap
    assert len(small) == 7


def test_eval_config_rules_name_the_field():
    with pytest.raises(ConfigError, match=r"eval.difficulty_thresholds must be three increasing"):
        build_config(overrides=["eval.difficulty_thresholds=1.0,1.0,1.5"])
    with pytest.raises(ConfigError, match="eval.n_samples must be >= 1"):
        validate_eval_config(EvalConfig(n_samples=0))
    with pytest.raises(ConfigError, match="eval.window_overlap"):
        validate_eval_config(EvalConfig(window_tokens=256, window_overlap=256))
    with pytest.raises(ConfigError, match="eval.max_positions"):
        build_config(overrides=["eval.max_positions=0"])
    cfg = build_config(overrides=["eval.mode=reasoning", "eval.template=v3"])
    assert cfg.eval.mode == "reasoning" and cfg.eval.template == "v3"
