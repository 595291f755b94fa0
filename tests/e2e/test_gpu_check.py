"""The GPU check's dry run on CPU: every step of tools/gpu_check.sh runs at tiny sizes and
results.json records it (what the lent GPU machine will run, minus CUDA and sizes).

The wheels come from ``make install`` (.whl/gpu, the same download as ``make gpu-wheels``); the
dry run installs them for Python 3.12 into a temporary target without importing them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["install", "gpu-tests", "bench-logprobs", "bench-train-step", "random-model",
         "bench-weight-sync", "bench-shared-prefix", "cpu-suite"]  # fmt: skip


@pytest.mark.timeout(2400)
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    if not any((ROOT / ".whl" / "gpu").glob("megatron_core-*.whl")):
        pytest.fail("no wheels in .whl/gpu: `make install` (or `make gpu-wheels`) downloads them")
    env = os.environ | {"RPT_PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "tools/gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=2300,
    )  # fmt: skip
    log = (tmp_path / "out/gpu_check.log").read_text()
    assert proc.returncode == 0, proc.stderr[-3000:] + log[-3000:]
    result = json.loads((tmp_path / "out/results.json").read_text())
    assert result["dry_run"] is True and result["versions"]["megatron.core"]
    assert result["versions"]["megatron_core_wheels"]["gpu_steps"].startswith("megatron_core-0.16.1-")
    status = {s["name"]: s["status"] for s in result["steps"]}
    assert status == dict.fromkeys(STEPS, "ok"), log[-4000:]
    by_name = {s["name"]: s for s in result["steps"]}
    assert by_name["gpu-tests"]["tests"]["skipped"] >= 4  # collected, skipped without CUDA
    assert by_name["cpu-suite"]["tests"]["passed"] >= 5 and by_name["cpu-suite"]["tests"]["failed"] == 0
    assert {"logprobs_cpu", "train_step_cpu", "weight_sync", "shared_prefix_cpu"} <= set(result["bench"])
