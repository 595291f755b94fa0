"""The RPTConfig tree: one typed dataclass per component, assembled here.

Each component's config lives next to its code (``data/config.py``, ``reward/config.py``, ...)
and documents every field with a docstring under it. Runs are configured by

1. the dataclass defaults (the paper's recipe where the paper says something),
2. a recipe function (``--recipe module:function`` or ``path/to/config.py:function``) that
   returns an ``RPTConfig`` (see examples/),
3. ``--set a.b=value`` overrides,

then ``validate`` checks cross-field rules and the resolved config is written to the run
directory as ``config.yaml``. Megatron's own argument parser is never used.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from megatron_rpt.config_utils import apply_overrides, dump_yaml, load_yaml
from megatron_rpt.data.config import DataConfig, PromptConfig, validate_data_config
from megatron_rpt.errors import ConfigError
from megatron_rpt.eval.config import EvalConfig, validate_eval_config
from megatron_rpt.loss.config import LossConfig, validate_loss_config
from megatron_rpt.model.config import (
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    check_model_config,
    check_parallel_config,
    check_precision_config,
)
from megatron_rpt.model.fp8 import training_precision
from megatron_rpt.reward.config import RewardConfig
from megatron_rpt.reward.registry import get_reward
from megatron_rpt.reward.scoring import check_reward_for_mode
from megatron_rpt.rollout.config import RolloutConfig
from megatron_rpt.trainer.config import (
    CheckpointConfig,
    OptimizerConfig,
    TrainConfig,
    validate_trainer_configs,
)
from megatron_rpt.trainer.rlp_config import RLPConfig, validate_rlp_config
from megatron_rpt.trainer.run_logger import LogConfig
from megatron_rpt.weight_sync.config import WeightSyncConfig, validate_weight_sync_config
from megatron_rpt.weight_sync.fp8 import rollout_precision

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RunConfig:
    """Where a run writes and how it is seeded."""

    run_dir: str = "runs/rpt"
    """Directory for the resolved config, checkpoints, metrics and exports."""
    seed: int = 1234
    """Global seed (data order, sampling, initialisation)."""
    name: str = "rpt"
    """Run name used in logs and wandb."""


@dataclass(kw_only=True)
class RPTConfig:
    """The whole configuration of an RPT run."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    rlp: RLPConfig = field(default_factory=RLPConfig)


# ----------------------------------------------------------------------------- validation

Rule = Callable[[RPTConfig], None]
_RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    """Register a cross-field validation rule (raises ConfigError naming the field)."""
    _RULES.append(fn)
    return fn


@rule
def _check_loss(cfg: RPTConfig) -> None:
    validate_loss_config(cfg.loss, prefix="loss")


@rule
def _check_model(cfg: RPTConfig) -> None:
    # Architecture-dependent checks (TP vs heads, PP vs layers) run when the model is built.
    check_model_config(cfg.model)
    check_parallel_config(cfg.parallel)


@rule
def _check_data(cfg: RPTConfig) -> None:
    validate_data_config(cfg.data)


@rule
def _check_eval(cfg: RPTConfig) -> None:
    validate_eval_config(cfg.eval)


