"""examples/pretrain_rpt.sh on 2 CPU processes (torchrun, gloo) at TP=2 with the tiny recipe.

The launcher starts torchrun itself; one HF engine (rollout.gpus_per_engine defaults to TP = 2)
driven by rank 0, its completions gathered to both ranks; the weight sync gathers the two TP
shards to it. The first step trains on exactly the batch the
single-process reference run trained on (same initial weights, same seeds), so its rewards and
contexts are identical and its gradient norm equal up to the reduction order; the checkpoint
records the TP=2 layout and exports to HF.
"""

import json
import os
import subprocess

import pytest

from tests.helpers import train_helpers as th


@pytest.mark.slow
def test_tp2_run_through_the_launcher(tmp_path):
    reference = th.metrics(th.reference_run())
    run = tmp_path / "run"
    # Two steps (warm-up must be shorter); step 1's rewards, contexts and gradient norm do not
    # depend on the learning-rate schedule.
    sets = [s for s in th.SHORT if not s.startswith(("train.steps", "optimizer.lr_warmup"))]
    argv = th.train_argv(run, *sets, "train.steps=2", "optimizer.lr_warmup_steps=1",
                         "parallel.tensor_model_parallel_size=2")  # fmt: skip
    env = {**th.env(), "NPROC_PER_NODE": "2", "RPT_PYTHON": __import__("sys").executable,
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    for var in ("RANK", "WORLD_SIZE", "MASTER_PORT", "NNODES"):
        env.pop(var, None)
    proc = subprocess.run(
        ["bash", str(th.ROOT / "examples/pretrain_rpt.sh"), *argv], env=env, cwd=th.ROOT,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "torch.distributed.run" in proc.stderr.splitlines()[0]
    records = th.metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    first, ref = records[0], reference[0]
    assert first["data/sample_ids"] == ref["data/sample_ids"]
    assert first["rollout/reward_mean"] == ref["rollout/reward_mean"]
    assert first["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=1e-4)
    state = json.loads((run / "checkpoints" / "step_0000002" / "trainer_state.json").read_text())
    assert state["layout"]["tp"] == 2 and state["layout"]["world_size"] == 2
    assert (run / "hf" / "model.safetensors").is_file()
    assert os.path.getsize(run / "hf" / "model.safetensors") > 0
