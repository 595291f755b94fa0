"""The first/last-quarter reward summary a run prints at its end, and the plot's quarter levels."""

import json

import pytest

from megatron_rpt.trainer.run_logger import (
    plot_metrics,
    quarter_bounds,
    quarter_means,
    reward_trend,
)


@pytest.mark.parametrize("n", range(4, 41))
def test_quarters_cover_every_step_and_the_end_quarters_are_equal(n):
    b = quarter_bounds(n)
    assert b[0] == 0 and b[-1] == n and b == sorted(b)
    lengths = [hi - lo for lo, hi in zip(b, b[1:], strict=False)]
    assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1
    assert lengths[0] == lengths[-1]


def test_quarter_means_and_trend():
    values = [0.1, 0.3, 0.2, 0.2, 0.4, 0.4, 0.5, 0.7]
    assert quarter_means(values) == pytest.approx([0.2, 0.2, 0.4, 0.6])
    trend = reward_trend([{"rollout/reward_mean": v} for v in values])
    assert (trend.first, trend.last, trend.steps_per_quarter) == pytest.approx((0.2, 0.6, 2))
    assert trend.change == pytest.approx(0.4)
    assert "(+0.400)" in str(trend)
    falling = reward_trend([{"rollout/reward_mean": v} for v in reversed(values)])
    assert falling.change == pytest.approx(-0.4) and "(-0.400)" in str(falling)


def test_trend_needs_four_steps_and_skips_records_without_a_reward():
    assert reward_trend([{"rollout/reward_mean": 0.5}] * 3) is None
    records = [{"rollout/reward_mean": v} for v in (0.0, 0.0, 1.0, 1.0)] + [{"train/loss": 1.0}]
    assert reward_trend(records).change == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 4"):
        quarter_means([1.0, 2.0])


@pytest.mark.parametrize("steps", [2, 9])
def test_plot_is_written_with_and_without_quarter_levels(tmp_path, steps):
    lines = [
        json.dumps({"step": s, "rollout/reward_mean": s / 10, "rollout/accuracy": s / 10,
                    "rollout/format_rate": 1.0})
        for s in range(1, steps + 1)
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = plot_metrics(tmp_path)
    assert out == tmp_path / "plots" / "reward_accuracy.png"
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_plot_levels_skip_steps_without_a_reward(tmp_path):
    records = [{"step": s, "rollout/reward_mean": s / 10} for s in range(1, 7)]
    del records[2]["rollout/reward_mean"]  # step 3 logged no reward: 5 steps left for quarters
    lines = [json.dumps(r) for r in records]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert plot_metrics(tmp_path).read_bytes()[:4] == b"\x89PNG"
