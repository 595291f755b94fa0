"""Done-when: ``NPROC_PER_NODE=2 bash examples/pretrain_rpt.sh --recipe examples/tiny/config.py:tiny``
runs two rollout engines (rollout.gpus_per_engine defaults to the trainer's TP = 1), and its
contexts, rewards and final weights equal a one-engine run of the same seed
(rollout.gpus_per_engine=2: one engine on rank 0 for both ranks).
"""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import train_helpers as th

SETS = (
    "train.steps=3", "optimizer.lr_warmup_steps=1", "checkpoint.interval=0",
    "log.wandb=disabled", "log.progress_bar=false",
)  # fmt: skip


def _launch(run_dir, *sets):
    argv = th.train_argv(run_dir, *SETS, *sets)
    env = {**th.env(), "NPROC_PER_NODE": "2", "RPT_PYTHON": sys.executable}
    env.pop("RANK", None)
    proc = subprocess.run(
        ["bash", str(th.ROOT / "examples" / "pretrain_rpt.sh"), *argv], env=env, cwd=th.ROOT,
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    return th.metrics(run_dir)


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_two_engines_equal_one_engine(tmp_path):
    two = _launch(tmp_path / "two")
    one = _launch(tmp_path / "one", "rollout.gpus_per_engine=2")
    assert [r["rollout/engines"] for r in two] == [2.0] * 3
    assert [r["rollout/engines"] for r in one] == [1.0] * 3
    for r in two:  # both engines did work (16 contexts = 2 blocks of 8)
        assert r["rollout/engine0/requests"] > 0 and r["rollout/engine1/requests"] > 0
        assert r["rollout/engine0/requests"] + r["rollout/engine1/requests"] == 16
    for key in ("data/sample_ids", "rollout/reward_mean", "train/loss", "train/grad_norm"):
        assert [r[key] for r in two] == [r[key] for r in one], key
    a, b = th.hf_weights(tmp_path / "two"), th.hf_weights(tmp_path / "one")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert os.path.isfile(tmp_path / "two" / "metrics.jsonl")
