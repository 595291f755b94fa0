"""The RPTConfig tree: one typed dataclass per component, assembled here.

Each component's config lives next to its code (``data/config.py``, ``reward/config.py``, ...)
and documents every field with a docstring under it. Runs are configured by

1. the dataclass defaults (the paper's recipe where the paper says something),
2. a recipe function (``--recipe module:function`` or ``path/to/config.py:function``) that
   returns an ``RPTConfig`` (see examples/),
3. ``--set a.b=value`` overrides,

then ``validate`` checks cross-field rules without changing anything, and ``resolve`` (run
once by the entry point) returns a copy with every derived value settled (``loss.tis``,
``train.micro_batch_layout=auto``, ``rollout.block_contexts``, the dtype spellings); that copy
is logged and written to the run directory as ``config.yaml``. ``build_config`` is the one
pipeline (defaults -> recipe -> YAML -> ``--set`` -> ``--init-from`` -> validate) the entry
point, the tools and the tests share. Megatron's own argument parser is never used.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from megatron_rpt.checkpoint.discovery import init_source
from megatron_rpt.config_utils import apply_overrides, dump_yaml, load_yaml
from megatron_rpt.data.config import DataConfig, PromptConfig, validate_data_config
from megatron_rpt.dtypes import canonical_dtype
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
from megatron_rpt.rollout.config import RolloutConfig, validate_rollout_config
from megatron_rpt.trainer.config import (
    CheckpointConfig,
    OptimizerConfig,
    TrainConfig,
    check_interleaved_schedule,
    resolve_layout,
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
    p = cfg.parallel
    check_interleaved_schedule(
        p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    )


# Config fields naming a dtype, and the dtypes each supports (one vocabulary: megatron_rpt.dtypes).
_DTYPE_FIELDS = {
    "model.dtype": ("float32", "bfloat16"),
    "rollout.dtype": ("float32", "bfloat16", "float16"),
    "data.entropy_dtype": ("float32", "bfloat16"),
    "eval.dtype": ("float32", "bfloat16", "float16"),
}


def _get(cfg: RPTConfig, dotted: str) -> object:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg: RPTConfig, dotted: str, value: object) -> None:
    section, name = dotted.split(".")
    setattr(getattr(cfg, section), name, value)


@rule
def _check_dtypes(cfg: RPTConfig) -> None:
    for key, supported in _DTYPE_FIELDS.items():
        if canonical_dtype(_get(cfg, key), key) not in supported:  # type: ignore[arg-type]
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {list(supported)}")


@rule
def _check_data(cfg: RPTConfig) -> None:
    validate_data_config(cfg.data)


@rule
def _check_eval(cfg: RPTConfig) -> None:
    validate_eval_config(cfg.eval)


@rule
def _check_rollout(cfg: RPTConfig) -> None:
    validate_rollout_config(cfg.rollout)


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
    loss = cfg.loss  # loss.tis=None resolves to false here: NTP has no rollouts
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


def validate(cfg: RPTConfig) -> RPTConfig:
    """Run every registered rule; the first failure raises ConfigError. ``cfg`` is not
    changed (derived values are ``resolve``'s job)."""
    for check in _RULES:
        check(cfg)

    get_reward(cfg.reward.name)
    return cfg


# ----------------------------------------------------------------------------- resolution


def resolve(cfg: RPTConfig) -> RPTConfig:
    """A copy of a validated ``cfg`` with every derived value settled (logged); idempotent.

    * ``loss.tis`` None: false for NTP (no rollouts), else on when the rollout engine's
      precision differs from the trainer's (``resolve_tis``);
    * ``train.micro_batch_layout=auto``: shared_prefix on the local layer spec, packed on TE
      (the spec ``model.spec=auto`` gets on this machine);
    * ``rollout.block_contexts`` None: ``rollout.max_batch_rows // rollout.n_samples`` (>= 1);
    * dtype fields (``model.dtype``, ``rollout.dtype``, ``data.entropy_dtype``, ``eval.dtype``,
      ``weight_sync.dtype``) in torch's spelling (``bf16`` -> ``bfloat16``, megatron_rpt.dtypes).
    """
    out = copy.deepcopy(cfg)
    for key in _DTYPE_FIELDS:
        _set(out, key, canonical_dtype(_get(out, key), key))  # type: ignore[arg-type]
    if out.weight_sync.dtype != "model":  # 'model': the trainer's parameter dtype
        _set(out, "weight_sync.dtype", canonical_dtype(out.weight_sync.dtype, "weight_sync.dtype"))
    out.loss.tis = resolve_tis(out)
    out.train.micro_batch_layout = _resolve_layout(out)
    r = out.rollout
    r.block_contexts = r.block_contexts or max(1, r.max_batch_rows // r.n_samples)
    keys = [
        f"{s.name}.{f.name}"
        for s in dataclasses.fields(out)
        for f in dataclasses.fields(getattr(out, s.name))
    ]
    changed = [f"{k}={_get(out, k)}" for k in keys if _get(cfg, k) != _get(out, k)]
    if changed:
        logger.info("resolved: %s", ", ".join(changed))
    return out


def resolve_tis(cfg: RPTConfig) -> bool:
    """``loss.tis``, or when it is None: on when rollout and training precisions differ (logged)."""
    if cfg.loss.tis is not None:
        return cfg.loss.tis
    if cfg.train.objective == "ntp":
        return False

    train = training_precision(cfg.model.dtype, cfg.precision)
    rollout = rollout_precision(cfg.rollout, cfg.precision)
    tis = rollout != train
    logger.info(
        "loss.tis resolved to %s: training computes in %s, the rollout engine in %s%s",
        tis, train, rollout or "an unknown precision (dtype 'auto')",
        f" (token TIS, cap {cfg.loss.tis_cap})" if tis else "",
    )  # fmt: skip
    return tis


def _resolve_layout(cfg: RPTConfig) -> str:
    """``train.micro_batch_layout`` for the layer spec ``model.spec`` gets here."""
    from megatron_rpt import capabilities

    spec = cfg.model.spec
    if spec == "auto":  # as model/specs.py decides it; an unusable 'te' fails at build time
        spec = "te" if capabilities.have_te() else "local"
    return resolve_layout(cfg.train.micro_batch_layout, spec)


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
    *,
    init_from: str | None = None,
    check: bool = True,
) -> RPTConfig:
    """Defaults -> recipe -> YAML file -> overrides -> ``--init-from`` -> validate.

    The one pipeline from command-line arguments to a config (entry point, tools, tests).
    ``check=False`` skips validation (``--help-config`` lists a config being written).
    """
    cfg = load_recipe(recipe)() if recipe else RPTConfig()
    if not isinstance(cfg, RPTConfig):
        raise ConfigError(f"--recipe {recipe!r} returned {type(cfg).__name__}, not RPTConfig")
    if yaml_file is not None:
        load_yaml(cfg, yaml_file)
    apply_overrides(cfg, overrides)
    if init_from:
        apply_init_from(cfg, init_from)
    return validate(cfg) if check else cfg


def apply_init_from(cfg: RPTConfig, path: str) -> None:
    """An HF directory sets model.hf_path; anything else must be a Megatron checkpoint
    (``checkpoint.discovery.init_source`` decides, or names what is wrong)."""
    p = Path(path).expanduser()
    if init_source(path) == "hf":
        cfg.model.hf_path, cfg.model.megatron_checkpoint = str(p), None
    else:
        cfg.model.megatron_checkpoint = str(p)


def save_config(cfg: RPTConfig, run_dir: str | Path) -> Path:
    """Write the resolved config to ``<run_dir>/config.yaml`` and return the path."""
    path = Path(run_dir) / "config.yaml"
    dump_yaml(cfg, path)
    return path
