"""Everything the entry point checks and settles before it builds the model and trains.

``check_run(cfg, world_size)`` (cheap: JSON files, a tokenizer at most, no model weights, no
process group) raises ``InputError`` naming the setting for

* a model that is missing (``model.hf_path``, ``model.megatron_checkpoint``, ``rollout.model``)
  or that the parallel layout cannot split (TP must divide the attention and KV heads,
  PP x virtual stages the layers; ``build.check_parallel_fit``);
* a world size that TP x PP does not divide, or a global batch (``train.contexts_per_step`` x
  G) smaller than the data-parallel size;
* an engine this machine cannot run (``rollout.engine=sglang`` without a GPU and SGLang);
* a corpus that does not exist when the prepared data must be (re)built.

``check_memory(cfg, hf_dir, world_size)`` is the GPU preflight: the planner
(``megatron_rpt.planning``) estimates the trainer's and the colocated engine's memory per GPU
from the architecture and the config, and a run that cannot fit fails here, before any model
is built, naming the setting to change. It runs when a GPU is present (its memory is read from
the device) or when a GPU memory is stated (tests, planning on a laptop).

``data_status`` tells whether ``data.prepared_dir`` holds data prepared with the run's data
settings and the policy's tokenizer; ``ensure_prepared`` (rank 0) prepares it otherwise.
Which checkpoint a run starts or resumes from: ``checkpoint/discovery.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_rpt import capabilities
from megatron_rpt.assets import resolve_model_path
from megatron_rpt.checkpoint.discovery import policy_hf_dir
from megatron_rpt.config_utils import to_dict
from megatron_rpt.errors import ConfigError, DataError, InputError
from megatron_rpt.model.arch import read_arch

if TYPE_CHECKING:
    from megatron_rpt.config import RPTConfig
    from megatron_rpt.data.config import DataConfig
    from megatron_rpt.planning.plan import RunPlan

logger = logging.getLogger(__name__)

# DataConfig fields that do not change what prepare_data writes (read-time or speed settings).
_READ_TIME_KEYS = frozenset(
    {"prepared_dir", "entropy_batch_tokens", "entropy_device", "context_tokens",
     "continuation_tokens"}
)  # fmt: skip


def check_run(cfg: RPTConfig, world_size: int) -> Path:
    """The checks listed in the module docstring; returns the policy's HF directory."""
    from megatron_rpt.model.build import check_parallel_fit

    hf_dir = policy_hf_dir(cfg.model)
    check_parallel_fit(read_arch(hf_dir), cfg.parallel)
    p = cfg.parallel
    mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if world_size % mp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size x parallel.pipeline_model_parallel_size x "
            f"parallel.context_parallel_size = {mp} must divide the number of processes "
            f"({world_size})"
        )
    dp = world_size // mp
    check_context_parallel(cfg)
    per_step = cfg.train.contexts_per_step * (
        cfg.rollout.n_samples if cfg.train.objective == "rpt" else 1
    )
    if per_step < dp:
        raise ConfigError(
            f"train.contexts_per_step x rollout.n_samples = {per_step} sequences per step is "
            f"fewer than the {dp} data-parallel ranks: every rank needs at least one"
        )
    if cfg.train.objective == "rpt":
        if cfg.rollout.engine == "sglang" and not capabilities.have_sglang_runtime():
            raise ConfigError(
                "rollout.engine=sglang needs a CUDA GPU with SGLang installed; use "
                "rollout.engine=hf on this machine"
            )
        if cfg.rollout.model is not None:
            try:
                resolve_model_path(cfg.rollout.model)
            except InputError as exc:
                raise ConfigError(f"rollout.model: {exc}") from None
    status = data_status(cfg.data, hf_dir)
    if status != "ok":
        check_corpus(cfg.data)
    return hf_dir


def check_context_parallel(cfg: RPTConfig) -> None:
    """Context parallelism: a GPU with Transformer Engine, and a layout it composes with.

    CP splits every sequence over ``parallel.context_parallel_size`` ranks inside TE's
    attention (load-balanced chunks of each packed segment, trainer/context_parallel.py; ring
    K/V exchange). The shared-prefix layout's pieces attend to a prefix held elsewhere in the
    row, which TE's context-parallel attention cannot express; the padded layout is not split.
    """
    cp = cfg.parallel.context_parallel_size
    if cp == 1:
        return
    if not capabilities.have_te():
        raise ConfigError(
            f"parallel.context_parallel_size={cp} needs Transformer Engine attention on GPUs "
            "(model.spec=te); use 1 here, or parallel.sequence_parallel with TP for long sequences"
        )
    if cfg.model.spec == "local":
        raise ConfigError(
            f"parallel.context_parallel_size={cp} needs Transformer Engine attention: "
            "model.spec=te (or auto), not local"
        )
    # 'auto' resolves to packed on the TE spec (trainer/step.py resolve_layout)
    if cfg.train.micro_batch_layout not in ("packed", "auto"):
        raise ConfigError(
            f"parallel.context_parallel_size={cp} works with train.micro_batch_layout=packed "
            f"only, not {cfg.train.micro_batch_layout!r} (the shared-prefix layout's custom "
            "per-piece mask cannot be split by TE's context-parallel attention; the padded "
            "layout is not split over CP ranks)"
        )