@rule
def _check_rollout(cfg: RPTConfig) -> None:
    r = cfg.rollout
    if r.n_samples < 1:
        raise ConfigError("rollout.n_samples must be >= 1")
    if not math.isfinite(r.temperature) or r.temperature < 0:
        raise ConfigError(f"rollout.temperature must be a finite number >= 0, got {r.temperature}")
    if not 0 < r.top_p <= 1:
        raise ConfigError("rollout.top_p must be in (0, 1]")
    if r.max_new_tokens < 1:
        raise ConfigError("rollout.max_new_tokens must be >= 1")
    if r.max_batch_rows < 1:
        raise ConfigError("rollout.max_batch_rows must be >= 1")
    if r.engine == "hf" and r.mode != "colocated":
        raise ConfigError("rollout.mode=disaggregated needs rollout.engine=sglang")
    if not 0 < r.sglang.mem_fraction_static < 1:
        raise ConfigError("rollout.sglang.mem_fraction_static must be in (0, 1)")
    if r.sglang.tp_size < 1 or r.sglang.bucket_bytes < 1 or r.sglang.max_unfenced_buckets < 1:
        raise ConfigError(
            "rollout.sglang.tp_size, bucket_bytes and max_unfenced_buckets must be >= 1"
        )
    if not r.timeout_s > 0:
        raise ConfigError(f"rollout.timeout_s must be > 0, got {r.timeout_s}")
    if r.max_restarts < 0:
        raise ConfigError(f"rollout.max_restarts must be >= 0, got {r.max_restarts}")
    for name in ("gpus_per_engine", "block_contexts"):
        if getattr(r, name) is not None and getattr(r, name) < 1:
            raise ConfigError(f"rollout.{name} must be >= 1 (or None), got {getattr(r, name)}")
    if r.engine_gpu_offset < 0:
        raise ConfigError(f"rollout.engine_gpu_offset must be >= 0, got {r.engine_gpu_offset}")


@rule
def _check_weight_sync(cfg: RPTConfig) -> None:
    validate_weight_sync_config(cfg.weight_sync)


@rule
def _check_trainer(cfg: RPTConfig) -> None:
    validate_trainer_configs(cfg.optimizer, cfg.train, cfg.checkpoint)
    if cfg.optimizer.optimizer == "sgd" and cfg.optimizer.use_distributed_optimizer:
        raise ConfigError(
            "optimizer.optimizer=sgd needs optimizer.use_distributed_optimizer=false "
            "(Megatron's DistributedOptimizer supports Adam only)"
        )
    if cfg.rollout.temperature == 0:
        raise ConfigError(
            "rollout.temperature=0 (greedy) cannot be trained on: the policy gradient needs "
            "the log-probs of softmax(logits / T) with T > 0"
        )


@rule
def _check_objective(cfg: RPTConfig) -> None:
    if cfg.train.objective == "rpt":
        if cfg.rollout.n_samples < 2:
            raise ConfigError(
                f"rollout.n_samples={cfg.rollout.n_samples}: GRPO compares the G responses to a "
                "context with each other, so G must be >= 2 (a group of one has advantage 0)"
            )
        if cfg.reward.name in ("dense", "conditional_dense"):
            raise ConfigError(
                f"reward.name={cfg.reward.name} needs the policy's first-token probabilities, "
                "which the training loop does not compute; use prefix_match or first_token"
            )
        return
    if cfg.train.objective == "rlp":
        _check_rlp(cfg)
        return
    loss = cfg.loss
    if getattr(loss, "tis", None) is None:  # "auto" (where it exists): NTP has no rollouts
        loss.tis = False
    if loss.kl_coef or loss.entropy_coef or loss.tis or loss.aggregation != "token_mean":
        raise ConfigError(
            "train.objective=ntp is plain cross-entropy: it needs loss.kl_coef=0, "
            "loss.entropy_coef=0, loss.tis=false and loss.aggregation=token_mean"
        )


def _check_rlp(cfg: RPTConfig) -> None:
    validate_rlp_config(cfg.rlp)
    loss = cfg.loss
    bad = [
        (cfg.rollout.n_samples >= 2, f"rollout.n_samples={cfg.rollout.n_samples}",
         "needs G >= 2 (the advantage compares the G thoughts of a context)"),
        (loss.kl_coef == 0, f"loss.kl_coef={loss.kl_coef}", "must be 0 (RLP uses no KL term)"),
        (loss.aggregation == "seq_mean_token_mean", f"loss.aggregation={loss.aggregation}",
         "must be seq_mean_token_mean (each thought's loss is normalised by its length)"),
        (not loss.dynamic_sampling, "loss.dynamic_sampling=true", "is not supported by rlp"),
    ]  # fmt: skip
    for ok, setting, what in bad:
        if not ok:
            raise ConfigError(
                f"train.objective=rlp: {setting} {what}; apply_rlp_recipe "
                "(megatron_rpt.trainer.rlp_config) or examples/rlp sets RLP's recipe"
            )


