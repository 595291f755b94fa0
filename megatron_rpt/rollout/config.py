"""Config of the rollout engine (``cfg.rollout``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_rpt.errors import ConfigError


@dataclass(kw_only=True)
class SGLangServerConfig:
    """How the SGLang server is launched and reached (``rollout.sglang``)."""

    host: str = "127.0.0.1"
    """Interface the server binds to. Loopback by default: the server has no authentication
    and its weight-update endpoints accept pickled tensors, so only expose it deliberately."""
    port: int = 30000
    """HTTP port; 0 picks a free port at launch."""
    mem_fraction_static: float = 0.6
    """Fraction of GPU memory SGLang reserves for weights + KV cache. Colocated with the
    trainer this must leave room for the trainer's residual memory after offload."""
    tp_size: int = 1
    """Tensor-parallel size of the engine (one serialized bucket is sent per engine TP rank)."""
    dtype: str = "auto"
    """Weight dtype of the engine ('auto', 'bfloat16', 'float16', 'float32')."""
    enable_weights_cpu_backup: bool = False
    """Keep a CPU copy of the weights across release/resume. Without it the weights' GPU
    memory is discarded on release and must be re-pushed before the next generate."""
    deterministic_inference: bool = False
    """Start SGLang with --enable-deterministic-inference (batch-invariant kernels; slower).
    Without it SGLang ignores ``sampling_seed``: the trainer's per-step seeds do not make
    rollouts reproducible on resume or retry (a warning says so at launch)."""
    extra_args: dict[str, Any] = field(default_factory=dict)
    """More server flags, e.g. {'attention-backend': 'triton', 'disable-cuda-graph': true};
    true adds a bare flag, false/None omits it."""
    launch_timeout_s: float = 600.0
    """Hard limit for the server to become healthy after launch."""
    request_timeout_s: float = 3600.0
    """Timeout of one /generate call."""
    control_timeout_s: float = 600.0
    """Timeout of control calls (weight updates, release/resume, flush)."""
    bucket_bytes: int = 512 * 1024 * 1024
    """Colocated weight push: largest flattened per-dtype bucket (slime's default, 512 MiB)."""
    max_unfenced_buckets: int = 2
    """Colocated weight push: buckets pushed between two ``torch.cuda.ipc_collect()`` calls,
    which return the buckets SGLang has finished reading to the allocator (see
    sglang_engine.py, "bucket lifetime")."""
    base_gpu_id: int | None = None
    """First GPU of the server (``--base-gpu-id``; it uses base .. base + tp_size - 1).
    None: SGLang's default, GPU 0. Disaggregated mode needs it (or CUDA_VISIBLE_DEVICES) so
    the server does not land on the trainer's GPUs."""
    box_max_gap_chars: int = 32
    """stop_at_final_box on SGLang: max characters between </think> and \\boxed{."""
    box_max_chars: int = 32
    """stop_at_final_box on SGLang: max characters inside the box."""
    nccl_master_address: str = "127.0.0.1"
    """Disaggregated mode: address of the trainer rank that broadcasts weights."""
    nccl_master_port: int = 29600
    """Disaggregated mode: port of that rendezvous."""
    weight_group_name: str = "megatron_rpt_weights"
    """Disaggregated mode: name of the weight-update process group inside SGLang."""


@dataclass(kw_only=True)
class RolloutConfig:
    """Which engine samples the G responses per context, and how."""

    engine: Literal["hf", "sglang"] = "hf"
    """'hf': in-process transformers engine (CPU or GPU; the CPU default and test reference).
    'sglang': SGLang server (GPU only)."""
    mode: Literal["colocated", "disaggregated"] = "colocated"
    """SGLang placement: 'colocated' shares the trainer's GPUs (release/resume memory, weights
    pushed through CUDA IPC); 'disaggregated' runs on separate GPUs (weights over NCCL)."""
    model: str | None = None
    """Initial engine weights (HF directory or 'embedded:smollm2'); default: the policy's."""
    dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = "float32"
    """HF engine weight dtype (the short names fp32/bf16/fp16 are read as torch's)."""
    device: str = "auto"
    """HF engine device: 'auto' (CUDA when available), 'cpu' or 'cuda[:i]'."""
    n_samples: int = 8
    """G: responses sampled per context (paper: 8)."""
    temperature: float = 0.8
    """Sampling temperature (paper: 0.8)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 disables)."""
    top_k: int = -1
    """Top-k truncation (-1 disables)."""
    max_new_tokens: int = 8192
    """Longest response in tokens (paper: 8k)."""
    stop_at_final_box: bool = False
    """End a response as soon as the final \\boxed{...} after </think> is closed."""
    max_batch_rows: int = 64
    """HF engine: most sequences decoded together (prompts x samples are split into chunks)."""
    schedule: Literal["document", "as_given"] = "document"
    """Request order sent to the engine: 'document' groups contexts of the same document by
    position to maximise prefix-cache reuse (results are returned in the caller's order)."""
    offload_trainer: Literal["none", "optimizer", "all"] = "none"
    """Colocated memory hand-off (trainer/offload.py): what the trainer moves out of memory
    while the engine generates. 'optimizer': optimizer state (Adam moments, fp32 main
    parameters) and gradients; 'all': also the model parameters; 'none': nothing. On GPU the
    bytes go to pinned host memory and the CUDA cache is emptied, so the engine can resume its
    weights, KV cache and CUDA graphs in the freed memory (use 'optimizer' or 'all' with a
    colocated SGLang engine at real model sizes); on CPU they go to a temporary file. Training
    stays bitwise identical."""
    gpus_per_engine: int | None = None
    """GPUs (ranks) per rollout engine: the run has world_size / gpus_per_engine engines, each
    on consecutive ranks and driven by the first of them (rollout/placement.py). None: the
    trainer's tensor-parallel size. SGLang engines run with --tp-size gpus_per_engine."""
    engine_gpu_offset: int = 0
    """Disaggregated mode: first GPU index of the engines on every node (the GPUs after the
    trainer's); engine i of a node starts at engine_gpu_offset + i * gpus_per_engine."""
    block_contexts: int | None = None
    """Most contexts per engine call (whole documents stay together; rollout/routing.py).
    Blocks and their seeds do not depend on the number of engines. None: max_batch_rows //
    n_samples (one HF decode batch); raise it for SGLang, which batches server-side."""
    sglang: SGLangServerConfig = field(default_factory=SGLangServerConfig)
    """SGLang server settings (used when engine = 'sglang')."""
    timeout_s: float = 3600.0
    """The training loop's limit for one engine call (one block of a round): a call that
    takes longer counts as a hung engine, which is restarted alone (trainer/fleet.py)."""
    max_restarts: int = 3
    """Consecutive failures of one engine (error, hang, unhealthy, failed weight push) the
    training loop recovers from by restarting that engine and retrying its requests with the
    same seeds; one more stops the run with an error naming the engine instead of training on
    partial data."""

    def sampling_params(self, *, seed: int | None = None, n: int | None = None):  # noqa: ANN201
        """The ``SamplingParams`` these defaults describe."""
        from megatron_rpt.rollout.types import SamplingParams

        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            n=self.n_samples if n is None else n,
            seed=seed,
            stop_at_final_box=self.stop_at_final_box,
        )


def validate_rollout_config(r: RolloutConfig) -> None:
    """Field ranges and combinations; raise ConfigError naming the field (``rollout.*``)."""
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
