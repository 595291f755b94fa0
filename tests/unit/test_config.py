"""Config tree: overrides, YAML round trip, validation errors that name the key, recipes."""

from pathlib import Path

import pytest

from megatron_rpt.config import RPTConfig, build_config, save_config, validate
from megatron_rpt.config_utils import (
    apply_overrides,
    describe,
    field_docs,
    load_yaml,
    to_dict,
)
from megatron_rpt.data.config import DataConfig
from megatron_rpt.errors import ConfigError


def test_overrides_convert_to_declared_types():
    cfg = apply_overrides(
        RPTConfig(),
        [
            "data.entropy_top_k=8",
            "data.entropy_threshold=1e-1",
            "data.difficulty_thresholds=[0.25, 0.5, 2]",
            "prompt.template=v3",
            "prompt.chat_template=false",
            "data.tokenizer=none",
            "reward.require_think_close=no",
        ],
    )
    assert cfg.data.entropy_top_k == 8
    assert cfg.data.entropy_threshold == pytest.approx(0.1)
    assert cfg.data.difficulty_thresholds == (0.25, 0.5, 2.0)
    assert cfg.prompt.template == "v3"
    assert cfg.prompt.chat_template is False
    assert cfg.data.tokenizer is None
    assert cfg.reward.require_think_close is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.entropy_top_k=abc", "data.entropy_top_k: expected an integer"),
        ("prompt.template=v9", "prompt.template: 'v9' is not one of"),
        ("prompt.chat_template=maybe", "expected true/false"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("data.entropy_treshold=1", "did you mean 'data.entropy_threshold'"),
        ("data", "not of the form key=value"),
        ("data.corpus.x=1", "'data.corpus' is not a section"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        apply_overrides(RPTConfig(), [override])


def test_yaml_round_trip(tmp_path: Path):
    cfg = apply_overrides(RPTConfig(), ["run.seed=5", "data.difficulty_thresholds=[0.1,0.2,0.3]"])
    path = save_config(cfg, tmp_path)
    loaded = load_yaml(RPTConfig(), path)
    assert to_dict(loaded) == to_dict(cfg)


def test_yaml_unknown_key_names_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  entropy_topk: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'data.entropy_topk'"):
        load_yaml(RPTConfig(), bad)


def test_validation_rules():
    cfg = apply_overrides(RPTConfig(), ["data.difficulty_thresholds=[1.0,0.5,1.5]"])
    with pytest.raises(ConfigError, match="difficulty_thresholds"):
        validate(cfg)
    cfg = apply_overrides(RPTConfig(), ["reward.name=bogus"])
    with pytest.raises(ConfigError, match="reward.name: unknown reward 'bogus'"):
        validate(cfg)


def test_every_field_is_documented():
    """Attribute docstrings are the CLI help: every leaf field must have one."""
    missing = [key for key, _, _, doc in describe(RPTConfig()) if not doc]
    assert not missing, f"fields without a docstring: {missing}"
    assert "top-k" in field_docs(DataConfig)["entropy_top_k"]


def test_recipe_from_file(tmp_path: Path):
    recipe = tmp_path / "my_recipe.py"
    recipe.write_text(
        "from megatron_rpt.config import RPTConfig\n"
        "def small():\n"
        "    cfg = RPTConfig()\n"
        "    cfg.data.entropy_top_k = 4\n"
        "    return cfg\n"
    )
    cfg = build_config(f"{recipe}:small", ["run.seed=3"])
    assert cfg.data.entropy_top_k == 4 and cfg.run.seed == 3
    with pytest.raises(ConfigError, match="has no function nope"):
        build_config(f"{recipe}:nope")


def test_atomic_write_has_normal_permissions(tmp_path: Path):
    import os
    import stat

    from megatron_rpt.fileio import atomic_write_text

    atomic_write_text(tmp_path / "x.txt", "hi")
    plain = tmp_path / "plain.txt"
    plain.write_text("hi")
    mode = stat.S_IMODE(os.stat(tmp_path / "x.txt").st_mode)
    assert mode == stat.S_IMODE(os.stat(plain).st_mode)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_numbers_are_refused(value):
    from megatron_rpt.errors import ConfigError

    with pytest.raises(
        ConfigError, match=rf"rollout.temperature: expected a finite number, got '{value}'"
    ):
        build_config(overrides=[f"rollout.temperature={value}"])


def test_non_finite_temperature_from_a_recipe_is_refused():
    from megatron_rpt.errors import ConfigError

    cfg = RPTConfig()
    cfg.rollout.temperature = float("inf")
    with pytest.raises(ConfigError, match="rollout.temperature must be a finite number"):
        validate(cfg)


def test_binary_config_file_is_one_error(tmp_path):
    from megatron_rpt.config_utils import load_yaml
    from megatron_rpt.errors import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match="bad.yaml: not a UTF-8 text file"):
        load_yaml(RPTConfig(), bad)


# ----------------------------------------------------------------------------- validate / resolve


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["train.objective=ntp", "loss.kl_coef=0"],
        ["precision.rollout_fp8=true", "model.dtype=bf16", "rollout.dtype=fp32"],
        ["prompt.mode=completion", "rollout.stop_at_final_box=false"],
    ],
)
def test_validate_does_not_change_the_config(overrides):
    import copy

    cfg = apply_overrides(RPTConfig(), overrides)
    before = copy.deepcopy(cfg)
    assert validate(cfg) is cfg and cfg == before  # loss.tis, layout and dtypes untouched


