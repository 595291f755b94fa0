"""FP8 training configuration on CPU: ``precision.*`` validation, the mapping onto Megatron-Core
0.16.1 ``TransformerConfig`` fields (accepted by Megatron itself, bf16 layers as Megatron's own
``is_first_last_bf16_layer`` sees them), the clear errors without TE / GPU / TE spec, the
resolved-recipe log line, ``loss.tis`` resolved from the precisions, checkpoints staying in
model.dtype, and the trainer's FP8 token alignment (padding changes no log-prob or loss).

What needs TE and a GPU (FP8 actually running) is in tests/gpu/test_fp8_gpu.py.
"""

from __future__ import annotations

import logging

import pytest
import torch

from megatron_rpt.config import RPTConfig, resolve, validate
from megatron_rpt.config_utils import apply_overrides
from megatron_rpt.errors import ConfigError
from megatron_rpt.model import fp8
from megatron_rpt.model.arch import arch_from_dict
from megatron_rpt.model.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model, tiny_config_dict


def _tc(num_layers=4, **kwargs):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=num_layers, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_each_recipe_maps_onto_transformer_config_fields_megatron_accepts(recipe):
    from megatron.core.enums import Fp8Recipe

    p = PrecisionConfig(fp8=recipe, fp8_format="hybrid", fp8_margin=1, fp8_amax_history_len=16)
    kwargs = fp8.fp8_transformer_kwargs(p, num_layers=4)
    config = _tc(**kwargs)
    assert config.fp8 == "hybrid" and config.fp8_recipe == Fp8Recipe(recipe) == recipe
    assert (config.fp8_margin, config.fp8_amax_history_len) == (1, 16)
    assert config.fp8_amax_compute_algo == "max" and not config.first_last_layers_bf16
    assert fp8.token_alignment(config) == (32 if recipe == "mxfp8" else 16)
    assert fp8.fp8_transformer_kwargs(PrecisionConfig(), num_layers=4) == {}
    assert fp8.token_alignment(_tc()) == 1


def test_first_last_layers_in_bf16_as_megatron_sees_them():
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    p = PrecisionConfig(
        fp8="tensorwise", first_last_layers_bf16=True, num_layers_at_start_in_bf16=2
    )
    config = _tc(num_layers=6, **fp8.fp8_transformer_kwargs(p, num_layers=6))
    assert [is_first_last_bf16_layer(config, i) for i in range(6)] == [1, 1, 0, 0, 0, 1]
    line = fp8.describe(config)
    assert "recipe tensorwise (Float8CurrentScaling), format e4m3" in line
    assert "layers 3-5 of 6 in FP8 (first 2 / last 1 in bf16)" in line
    assert "token alignment 16" in line
    with pytest.raises(
        ConfigError, match="num_layers_at_start_in_bf16=4 must be between 0 and the 3"
    ):
        fp8.fp8_transformer_kwargs(
            PrecisionConfig(
                fp8="blockwise", first_last_layers_bf16=True, num_layers_at_start_in_bf16=4
            ),
            num_layers=6,
            pipeline_size=2,
        )
    with pytest.raises(ConfigError, match="nothing would run in FP8"):
        fp8.fp8_transformer_kwargs(
            PrecisionConfig(fp8="blockwise", first_last_layers_bf16=True), num_layers=2
        )


def test_delayed_scaling_line_names_its_knobs():
    p = PrecisionConfig(fp8="delayed", fp8_amax_compute_algo="most_recent")
    line = fp8.describe(_tc(**fp8.fp8_transformer_kwargs(p, num_layers=4)))
    assert "recipe delayed (DelayedScaling)" in line
    assert "amax history 1024 (most_recent), margin 0" in line
    assert "layers 1-4 of 4 in FP8" in line


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["precision.fp8=delayed", "precision.first_last_layers_bf16=true"],
            "does not work with precision.fp8=delayed",
        ),
        (["precision.fp8=tensorwise", "model.spec=local"], "model.spec=local cannot run FP8"),
        (
            ["precision.num_layers_at_end_in_bf16=-1"],
            "precision.num_layers_at_end_in_bf16 must be >= 0",
        ),
        (["precision.fp8_amax_history_len=0"], "precision.fp8_amax_history_len"),
        (["precision.rollout_fp8_block_size=0"], "precision.rollout_fp8_block_size"),
        (["model.transformer_overrides={fp8: e4m3}"], "'fp8' is set from the precision"),
        (["model.transformer_overrides={fp8_param: true}"], "'fp8_param' .* is not supported"),
    ],
)
def test_config_rules_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(RPTConfig(), overrides))


