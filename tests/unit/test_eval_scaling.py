"""Scaling-law fit P(C) = A / C^alpha + P*: parameter recovery, readers, CLI, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_rpt.errors import InputError
from megatron_rpt.eval.scaling import fit_power_law, read_eval_points, read_metrics_jsonl

ROOT = Path(__file__).resolve().parents[2]

CASES = [
    # (A, alpha, P*) in the paper's regime: accuracy rising to P* over 1e19..1e21 FLOPs
    (-4.0e5, 0.30, 0.48),
    (-2.5, 0.02, 0.60),
    (-1.0e9, 0.50, 0.25),
    (3.0e3, 0.20, 0.10),  # a decreasing curve (e.g. a loss) is fitted just as well
]


@pytest.mark.parametrize(("A", "alpha", "p_star"), CASES)
def test_fit_recovers_known_parameters_within_1_percent(A, alpha, p_star):
    compute = np.array([1e19, 2e19, 4e19, 8e19, 1.6e20, 3.2e20, 1.2e21])
    acc = A * compute ** (-alpha) + p_star
    fit = fit_power_law(compute, acc)
    assert fit.A == pytest.approx(A, rel=0.01)
    assert fit.alpha == pytest.approx(alpha, rel=0.01)
    assert fit.p_star == pytest.approx(p_star, rel=0.01)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert np.allclose(fit.predict(compute), acc, rtol=1e-6)


def test_fit_with_noise_is_close_and_reports_uncertainty():
    rng = np.random.default_rng(0)
    compute = np.geomspace(1e20, 1e21, 6)  # the paper's 6 checkpoints
    truth = -3.0e4 * compute ** (-0.22) + 0.45
    acc = truth + rng.normal(0, 0.002, size=6)
    fit = fit_power_law(compute, acc)
    assert fit.r2 > 0.98
    assert np.abs(fit.predict(compute) - truth).max() < 0.01
    assert all(v > 0 for v in fit.stderr.values())
    # the independent least-squares optimum: no nearby (A, alpha, P*) fits better
    base = ((fit.predict(compute) - acc) ** 2).sum()
    for d_alpha in (-1e-3, 1e-3):
        a2 = fit.alpha + d_alpha
        X = np.stack([compute ** (-a2), np.ones(6)], 1)
        coef, *_ = np.linalg.lstsq(X, acc, rcond=None)
        assert ((X @ coef - acc) ** 2).sum() >= base * (1 - 1e-9)


def test_too_few_or_bad_points_are_clear_errors():
    with pytest.raises(
        InputError, match=r"bucket hard: a scaling fit needs at least 4 points .* got 3"
    ):
        fit_power_law([1e20, 2e20, 3e20, 3e20], [0.1, 0.2, 0.3, 0.3], label="bucket hard")
    with pytest.raises(InputError, match="compute must be finite and > 0"):
        fit_power_law([0, 1, 2, 3], [0.1, 0.2, 0.3, 0.4])


def _write_metrics(path: Path, A=-1.0e4, alpha=0.2, p=0.4) -> np.ndarray:
    lines, cs = [], []
    for step in range(1, 13):
        train, rollout = step * 1e19, step * 3e19
        rec = {"step": step, "flops/train_cumulative": train, "flops/rollout_cumulative": rollout,
               "loss": 0.1}  # fmt: skip
        if step % 2 == 0:  # eval every other step
            c = train + rollout
            cs.append(c)
            for i, b in enumerate(("easy", "medium", "hard")):
                rec[f"eval/reasoning/{b}"] = A * c ** (-alpha) + p - 0.1 * i
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return np.array(cs)


def test_metrics_jsonl_reader_and_fit(tmp_path):
    path = tmp_path / "metrics.jsonl"
    cs = _write_metrics(path)
    pts = read_metrics_jsonl(path)
    assert set(pts) == {"easy", "medium", "hard"}
    assert np.allclose(pts["easy"][0], cs)
    train_only = read_metrics_jsonl(path, compute="train")
    assert np.allclose(train_only["hard"][0], cs / 4)
    fit = fit_power_law(*pts["hard"])
    assert fit.p_star == pytest.approx(0.2, rel=0.01) and fit.alpha == pytest.approx(0.2, rel=0.01)
    with pytest.raises(InputError, match="no line has 'eval/standard/easy'.*eval/reasoning/easy"):
        read_metrics_jsonl(path, accuracy_key="eval/standard/{bucket}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n{oops\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not JSON"):
        read_metrics_jsonl(bad)
    with pytest.raises(InputError, match="metrics file not found"):
        read_metrics_jsonl(tmp_path / "missing.jsonl")


def _eval_json(path: Path, values: dict[str, float], models=("rpt",)) -> None:
    rows = [
        {"model": m, "path": "x", "mode": "reasoning", "metric": "random@1",
         "buckets": {b: {"value": v, "n": 10, "ci95": [0, 1]} for b, v in values.items()}}
        for m in models
    ]  # fmt: skip
    path.write_text(json.dumps({"format": "megatron_rpt.eval_results", "results": rows}))


def test_eval_points_reader(tmp_path):
    pairs = []
    for i, c in enumerate([1e20, 2e20, 4e20, 8e20]):
        f = tmp_path / f"e{i}.json"
        _eval_json(f, {"easy": 0.1 * (i + 1), "medium": 0.05 * (i + 1), "hard": 0.01, "all": 0.2})
        pairs.append((c, f))
    pts = read_eval_points(pairs)
    assert pts["easy"][1].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert pts["medium"][0].tolist() == [1e20, 2e20, 4e20, 8e20]
    two = tmp_path / "two.json"
    _eval_json(two, {"easy": 0.1, "medium": 0.1, "hard": 0.1}, models=("a", "b"))
    with pytest.raises(InputError, match=r"holds models \['a', 'b'\]; pick one with --model"):
        read_eval_points([(1e20, two)])
    with pytest.raises(InputError, match="no 'standard' result for model 'a'"):
        read_eval_points([(1e20, two)], model="a", series="standard")


def test_fit_scaling_cli_writes_fits_and_plot(tmp_path, capsys):
    from tools.fit_scaling import main

    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics)
    out = tmp_path / "scaling"
    assert main(["--metrics", str(metrics), "--out", str(out)]) == 0
    doc = json.loads((out / "scaling.json").read_text())
    assert doc["fits"]["easy"]["alpha"] == pytest.approx(0.2, rel=0.01)
    assert doc["fits"]["medium"]["P_star"] == pytest.approx(0.3, rel=0.01)
    assert len(doc["points"]["hard"]["compute"]) == 6
    assert (out / "scaling.png").stat().st_size > 10_000
    assert "| easy |" in capsys.readouterr().out
    # a fit with too few points: one line on stderr, exit status 2, nothing written
    few = tmp_path / "few.jsonl"
    few.write_text("".join(
        json.dumps({"flops/train_cumulative": c, "flops/rollout_cumulative": 0,
                    "eval/reasoning/easy": 0.1}) + "\n" for c in (1e20, 2e20)))  # fmt: skip
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/fit_scaling.py"), "--metrics", str(few), "--out",
         str(tmp_path / "x")], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: bucket easy: a scaling fit needs at least 4 points with distinct compute "
        "(3 parameters + 1 degree of freedom), got 2"
    )
    assert not (tmp_path / "x").exists()
