"""``plan_run``: per-GPU memory and step time of an ``RPTConfig`` on a ``ClusterSpec``.

Memory is checked for two ways of sharing a GPU between the trainer and a colocated engine:

* **with the hand-off** (engine memory released during training, trainer state moved to the
  host during rollout): the peak is the largest phase: training (trainer states +
  activations + log-prob buffers), rollout (engine weights + its KV cache pool, bounded by
  ``rollout.sglang.mem_fraction_static``), weight sync (trainer parameters + engine weights);
* **without** (both resident): trainer states + activations + engine weights + KV pool.

The KV pool must hold at least one group, G x (prompt + response) tokens; how many sequences
it holds sets the engine's concurrency (timing.py). ``check_fit`` raises a ``ConfigError``
naming the setting to change when the trainer or the engine cannot fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_rpt.checkpoint.discovery import policy_hf_dir
from megatron_rpt.config import RPTConfig
from megatron_rpt.dtypes import canonical_dtype
from megatron_rpt.errors import ConfigError
from megatron_rpt.model.arch import ArchSpec, read_arch
from megatron_rpt.model.flops import ModelFlops
from megatron_rpt.planning import timing
from megatron_rpt.planning.cluster import ClusterSpec, GiB, PlanAssumptions
from megatron_rpt.planning.memory import (
    EngineMemory,
    ParamCounts,
    TrainerMemory,
    TrainerShape,
    engine_memory,
    trainer_memory,
)


@dataclass
class RunPlan:
    """What ``plan_run`` estimates (bytes per GPU, seconds per step)."""

    trainer: TrainerMemory
    engine: EngineMemory
    engines: int
    gpus_per_engine: int
    kv_pool_handoff: int
    kv_pool_resident: int
    peak_handoff: int
    peak_resident: int
    time: timing.StepTime
    usable: int
    """GPU memory minus the stated overhead."""
    shape: TrainerShape
    problems: list[tuple[str, str]] = field(default_factory=list)
    """(setting to change, why) for every way the plan does not fit, handoff first."""

    @property
    def fits(self) -> bool:
        """The hand-off plan fits (the colocated loop's mode)."""
        return not self.problems


def gpus_per_engine(cfg: RPTConfig) -> int:
    """``rollout.gpus_per_engine`` when the config has it, else the trainer's TP."""
    value = getattr(cfg.rollout, "gpus_per_engine", None)
    return int(value or cfg.parallel.tensor_model_parallel_size)


def padded_vocab(arch: ArchSpec, cfg: RPTConfig) -> int:
    """Megatron's padded vocabulary for the config's TP (as model/build.py pads it)."""
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor_model_parallel_size
    return -(-arch.vocab_size // multiple) * multiple


def workload(cfg: RPTConfig, assume: PlanAssumptions) -> timing.Workload:
    """One step's sequences from the data, rollout and train settings."""
    rpt = cfg.train.objective == "rpt"
    max_r = cfg.rollout.max_new_tokens if rpt else cfg.data.continuation_tokens
    return timing.Workload(
        contexts=cfg.train.contexts_per_step,
        samples=cfg.rollout.n_samples if rpt else 1,
        prompt_tokens=cfg.data.context_tokens + (assume.prompt_template_tokens if rpt else 0),
        max_response_tokens=max_r,
        mean_response_tokens=max_r * assume.mean_response_fraction if rpt else max_r,
        shared_prefix=cfg.train.micro_batch_layout in ("auto", "shared_prefix"),
    )


@dataclass(frozen=True)
class MicroBatching:
    """How the token budget cuts a step (responses of the maximum or the mean length)."""

    tokens: int
    """Tokens of the largest micro-batch."""
    response_tokens: int
    count: int
    """Micro-batches per DP rank."""
    prompt_passes: int
    """Times a group's prompt is computed."""


def micro_batching(work: timing.Workload, budget: int, dp: int, mean: bool) -> MicroBatching:
    """Micro-batches of the step under ``train.max_tokens_per_microbatch = budget``."""
    p = work.prompt_tokens
    r = work.mean_response_tokens if mean else work.max_response_tokens
    if work.shared_prefix:
        per_mb = min(max(1, int((budget - p) // r)) if budget > p else 1, work.samples)
        mbs_per_group = math.ceil(work.samples / per_mb)
        count = math.ceil(work.contexts * mbs_per_group / dp)
        return MicroBatching(int(p + per_mb * r), int(per_mb * r), count, mbs_per_group)
    per_mb = max(1, int(budget // (p + r)))
    count = math.ceil(work.contexts * work.samples / per_mb / dp)
    return MicroBatching(int(per_mb * (p + r)), int(per_mb * r), count, work.samples)


def trainer_shape(cfg: RPTConfig, world: int, work: timing.Workload) -> TrainerShape:
    """The trainer settings memory depends on, from the config and the world size."""
    p = cfg.parallel
    tp, pp, cp = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
    )
    if world % (tp * pp * cp):
        raise ConfigError(
            f"TP x PP x CP = {tp * pp * cp} (parallel.*) must divide the {world} GPUs"
        )
    dp = world // (tp * pp * cp)
    mb = micro_batching(work, cfg.train.max_tokens_per_microbatch, dp, mean=False)
    return TrainerShape(
        tp=tp,
        pp=pp,
        cp=cp,
        dp=dp,
        sequence_parallel=p.sequence_parallel,
        param_bytes=2 if canonical_dtype(cfg.model.dtype) == "bfloat16" else 4,
        distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        optimizer=cfg.optimizer.optimizer,
        sgd_momentum=cfg.optimizer.sgd_momentum,
        recompute=cfg.model.recompute_granularity,
        microbatch_tokens=mb.tokens,
        microbatches=mb.count,
        response_tokens=mb.response_tokens,
        logprob_chunk=cfg.loss.logprob_chunk_size,
        spec="local" if cfg.model.spec == "local" else "te",
    )


def plan_run(
    cfg: RPTConfig,
    arch: ArchSpec,
    cluster: ClusterSpec,
    assume: PlanAssumptions | None = None,
    *,
    engines: int | None = None,
) -> RunPlan:
    """Estimate memory and step time (module docstring); ``engines`` defaults to one engine
    per ``gpus_per_engine`` GPUs over the whole cluster."""
    assume = assume or PlanAssumptions()
    cluster.check()
    assume.check()
    work = workload(cfg, assume)
    shape = trainer_shape(cfg, cluster.world_size, work)
    g = gpus_per_engine(cfg)
    n_engines = engines if engines is not None else max(1, cluster.world_size // g)
    if n_engines < 1 or n_engines * g > cluster.world_size:
        raise ConfigError(
            f"{n_engines} engines x {g} GPUs (rollout.gpus_per_engine) do not fit on "
            f"{cluster.world_size} GPUs"
        )
    trainer = trainer_memory(arch, shape, padded_vocab(arch, cfg))
    weight_bytes = 2 if canonical_dtype(cfg.rollout.dtype) in ("bfloat16", "float16") else 4
    if cfg.precision.rollout_fp8:
        weight_bytes = 1
    seq_tokens = work.prompt_tokens + work.max_response_tokens
    engine = engine_memory(
        arch,
        gpus_per_engine=g,
        weight_bytes=weight_bytes,
        kv_bytes=weight_bytes if weight_bytes > 1 else 2,
        kv_tokens=math.ceil(work.contexts / n_engines) * work.samples * seq_tokens,
    )
    usable = int((cluster.gpu_memory_gib - assume.overhead_gib) * GiB)
    static = int(cfg.rollout.sglang.mem_fraction_static * cluster.gpu_memory_gib * GiB)
    pool_handoff = max(0, min(static, usable) - engine.weights)
    pool_resident = max(0, static - engine.weights)
    counts = ParamCounts.from_arch(arch)
    peak_handoff = max(
        trainer.total, engine.weights + min(pool_handoff, engine.kv_cache),
        trainer.params + engine.weights,
    )  # fmt: skip
    peak_resident = trainer.total + engine.weights + min(pool_resident, engine.kv_cache)
    concurrent = pool_handoff // max(engine.kv_bytes_per_token * seq_tokens, 1)
    flops = ModelFlops.from_arch(arch)
    mean_mb = micro_batching(work, cfg.train.max_tokens_per_microbatch, shape.dp, mean=True)
    total_flops = timing.train_flops(
        flops, work, prompt_passes=mean_mb.prompt_passes, recompute=shape.recompute == "full",
        extra=assume.extra_forward_passes,
    )  # fmt: skip
    step = timing.StepTime(
        rollout_s=timing.rollout_seconds(
            flops, work, cluster, assume, engines=n_engines, gpus_per_engine=g,
            concurrent_sequences=int(concurrent),
        ),
        train_s=timing.train_seconds(
            total_flops, cluster, assume, pp=shape.pp,
            vpp=cfg.parallel.virtual_pipeline_model_parallel_size, microbatches=mean_mb.count,
        ),
        sync_s=timing.sync_seconds(
            counts.total * weight_bytes, cluster, assume,
            model_parallel_gpus=shape.tp * shape.pp, gpus_per_engine=g,
        ),
        generated_tokens=int(work.contexts * work.samples * work.mean_response_tokens),
        train_flops=total_flops,
        sync_bytes=counts.total * weight_bytes,
        concurrent_sequences=int(concurrent),
    )  # fmt: skip
    plan = RunPlan(
        trainer, engine, n_engines, g, pool_handoff, pool_resident, peak_handoff,
        peak_resident, step, usable, shape,
    )  # fmt: skip
    plan.problems = _problems(plan, cfg, work)
    return plan


def _problems(plan: RunPlan, cfg: RPTConfig, work: timing.Workload) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    gib = _gib
    if plan.trainer.total > plan.usable:
        out.append((
            _trainer_remedy(cfg, plan.shape),
            f"the trainer needs {gib(plan.trainer.total)} GiB per GPU (states "
            f"{gib(plan.trainer.states)}, activations {gib(plan.trainer.activations)}, backward "
            f"{gib(max(plan.trainer.backward_working, plan.trainer.logprob_buffers))}) of "
            f"{gib(plan.usable)} usable",
        ))  # fmt: skip
    if cfg.train.objective == "rpt" and cfg.rollout.mode == "colocated":
        group = (
            plan.engine.kv_bytes_per_token
            * work.samples
            * (work.prompt_tokens + work.max_response_tokens)
        )
        if plan.engine.weights + group > plan.usable or plan.kv_pool_handoff < group:
            out.append((
                "rollout.gpus_per_engine (or rollout.sglang.mem_fraction_static)",
                f"the engine's weights ({gib(plan.engine.weights)} GiB per GPU) and the KV cache "
                f"of one group of {work.samples} x {work.prompt_tokens + work.max_response_tokens}"
                f" tokens ({gib(group)} GiB) do not fit in the engine's memory "
                f"({gib(min(plan.usable, int(cfg.rollout.sglang.mem_fraction_static * (plan.usable))))} GiB)",
            ))  # fmt: skip
        if plan.peak_handoff > plan.usable and not out:
            out.append((
                "model.recompute_granularity / parallel.tensor_model_parallel_size",
                f"weight sync holds the trainer's parameters and the engine's weights together "
                f"({gib(plan.peak_handoff)} GiB of {gib(plan.usable)})",
            ))  # fmt: skip
    return out


def _trainer_remedy(cfg: RPTConfig, shape: TrainerShape) -> str:
    """The first setting worth changing, in the order a Megatron user would try them."""
    if shape.recompute != "full":
        return "model.recompute_granularity=full"
    if shape.tp > 1 and not shape.sequence_parallel:
        return "parallel.sequence_parallel=true"
    if not shape.distributed_optimizer and shape.dp > 1:
        return "optimizer.use_distributed_optimizer=true"
    if shape.microbatches > 1 or shape.microbatch_tokens > cfg.train.max_tokens_per_microbatch:
        return "train.max_tokens_per_microbatch (smaller) or parallel.pipeline_model_parallel_size"
    return "parallel.tensor_model_parallel_size / parallel.pipeline_model_parallel_size (larger)"


def check_fit(plan: RunPlan) -> None:
    """Raise ``ConfigError`` naming the setting to change when the plan does not fit."""
    if plan.problems:
        setting, why = plan.problems[0]
        more = "".join(f"; also {s}: {w}" for s, w in plan.problems[1:])
        raise ConfigError(f"this run does not fit in GPU memory: {why}; change {setting}{more}")


def read_plan_arch(cfg: RPTConfig, path: str | None) -> ArchSpec:
    """The architecture from ``path`` (HF dir or config.json) or else ``model.hf_path``."""
    from pathlib import Path

    if path is None:
        return read_arch(policy_hf_dir(cfg.model))
    p = Path(path)
    return read_arch(p.parent if p.is_file() else p)


def format_scaling(
    cfg: RPTConfig,
    arch: ArchSpec,
    cluster: ClusterSpec,
    assume: PlanAssumptions,
    nodes: list[int],
    *,
    engines: int | None = None,
) -> str:
    """Step time at other node counts (the same global batch, more data parallelism)."""
    import dataclasses

    lines = [f"{'nodes':>5} {'GPUs':>5} {'DP':>4} {'engines':>7} {'rollout s':>9} "
             f"{'train s':>8} {'sync s':>7} {'step s':>7}  fits"]  # fmt: skip
    for n in nodes:
        scaled = dataclasses.replace(cluster, nodes=n)
        p = plan_run(cfg, arch, scaled, assume, engines=engines)
        tm = p.time
        lines.append(
            f"{n:>5} {scaled.world_size:>5} {p.shape.dp:>4} {p.engines:>7} {tm.rollout_s:>9.1f} "
            f"{tm.train_s:>8.1f} {tm.sync_s:>7.2f} {tm.total_s:>7.1f}  {'yes' if p.fits else 'no'}"
        )
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def format_plan(plan: RunPlan, cluster: ClusterSpec, assume: PlanAssumptions) -> str:
    """The table ``tools/plan_run.py`` prints."""
    t, e, s, tm = plan.trainer, plan.engine, plan.shape, plan.time
    gib = _gib
    rows = [
        ("cluster", f"{cluster.nodes} x {cluster.gpus_per_node} GPUs, "
                    f"{cluster.gpu_memory_gib:g} GiB, {cluster.peak_tflops:g} TFLOP/s"),
        ("layout", f"TP {s.tp} PP {s.pp} CP {s.cp} DP {s.dp}, SP {'on' if s.sequence_parallel else 'off'}, "
                   f"recompute {s.recompute}, dist-opt {'on' if s.distributed_optimizer else 'off'}"),
        ("micro-batches", f"{s.microbatches} per DP rank, largest {s.microbatch_tokens} tokens"),
        ("engines", f"{plan.engines} x {plan.gpus_per_engine} GPUs, "
                    f"{tm.concurrent_sequences} sequences at once each"),
        ("-- memory per GPU (GiB)", f"worst stage: {t.stage}"),
        ("parameters", gib(t.params)),
        ("gradients (fp32)", gib(t.grads)),
        ("optimizer state", gib(t.optimizer)),
        ("activations", gib(t.activations)),
        ("backward working set", gib(t.backward_working)),
        ("log-prob buffers", gib(t.logprob_buffers)),
        ("trainer total", gib(t.total)),
        ("engine weights", gib(e.weights)),
        ("engine KV pool (hand-off / resident)",
         f"{gib(plan.kv_pool_handoff)} / {gib(plan.kv_pool_resident)}"),
        ("KV for the whole step", gib(e.kv_cache)),
        ("peak with hand-off", f"{gib(plan.peak_handoff)} of {gib(plan.usable)} usable"),
        ("peak without hand-off", f"{gib(plan.peak_resident)} of {gib(plan.usable)} usable"),
        ("-- step time (s)", f"{tm.total_s:.1f}"),
        ("rollout", f"{tm.rollout_s:.1f} ({tm.generated_tokens:.3g} generated tokens)"),
        ("training", f"{tm.train_s:.1f} ({tm.train_flops:.3g} FLOPs at MFU {assume.mfu:g})"),
        ("weight sync", f"{tm.sync_s:.2f} ({tm.sync_bytes / 1e9:.1f} GB)"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    verdict = (
        ["fits (with the hand-off)"]
        if plan.fits
        else [f"DOES NOT FIT: change {s_}: {w}" for s_, w in plan.problems]
    )
    if plan.fits and plan.peak_resident > plan.usable:
        verdict.append("without the hand-off it does not fit (engine and trainer resident)")
    return "\n".join(lines + verdict)


__all__ = [
    "RunPlan",
    "check_fit",
    "format_plan",
    "format_scaling",
    "gpus_per_engine",
    "plan_run",
    "read_plan_arch",
    "workload",
]