def test_unknown_recipe_is_refused_when_parsing():
    with pytest.raises(ConfigError, match="precision.fp8: 'fp4' is not one of"):
        apply_overrides(RPTConfig(), ["precision.fp8=fp4"])


def _arch(num_layers=4):
    return arch_from_dict(tiny_config_dict("llama", num_layers=num_layers))


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_fp8_without_te_or_gpu_is_a_clear_error(recipe):
    from megatron_rpt.model.build import build_transformer_config

    with pytest.raises(
        ConfigError,
        match=rf"precision.fp8={recipe} needs Transformer Engine and a CUDA GPU \(cuda=False",
    ):
        build_transformer_config(
            _arch(),
            ModelConfig(dtype="bf16"),
            ParallelConfig(),
            precision=PrecisionConfig(fp8=recipe),
        )


def test_runtime_check_names_spec_recipe_support_and_te_version(monkeypatch):
    from megatron.core import utils as mcore_utils

    from megatron_rpt import capabilities

    monkeypatch.setattr(capabilities, "have_cuda", lambda: True)
    monkeypatch.setattr(capabilities, "have_te", lambda: True)
    monkeypatch.setattr(fp8, "_device_name", lambda: "Fake GPU (sm90)")
    p = PrecisionConfig(fp8="mxfp8")
    with pytest.raises(ConfigError, match="needs the Transformer Engine layer spec.*'local' spec"):
        fp8.check_fp8_runtime(p, "local")
    monkeypatch.setattr(fp8, "recipe_support", lambda r: (False, "needs compute capability 10.0"))
    with pytest.raises(
        ConfigError,
        match=r"mxfp8 is not supported on this GPU \(Fake GPU \(sm90\)\): needs compute",
    ):
        fp8.check_fp8_runtime(p, "te")
    monkeypatch.setattr(fp8, "recipe_support", lambda r: (True, ""))
    monkeypatch.setattr(mcore_utils, "is_te_min_version", lambda v: v == "1.0")
    with pytest.raises(ConfigError, match=r"needs Transformer Engine >= 2.3.0.dev0"):
        fp8.check_fp8_runtime(PrecisionConfig(fp8="blockwise"), "te")
    fp8.check_fp8_runtime(PrecisionConfig(fp8="delayed"), "te")  # passes


def test_build_applies_the_recipe_and_logs_it(monkeypatch, caplog):
    from megatron_rpt.model import build

    monkeypatch.setattr(fp8, "check_fp8_runtime", lambda precision, spec: None)
    monkeypatch.setattr(fp8, "te_version", lambda: "2.10.0")
    p = PrecisionConfig(fp8="blockwise", first_last_layers_bf16=True)
    with caplog.at_level(logging.INFO, logger="megatron_rpt.model.build"):
        config = build.build_transformer_config(
            _arch(), ModelConfig(dtype="bf16"), ParallelConfig(), precision=p
        )
    assert (config.fp8, config.fp8_recipe, config.first_last_layers_bf16) == (
        "e4m3",
        "blockwise",
        True,
    )
    assert config.params_dtype == torch.bfloat16 and config.bf16  # parameters keep model.dtype
    assert (
        "FP8 training: recipe blockwise (Float8BlockScaling), format e4m3; layers 2-3 of 4"
        in caplog.text
    )
    assert "Transformer Engine 2.10.0" in caplog.text
    plain = build.build_transformer_config(_arch(), ModelConfig(dtype="bf16"), ParallelConfig())
    assert plain.fp8 is None


