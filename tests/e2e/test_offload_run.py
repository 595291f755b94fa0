"""Done-when of the colocated hand-off, through the training loop: a tiny run with
``rollout.offload_trainer`` = 'optimizer' or 'all' (the trainer's state leaves memory for every
rollout and comes back) trains bit-identically to the same run without the hand-off, and its
metrics say what moved."""

import pytest
import torch

from tests.helpers import train_helpers as th

SETS = (
    "train.steps=3", "optimizer.lr_warmup_steps=1", "checkpoint.interval=0",
    "log.wandb=disabled", "log.progress_bar=false",
)  # fmt: skip
SAME = ("data/sample_ids", "rollout/reward_mean", "train/loss", "train/grad_norm")


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_hand_off_trains_bit_identically(tmp_path):
    runs = {}
    for mode in ("none", "optimizer", "all"):
        proc = th.run_train(tmp_path / mode, *SETS, f"rollout.offload_trainer={mode}", timeout=700)
        assert proc.returncode == 0, proc.stderr[-6000:]
        runs[mode] = th.metrics(tmp_path / mode)
    assert all("offload/bytes" not in r for r in runs["none"])
    for mode in ("optimizer", "all"):
        for key in SAME:
            assert [r[key] for r in runs[mode]] == [r[key] for r in runs["none"]], (mode, key)
        assert all(r["offload/bytes"] > 0 for r in runs[mode]), mode
        a, b = th.hf_weights(tmp_path / mode), th.hf_weights(tmp_path / "none")
        assert sorted(a) == sorted(b)
        for name in a:
            assert torch.equal(a[name], b[name]), (mode, name)
    # 'all' moves the parameters as well
    assert runs["all"][-1]["offload/bytes"] > runs["optimizer"][-1]["offload/bytes"]
