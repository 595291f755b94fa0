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