@pytest.mark.parametrize(
    "overrides, tis",
    [
        ([], True),  # bf16 trainer vs the fp32 HF engine
        (["model.dtype=fp32"], False),
        (["model.dtype=fp32", "precision.rollout_fp8=true"], True),
        (["rollout.dtype=bfloat16"], False),
        (["rollout.dtype=bfloat16", "model.spec=te", "precision.fp8=delayed"], True),
        (["rollout.engine=sglang", "rollout.sglang.dtype=bfloat16"], False),
        (["rollout.engine=sglang"], True),  # dtype 'auto': unknown
        (["precision.rollout_fp8=true", "loss.tis=false"], False),  # explicit wins
    ],
)
def test_tis_follows_the_precision_gap_unless_set(overrides, tis, caplog):
    cfg = apply_overrides(RPTConfig(), overrides)
    with caplog.at_level(logging.INFO, logger="megatron_rpt.config"):
        resolved = resolve(validate(cfg))
    assert resolved.loss.tis is tis
    assert cfg.loss.tis is (False if "loss.tis=false" in overrides else None)  # validate: pure
    if "loss.tis=false" not in overrides:
        assert f"loss.tis resolved to {tis}: training computes in" in caplog.text
    assert resolve(resolved) == resolved  # idempotent


def test_checkpoints_and_exports_stay_in_model_dtype_under_fp8(tmp_path):
    """With FP8 on, parameters (hence checkpoints, weight sync and HF export, which read
    them) keep model.dtype; FP8 exists only inside TE's GEMMs. Checked on the config path."""
    from megatron_rpt.config import save_config

    cfg = resolve(
        validate(apply_overrides(RPTConfig(), ["precision.fp8=tensorwise", "model.spec=te"]))
    )
    kw = fp8.fp8_transformer_kwargs(cfg.precision, num_layers=4)
    assert not {"fp8_param", "params_dtype", "bf16"} & set(kw)
    text = save_config(cfg, tmp_path).read_text()
    assert "fp8: tensorwise" in text and "tis: true" in text


# ----------------------------------------------------------------------------- trainer alignment


@pytest.mark.parametrize("layout", ["packed", "padded", "shared_prefix"])
def test_fp8_token_alignment_changes_no_logprob_or_loss(layout, tmp_path, process_group):
    from megatron_rpt.trainer.config import OptimizerConfig, TrainConfig
    from tests.helpers.training import build_policy_trainer, random_rollout_batch

    hf_dir = save_tiny_model("qwen2", tmp_path / "m")
    batch = random_rollout_batch(VOCAB, seed=4)
    results, widths = [], {}
    for align in (1, 16):
        ts = build_policy_trainer(
            str(hf_dir),
            train=TrainConfig(max_tokens_per_microbatch=24, micro_batch_layout=layout),
            optimizer=OptimizerConfig(optimizer="sgd", lr=0.1, use_distributed_optimizer=False),
        )
        assert ts.token_alignment == 1  # no FP8 on this machine
        ts.token_alignment = align
        widths[align] = [mb.tokens.shape[1] for mb in ts._micro_batches(batch)[1]]
        assert all(w % align == 0 for w in widths[align])
        logprobs = ts.compute_logprobs(batch)
        metrics = ts.train_step(batch)
        results.append((logprobs, metrics.loss, metrics.grad_norm))
    assert widths[16] != widths[1] and all(
        a == -(-b // 16) * 16 for a, b in zip(widths[16], widths[1], strict=True)
    )
    (lp1, loss1, gn1), (lp16, loss16, gn16) = results
    for a, b in zip(lp1, lp16, strict=True):
        assert (a - b).abs().max() <= 1e-5
    assert loss16 == pytest.approx(loss1, rel=1e-5) and gn16 == pytest.approx(gn1, rel=1e-5)
