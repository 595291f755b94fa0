"""``train.objective=rlp`` end to end on the tiny RLP recipe (examples/rlp/config.py:tiny_rlp)
through the real entry point: Megatron trainer, HF engine, weight sync, both scoring passes in
the trainer, the EMA teacher.

* The mean reward (information gain) rises over the 20 seeded steps, by the right mechanism:
  the policy's log-prob of x_t after its thought rises while the EMA teacher's (no thought)
  stays where it was. Measured: first five steps about -6.2, last five about -3.3; teacher
  -0.024 -> -0.05.
* Negative control: with every thought replaced by an empty string for scoring, the reward is
  0 (both passes then score the same sequences with phi = theta, and nothing is learned).
* Kill and resume: SIGKILL in the middle of step 4, the same command resumes from step 3; the
  rewards (which depend on the EMA teacher), losses, contexts, final weights and the final EMA
  teacher equal an uninterrupted run's.
"""

import functools
import statistics
import subprocess
import sys

import pytest
import torch

from megatron_rpt.testing.distributed import run_distributed
from tests.helpers import train_helpers as th

RECIPE = f"{th.ROOT}/examples/rlp/config.py:tiny_rlp"
QUIET = ("log.wandb=disabled", "log.progress_bar=false", "checkpoint.export_hf_at_end=false")
SHORT = ("train.steps=5", "train.contexts_per_step=4", "optimizer.lr_warmup_steps=2", "checkpoint.interval=1",
         "checkpoint.keep_last=0", "checkpoint.export_hf_at_end=true", *QUIET[:2])  # fmt: skip


def _argv(run_dir, *sets):
    base = [f"run.run_dir={run_dir}", f"data.prepared_dir={th.shared_dir() / 'data-rlp'}", *sets]
    return ["--recipe", RECIPE, *[x for s in base for x in ("--set", s)]]


def _run(run_dir, *sets, env=None):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rpt.train", *_argv(run_dir, *sets)],
        env=env or th.env(), cwd=th.ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


@functools.cache
def _reference_short():
    run = th.shared_dir() / "rlp-reference"
    _run(run, *SHORT)
    return run


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a shared 2-core machine; about 2-4 min when idle
def test_rlp_information_gain_rises(tmp_path):
    run = tmp_path / "run"
    _run(run, *QUIET)
    records = th.metrics(run)
    assert [r["step"] for r in records] == list(range(1, 21))
    gain = [r["rollout/reward_mean"] for r in records]
    start, end = statistics.mean(gain[:5]), statistics.mean(gain[-5:])
    assert end >= start + 1.0, gain
    scored = [r["rlp/logprob_with_thought"] for r in records]
    assert statistics.mean(scored[-5:]) >= statistics.mean(scored[:5]) + 1.0, scored
    teacher = [r["rlp/logprob_teacher"] for r in records]
    assert min(teacher) > -0.5, teacher  # the rise is not the teacher getting worse
    last = records[-1]
    assert last["flops/score_cumulative"] > 0 and last["time/score_s"] > 0
    assert last["flops/total_cumulative"] == (
        last["flops/train_cumulative"] + last["flops/rollout_cumulative"]
        + last["flops/score_cumulative"]
    )  # fmt: skip
    ckpt = run / "checkpoints" / "step_0000020"
    assert (ckpt / "ema_teacher" / "tp000_pp000.safetensors").is_file()


def _train_with_empty_thoughts(rank, world_size, argv):
    from megatron_rpt.train import main
    from megatron_rpt.trainer import rlp

    group = rlp.RLPSource._group

    def empty(self, sample, prompt, completions):
        g = group(self, sample, prompt, completions)
        g.scored = [[] for _ in g.scored]  # score every thought as the empty string
        return g

    rlp.RLPSource._group = empty
    return main(argv)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a shared 2-core machine; about 2-4 min when idle
def test_empty_thought_has_zero_information_gain(tmp_path):
    run = tmp_path / "run"
    argv = _argv(run, *QUIET, "train.steps=4", "optimizer.lr_warmup_steps=2", "checkpoint.interval=0")
    env = {k: th.env()[k] for k in ("MEGATRON_RPT_TINY_ASSETS", "WANDB_MODE")}
    run_distributed(_train_with_empty_thoughts, 1, args=(argv,), timeout=600,
                    env={**env, "OMP_NUM_THREADS": "2"})  # fmt: skip
    records = th.metrics(run)
    assert len(records) == 4
    for r in records:
        assert abs(r["rollout/reward_mean"]) < 1e-5, r["rollout/reward_mean"]
        assert abs(r["rlp/info_gain_max"]) < 1e-5
        assert r["rlp/logprob_teacher"] < -0.001  # a real log-prob, not a zero placeholder


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a shared 2-core machine; about 2-4 min when idle
def test_sigkill_then_resume_is_exact_ema_teacher_included(tmp_path):
    from safetensors.torch import load_file

    reference = _reference_short()
    run, marker = tmp_path / "run", tmp_path / "stalled"
    cmd = th.stalling_argv_cmd(_argv(run, *SHORT), "train", 3, marker)
    th.kill_at_stall(cmd, th.env(), marker, timeout=900)
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000003"

    again = _run(run, *SHORT)
    assert f"resumed from {ckpts / 'step_0000003'} at step 3" in again.stderr
    got, want = th.metrics(run), th.metrics(reference)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for key in ("data/sample_ids", "rollout/reward_mean", "rlp/logprob_teacher",
                "train/loss", "train/grad_norm", "flops/total_cumulative"):  # fmt: skip
        assert [r[key] for r in got] == [r[key] for r in want], key
    a, b = th.hf_weights(run), th.hf_weights(reference)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ema = "step_0000005/ema_teacher/tp000_pp000.safetensors"
    ema_a, ema_b = load_file(ckpts / ema), load_file(reference / "checkpoints" / ema)
    assert sorted(ema_a) == sorted(ema_b) and len(ema_a) > 5
    for name in ema_a:
        assert torch.equal(ema_a[name], ema_b[name]), name
    # phi moved away from the initial theta and differs from the final theta
    initial = load_file(run / "checkpoints" / "step_0000001/ema_teacher/tp000_pp000.safetensors")
    assert any(not torch.equal(ema_a[n], initial[n]) for n in ema_a)