def check_memory(
    cfg: RPTConfig,
    hf_dir: Path,
    world_size: int,
    *,
    gpu_memory_gib: float | None = None,
    gpus_per_node: int | None = None,
) -> RunPlan | None:
    """Refuse a run that cannot fit in GPU memory (ConfigError naming the setting).

    Returns the ``RunPlan`` (logged), or None without a GPU and without ``gpu_memory_gib``.
    ``gpus_per_node`` defaults to torchrun's ``LOCAL_WORLD_SIZE``.
    """
    import os

    from megatron_rpt.planning import ClusterSpec, PlanAssumptions, check_fit, format_plan
    from megatron_rpt.planning.cluster import GiB
    from megatron_rpt.planning.plan import plan_run

    if gpu_memory_gib is None:
        if not capabilities.have_cuda():
            return None
        import torch

        gpu_memory_gib = torch.cuda.get_device_properties(0).total_memory / GiB
    per_node = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    per_node = max(1, min(per_node, world_size))
    cluster = ClusterSpec(
        nodes=max(1, world_size // per_node), gpus_per_node=per_node, gpu_memory_gib=gpu_memory_gib
    )
    assume = PlanAssumptions()
    plan = plan_run(cfg, read_arch(hf_dir), cluster, assume)
    logger.info("memory plan (tools/plan_run.py for step times):\n%s",
                format_plan(plan, cluster, assume))  # fmt: skip
    check_fit(plan)
    return plan


def check_corpus(data: DataConfig) -> None:
    """The corpus files exist (raises naming data.corpus)."""
    from megatron_rpt.data.readers import input_files

    try:
        files = input_files(data)
    except InputError as exc:
        raise ConfigError(f"data.corpus: {exc}") from None
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        raise ConfigError(f"data.corpus: {missing[0]} does not exist")


def data_status(data: DataConfig, hf_dir: Path) -> str:
    """'ok', 'missing', or 'differs: <why>' for ``data.prepared_dir``."""
    from megatron_rpt.data.store import read_meta

    prepared = Path(data.prepared_dir)
    if not (prepared / "meta.json").is_file():
        return "missing"
    try:
        meta = read_meta(prepared)
    except DataError as exc:
        return f"differs: {exc}"
    want = {k: v for k, v in to_dict(data).items() if k not in _READ_TIME_KEYS}
    have = json.loads(json.dumps(meta.get("data_config", {})))
    changed = sorted(k for k, v in json.loads(json.dumps(want)).items() if have.get(k) != v)
    if changed:
        return "differs: data." + ", data.".join(changed)
    if meta["tokenizer"]["byte_table_blake2b"] != _tokenizer_digest(hf_dir):
        return f"differs: prepared with tokenizer {meta['tokenizer']['name_or_path']}"
    return "ok"


def _tokenizer_digest(hf_dir: Path) -> str:
    from megatron_rpt.data.tokens import ByteVocabulary, load_tokenizer

    return ByteVocabulary.from_tokenizer(load_tokenizer(str(hf_dir))).digest()


def ensure_prepared(data: DataConfig, hf_dir: Path) -> None:
    """Prepare ``data.prepared_dir`` unless it already matches (call on one rank)."""
    from megatron_rpt.data.pipeline import prepare_data

    status = data_status(data, hf_dir)
    if status == "ok":
        logger.info("using prepared data in %s", data.prepared_dir)
        return
    if status != "missing":
        logger.warning("data.prepared_dir=%s %s; preparing it again", data.prepared_dir, status)
    logger.info("preparing %s into %s ...", data.corpus, data.prepared_dir)
    summary = prepare_data(
        data, data.prepared_dir, overwrite=status != "missing", policy_tokenizer=str(hf_dir)
    )
    logger.info("prepared data:\n%s", summary.format_table(tuple(data.difficulty_thresholds)))


__all__ = [
    "check_context_parallel",
    "check_corpus",
    "check_memory",
    "check_run",
    "data_status",
    "ensure_prepared",
]
