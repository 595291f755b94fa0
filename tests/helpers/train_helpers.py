"""Shared pieces of the end-to-end training tests: the tiny task, commands, one reference run.

Everything runs the real entry point (``python -m megatron_rpt.train``) on the tiny recipe
(examples/tiny/config.py: synthetic task, HF engine, CPU). The task and its prepared data are
built once per test process and shared by every run.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = f"{ROOT}/examples/tiny/config.py:tiny"
# The reliability tests' configuration: 5 steps of 4 contexts, a checkpoint after every step.
SHORT = (
    "train.steps=5", "train.contexts_per_step=4", "optimizer.lr_warmup_steps=2", "checkpoint.interval=1",
    "checkpoint.keep_last=0", "log.wandb=disabled", "log.progress_bar=false",
)  # fmt: skip


@functools.cache
def shared_dir() -> Path:
    """Task assets and prepared data, built once per test process."""
    root = Path(tempfile.mkdtemp(prefix="rpt-train-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    from examples.tiny.task import build_synthetic_task

    build_synthetic_task(root / "assets")
    return root


def env() -> dict[str, str]:
    """Environment of a training subprocess."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MEGATRON_RPT_TINY_ASSETS": str(shared_dir() / "assets"),
        "OMP_NUM_THREADS": "2",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }


def train_argv(run_dir: Path, *sets: str) -> list[str]:
    """Entry-point arguments: the tiny recipe in ``run_dir`` with the shared data."""
    base = [f"run.run_dir={run_dir}", f"data.prepared_dir={shared_dir() / 'data'}", *sets]
    return ["--recipe", RECIPE, *[x for s in base for x in ("--set", s)]]


def train_cmd(run_dir: Path, *sets: str) -> list[str]:
    """The full command line of a training subprocess."""
    return [sys.executable, "-m", "megatron_rpt.train", *train_argv(run_dir, *sets)]


def stalling_cmd(run_dir: Path, phase: str, step: int, marker: Path, *sets: str) -> list[str]:
    """``train_cmd`` whose run writes ``marker`` and sleeps at ``phase`` of ``step`` (0-based)."""
    return stalling_argv_cmd(train_argv(run_dir, *sets), phase, step, marker)


def stalling_argv_cmd(argv: list[str], phase: str, step: int, marker: Path) -> list[str]:
    """The training entry point on ``argv``, stalling like ``stalling_cmd``."""
    code = "import sys; from tests.helpers.train_helpers import _main_stalling; _main_stalling()"
    return [sys.executable, "-c", code, phase, str(step), str(marker), *argv]


def _main_stalling() -> None:
    """The entry point with a phase hook that stalls (the process of ``stalling_cmd``)."""
    import time

    from megatron_rpt.cli import run_cli
    from megatron_rpt.train import main

    phase, step, marker, *argv = sys.argv[1:]

    def hook(at_phase: str, at_step: int) -> None:
        if (at_phase, at_step) == (phase, int(step)):
            Path(marker).write_text(f"{os.getpid()} {phase} {step}\n")
            time.sleep(3600)

    run_cli(lambda _: main(argv, on_phase=hook))


def run_train(run_dir: Path, *sets: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a training subprocess to completion; fail with its output if it fails."""
    proc = subprocess.run(
        train_cmd(run_dir, *sets), env=env(), cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def kill_at_stall(cmd: list[str], env: dict[str, str], marker: Path, timeout: float = 600) -> None:
    """Start ``cmd`` and SIGKILL its process group once the stall hook wrote ``marker``."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.monotonic() < deadline, "the run never reached the stall point"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, like a lost node
    proc.wait(timeout=60)
    proc.stderr.close()


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a run."""
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def hf_weights(run_dir: Path) -> dict:
    """The exported HF model's tensors."""
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "hf" / "model.safetensors")


@functools.cache
def reference_run() -> Path:
    """An uninterrupted run with the SHORT configuration (shared by several tests)."""
    run_dir = shared_dir() / "reference"
    run_train(run_dir, *SHORT)
    return run_dir


def train_without_weight_sync(rank: int, world_size: int, argv: list[str]) -> int:
    """The entry point on ``argv`` with every weight sync after the initial push disabled: the
    engine keeps sampling from the initial weights while the trainer learns (the negative
    control of the learning tests; run it with ``run_distributed``)."""
    from megatron_rpt.train import main
    from megatron_rpt.weight_sync import push

    initial = push.WeightSync.__call__

    def first_sync_only(self, *, version):
        if version == 0:
            return initial(self, version=version)
        return push.SyncMetrics(version=version, pushed=False)

    push.WeightSync.__call__ = first_sync_only
    return main(argv)