@rule
def _check_prompt_mode(cfg: RPTConfig) -> None:
    if cfg.prompt.mode != "completion":
        return

    check_reward_for_mode(cfg.reward.name, cfg.prompt.mode)
    if cfg.rollout.stop_at_final_box:
        raise ConfigError(
            "rollout.stop_at_final_box=true has no box to stop at with prompt.mode=completion "
            "(the response is the next token(s)); set it false"
        )


@rule
def _check_precision(cfg: RPTConfig) -> None:
    check_precision_config(cfg.precision)
    if cfg.precision.fp8 != "none" and cfg.model.spec == "local":
        raise ConfigError(
            f"precision.fp8={cfg.precision.fp8} needs the Transformer Engine layer spec; "
            "model.spec=local cannot run FP8 (use te or auto)"
        )
    if cfg.precision.rollout_fp8 and cfg.rollout.engine == "hf":
        if cfg.weight_sync.verify in ("checksum", "full"):
            raise ConfigError(
                f"weight_sync.verify={cfg.weight_sync.verify} cannot check FP8 rollout weights on "
                "the HF engine (it holds them dequantized); use weight_sync.verify=probe"
            )
    resolve_tis(cfg)


def resolve_tis(cfg: RPTConfig) -> RPTConfig:
    """Set ``loss.tis`` when it is None: on when rollout and training precisions differ."""
    if cfg.loss.tis is not None:
        return cfg

    train = training_precision(cfg.model.dtype, cfg.precision)
    rollout = rollout_precision(cfg.rollout, cfg.precision)
    cfg.loss.tis = rollout != train
    logger.info(
        "loss.tis resolved to %s: training computes in %s, the rollout engine in %s%s",
        cfg.loss.tis, train, rollout or "an unknown precision (dtype 'auto')",
        f" (token TIS, cap {cfg.loss.tis_cap})" if cfg.loss.tis else "",
    )  # fmt: skip
    return cfg


def validate(cfg: RPTConfig) -> RPTConfig:
    """Run every registered rule; the first failure raises ConfigError."""
    for check in _RULES:
        check(cfg)

    get_reward(cfg.reward.name)
    return cfg


# ----------------------------------------------------------------------------- recipes


def load_recipe(spec: str) -> Callable[[], RPTConfig]:
    """Resolve ``module.path:function`` or ``path/to/file.py:function`` to a recipe function."""
    if ":" not in spec:
        raise ConfigError(f"--recipe {spec!r}: expected 'module:function' or 'file.py:function'")
    target, fn_name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"--recipe: recipe file {path} not found")
        mod_spec = importlib.util.spec_from_file_location(f"_rpt_recipe_{path.stem}", path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"--recipe {spec!r}: cannot import {target}: {exc}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"--recipe {spec!r}: {target} has no function {fn_name}")
    return fn


def build_config(
    recipe: str | None = None,
    overrides: Iterable[str] = (),
    yaml_file: str | Path | None = None,
) -> RPTConfig:
    """Defaults -> recipe -> YAML file -> overrides -> validate."""
    cfg = load_recipe(recipe)() if recipe else RPTConfig()
    if not isinstance(cfg, RPTConfig):
        raise ConfigError(f"--recipe {recipe!r} returned {type(cfg).__name__}, not RPTConfig")
    if yaml_file is not None:
        load_yaml(cfg, yaml_file)
    apply_overrides(cfg, overrides)
    return validate(cfg)


def save_config(cfg: RPTConfig, run_dir: str | Path) -> Path:
    """Write the resolved config to ``<run_dir>/config.yaml`` and return the path."""
    path = Path(run_dir) / "config.yaml"
    dump_yaml(cfg, path)
    return path


def replace(cfg: RPTConfig) -> RPTConfig:
    """A deep copy (recipes derive from each other by copying and mutating)."""
    return dataclasses.replace(
        cfg, **{f.name: _deepcopy(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    )


def _deepcopy(obj):  # noqa: ANN001, ANN202
    import copy

    return copy.deepcopy(obj)