def test_resolve_settles_derived_values_in_a_copy():
    from megatron_rpt import capabilities
    from megatron_rpt.config import resolve

    cfg = validate(apply_overrides(RPTConfig(), ["model.dtype=bf16", "weight_sync.dtype=fp16"]))
    resolved = resolve(cfg)
    assert cfg.loss.tis is None and cfg.train.micro_batch_layout == "auto"  # input untouched
    assert cfg.model.dtype == "bf16" and cfg.rollout.block_contexts is None
    assert resolved.loss.tis is True  # the bf16 trainer vs the fp32 HF engine
    layout = "packed" if capabilities.have_te() else "shared_prefix"
    assert resolved.train.micro_batch_layout == layout
    assert resolved.rollout.block_contexts == resolved.rollout.max_batch_rows // 8
    assert (resolved.model.dtype, resolved.weight_sync.dtype) == ("bfloat16", "float16")
    assert resolve(resolved) == resolved and validate(resolved) == resolved
    ntp = resolve(validate(apply_overrides(RPTConfig(), ["train.objective=ntp"])))
    assert ntp.loss.tis is False  # no rollouts to correct


def test_resolved_config_round_trips_through_config_yaml(tmp_path: Path):
    from megatron_rpt.config import resolve

    resolved = resolve(build_config(overrides=["train.micro_batch_layout=padded"]))
    path = save_config(resolved, tmp_path)
    assert load_yaml(RPTConfig(), path) == resolved
    assert "tis: true" in path.read_text() and "micro_batch_layout: padded" in path.read_text()


def test_dtype_fields_take_both_spellings():
    from megatron_rpt.config import resolve
    from megatron_rpt.dtypes import canonical_dtype, dtype_name, short_dtype, torch_dtype

    short = ["model.dtype=fp32", "rollout.dtype=bf16", "data.entropy_dtype=bf16",
             "eval.dtype=fp16", "weight_sync.dtype=bf16"]  # fmt: skip
    long = ["model.dtype=float32", "rollout.dtype=bfloat16", "data.entropy_dtype=bfloat16",
            "eval.dtype=float16", "weight_sync.dtype=bfloat16"]  # fmt: skip
    a = resolve(build_config(overrides=short))
    assert a == resolve(build_config(overrides=long))
    assert (a.model.dtype, a.rollout.dtype, a.eval.dtype) == ("float32", "bfloat16", "float16")
    for name in ("float32", "bfloat16", "float16"):
        assert torch_dtype(name) == torch_dtype(short_dtype(name))
        assert dtype_name(torch_dtype(name)) == name == canonical_dtype(short_dtype(name))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model", "int8", "model.dtype: 'int8' is not a dtype"),
        ("model", "float16", "model.dtype: 'float16' is not one of"),
        ("data", "fp16", "data.entropy_dtype: 'fp16' is not one of"),
    ],
)
def test_a_recipe_dtype_outside_the_vocabulary_names_the_field(field, value, message):
    cfg = RPTConfig()
    setattr(cfg.model if field == "model" else cfg.data,
            "dtype" if field == "model" else "entropy_dtype", value)  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_virtual_stages_at_two_pipeline_stages_are_refused_before_any_model():
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size >= 3 for training"):
        build_config(
            overrides=[
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2",
            ]
        )
