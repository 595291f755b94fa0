"""FP8 rollout weights inside the training loop (tiny recipe, CPU, HF engine).

With ``precision.rollout_fp8`` the loop's weight sync quantises the linear weights blockwise to
FP8 and the HF engine (which holds no FP8 weights) serves them dequantized; training stays in
fp32, so the precisions differ and ``loss.tis`` resolves to on. Checks the wiring end to end:
FP8 tensors are pushed at every step, TIS weights are logged, the probe passes.
"""

from tests.helpers import train_helpers as th


def test_rollout_fp8_is_pushed_and_tis_turns_on(tmp_path):
    run = tmp_path / "run"
    th.run_train(
        run, "train.steps=2", "optimizer.lr_warmup_steps=1", "train.contexts_per_step=4",
        "log.wandb=disabled", "log.progress_bar=false", "precision.rollout_fp8=true",
        "precision.rollout_fp8_block_size=32", "weight_sync.probe_tolerance=0.1",
    )  # fmt: skip
    rows = th.metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["weight_sync/fp8_tensors"] > 0
        assert r["weight_sync/fp8_tensors"] < r["weight_sync/tensors"]  # norms/embeddings stay
        assert "train/tis_weight" in r
    plain = tmp_path / "plain"
    th.run_train(
        plain, "train.steps=1", "optimizer.lr_warmup_steps=0", "train.contexts_per_step=4",
        "log.wandb=disabled", "log.progress_bar=false",
    )  # fmt: skip
    (row,) = th.metrics(plain)
    assert row["weight_sync/fp8_tensors"] == 0 and "train/tis_weight" not in row
