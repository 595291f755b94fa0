"""Per-GPU memory of the trainer and of the colocated rollout engine, from the architecture.

Letters: L layers, H hidden, n_q / n_kv query / KV heads of size d, I MLP width, V (padded)
vocabulary, t/p/c/dp the TP/PP/CP/DP sizes, a the activation dtype's bytes, T tokens of a
micro-batch. Counted in bytes, for the worst pipeline stage:

* **parameters** ``(layer matmuls / t) * L/p`` + replicated norms + the embedding (first stage)
  / output layer (last stage) ``V*H/t``; a tied output layer is a second copy on the last
  stage when p > 1 (as Megatron keeps it);
* **gradients**: Megatron DDP's fp32 buffer, 4 bytes per parameter (``grad_reduce_in_fp32``);
* **optimizer**: Adam's two fp32 moments + fp32 master weights for bf16 parameters (12 bytes;
  8 for fp32 parameters), SGD's master weights and momentum; divided by dp x c with the
  distributed optimizer;
* **activations** saved for backward per layer and token (flash-style attention, no dropout),
  counted tensor by tensor on the local (torch) layer spec and checked against autograd's saved
  tensors (Transformer Engine's fused modules save somewhat less: an upper bound on GPU)::

      a * (6H/s + ((n_q + 2 n_kv) d + (3 n_q + n_kv) d + 5 I [+ (2 n_q + n_kv) d]) / t + 4d)
        + 4 n_q / t

  the two RMSNorms' input, normalised input and output (1/t of the tokens with sequence
  parallelism, s = t, else s = 1); the QKV output, rotated q and k, the attention output and
  its copy for the output projection; the gated MLP's input (2I), gate activation, product and
  views (5I in all); with q/k norms their inputs and normalised values; the RoPE tables; the
  fp32 log-sum-exp. With ``spec='te'`` the fused norm+linear modules save 2H per norm and the
  attention q, k, v and output (from TE's saved-tensor lists; not measured here). An attention backend that materialises the scores (torch's math SDPA
  on CPU) adds ``a * n_q/t * S`` per token for S-token segments, removed by selective
  recompute. Full recompute keeps only each layer's input ``a*H/s`` plus one layer's working
  set. The first stage holds min(p, micro-batches) micro-batches in flight (1F1B); context
  parallelism divides T by c; backward adds one layer's worth of gradients (the working set;
  twice that with full recompute), which is never alive together with the log-prob buffers;
* **log-prob buffers** (last stage): a few fp32 ``[C, V/t]`` chunks of the fused log-prob
  (C = ``loss.logprob_chunk_size``) and its output-weight gradient buffer;
* **engine**: the model's weights / engine GPUs, and its KV cache
  ``2 L d ceil(n_kv / g) * bytes`` per token on each of the engine's g GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_rpt.model.arch import ArchSpec


@dataclass(frozen=True, kw_only=True)
class TrainerShape:
    """What the trainer's memory depends on besides the architecture."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    param_bytes: int = 2
    """2 for bf16 parameters and activations, 4 for fp32."""
    distributed_optimizer: bool = True
    optimizer: str = "adam"
    sgd_momentum: float = 0.0
    recompute: str = "none"
    """none | selective | full (Megatron's recompute_granularity)."""
    microbatch_tokens: int = 16384
    """Tokens of the largest micro-batch (all its rows)."""
    microbatches: int = 1
    """Micro-batches per DP rank per step."""
    response_tokens: int | None = None
    """Response (loss) tokens of the largest micro-batch; None: all its tokens."""
    logprob_chunk: int = 1024
    score_segment_tokens: int = 0
    """Longest attention segment when the backend materialises scores (CPU math SDPA); 0 for
    flash-style attention."""
    spec: str = "local"
    """Layer spec whose saved tensors are counted: 'local' (torch modules, measured) or 'te'
    (Transformer Engine's fused norm+linear and attention)."""


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model replica."""

    per_layer_matmul: int
    per_layer_replicated: int
    embedding: int
    final_norm: int
    tied: bool
    layers: int

    @classmethod
    def from_arch(cls, arch: ArchSpec, padded_vocab: int | None = None) -> ParamCounts:
        """Counts of ``arch`` (embedding rows: ``padded_vocab`` if given)."""
        h, d, nq, nkv = arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_kv_heads
        matmul = h * d * (2 * nq + 2 * nkv) + 3 * h * arch.intermediate_size
        if arch.qkv_bias:
            matmul += d * (nq + 2 * nkv)  # split over TP with their projection
        replicated = 2 * h + (2 * d if arch.qk_norm else 0)
        vocab = padded_vocab or arch.vocab_size
        return cls(matmul, replicated, vocab * h, h, arch.tie_word_embeddings, arch.num_layers)

    @property
    def total(self) -> int:
        """Parameters of the model (a tied output layer counted once)."""
        body = self.layers * (self.per_layer_matmul + self.per_layer_replicated)
        return body + self.embedding * (1 if self.tied else 2) + self.final_norm

    def stage(self, tp: int, pp: int, first: bool, last: bool) -> int:
        """Parameters one GPU of a pipeline stage holds."""
        n = math.ceil(self.layers / pp) * (self.per_layer_matmul // tp + self.per_layer_replicated)
        if first:
            n += self.embedding // tp
        if last:
            n += self.final_norm
            if not self.tied or pp > 1:
                n += self.embedding // tp
        return n


@dataclass(frozen=True)
class TrainerMemory:
    """Bytes on the worst trainer GPU, by kind."""

    params: int
    grads: int
    optimizer: int
    activations: int
    """Saved for backward (all layers and micro-batches in flight)."""
    logprob_buffers: int
    stage: str
    """'first' or 'last' (the worst pipeline stage; 'only' without PP)."""
    backward_working: int = 0
    """One layer's backward (and, with full recompute, its recomputed forward)."""

    @property
    def states(self) -> int:
        """Parameters + gradients + optimizer state (what an offload can move to the host)."""
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        """Everything the training phase holds at its peak: the log-prob buffers live while
        the loss backpropagates, before any layer's backward starts."""
        return self.states + self.activations + max(self.logprob_buffers, self.backward_working)


def _optimizer_bytes_per_param(shape: TrainerShape) -> int:
    master = 4 if shape.param_bytes < 4 else 0
    if shape.optimizer == "adam":
        return master + 8
    return master + (4 if shape.sgd_momentum else 0)


def activation_bytes_per_token_layer(arch: ArchSpec, shape: TrainerShape) -> tuple[float, float]:
    """(saved without recompute, of which attention scores) per token and layer on one GPU."""
    a, t = shape.param_bytes, shape.tp
    s = t if shape.sequence_parallel else 1
    h, d, nq, nkv = arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_kv_heads
    mlp = 5 * arch.intermediate_size  # input (2I), gate activation, product and views
    if shape.spec == "te":
        # Fused norm+linear saves the norm's input and output; attention its q, k, v, output.
        norms, attention = 4 * h, (2 * nq + 2 * nkv) * d + ((nq + nkv) * d if arch.qk_norm else 0)
        saved = a * (norms / s + (attention + mlp) / t) + 4 * nq / t
    else:
        # QKV output (kept alive by the value view), rotated q and k, attention output and its
        # [s, b, n*d] copy for the output projection; q/k norms save input and normalised values.
        attention = (nq + 2 * nkv) * d + (3 * nq + nkv) * d
        if arch.qk_norm:
            attention += (2 * nq + nkv) * d
        # Each RMSNorm saves its input, the normalised input and (for the next GEMM) its output.
        saved = a * (6 * h / s + (attention + mlp) / t + 4 * d) + 4 * nq / t
    scores = a * nq / t * shape.score_segment_tokens
    return saved + scores, scores


def activation_bytes(arch: ArchSpec, shape: TrainerShape, *, in_flight: int) -> int:
    """Activations one GPU holds with ``in_flight`` micro-batches of its stage's layers."""
    tokens = shape.microbatch_tokens / shape.cp
    layers = math.ceil(arch.num_layers / shape.pp)
    per_layer, scores = activation_bytes_per_token_layer(arch, shape)
    s = shape.tp if shape.sequence_parallel else 1
    if shape.recompute == "selective":
        per_layer -= scores
    if shape.recompute == "full":
        kept = shape.param_bytes * arch.hidden_size / s
        stored = tokens * kept * layers * in_flight
    else:
        stored = tokens * per_layer * layers * in_flight
    # The final norm's input and normalised input, outside the layers.
    stored += 2 * tokens * shape.param_bytes * arch.hidden_size / s * in_flight
    return int(stored)


def backward_working_bytes(arch: ArchSpec, shape: TrainerShape) -> int:
    """Gradients of one layer's saved tensors during its backward, about what it saved; with
    full recompute also the layer's recomputed activations."""
    per_layer, scores = activation_bytes_per_token_layer(arch, shape)
    if shape.recompute != "none":
        per_layer -= scores
    tokens = shape.microbatch_tokens / shape.cp
    return int(tokens * per_layer * (2 if shape.recompute == "full" else 1))


def logprob_buffer_bytes(arch: ArchSpec, shape: TrainerShape, padded_vocab: int) -> int:
    """The fused log-prob's transient buffers on the last stage (forward + backward peak)."""
    local_vocab = padded_vocab // shape.tp
    responses = shape.response_tokens or shape.microbatch_tokens
    chunk = min(shape.logprob_chunk, responses)
    chunks = 3 * 4 * chunk * local_vocab  # fp32 logits, exp, gradient of one chunk
    grad_weight = (shape.param_bytes + (4 if shape.param_bytes < 4 else 0)) * local_vocab
    # Selected response rows and their gradient; with SP also the gathered hidden states.
    rows = 2 * responses + (shape.microbatch_tokens if shape.sequence_parallel else 0)
    return int(chunks + (grad_weight + shape.param_bytes * rows) * arch.hidden_size)


def stage_memories(arch: ArchSpec, shape: TrainerShape, padded_vocab: int) -> list[TrainerMemory]:
    """Bytes of a GPU of each distinct pipeline stage: [only] or [first, last] (see the module
    docstring; middle stages hold the first stage's activations without its embedding)."""
    counts = ParamCounts.from_arch(arch, padded_vocab)
    shards = shape.dp * shape.cp if shape.distributed_optimizer else 1
    stages = [("only", True, True, 1)]  # no pipelining: one micro-batch at a time
    if shape.pp > 1:
        stages = [("first", True, False, shape.pp), ("last", False, True, 1)]
    out = []
    for name, first, last, flight in stages:
        n = counts.stage(shape.tp, shape.pp, first, last)
        out.append(
            TrainerMemory(
                params=n * shape.param_bytes,
                grads=n * 4,
                optimizer=math.ceil(n * _optimizer_bytes_per_param(shape) / shards),
                activations=activation_bytes(
                    arch, shape, in_flight=min(flight, shape.microbatches)
                ),
                logprob_buffers=logprob_buffer_bytes(arch, shape, padded_vocab) if last else 0,
                stage=name,
                backward_working=backward_working_bytes(arch, shape),
            )
        )
    return out


def trainer_memory(arch: ArchSpec, shape: TrainerShape, padded_vocab: int) -> TrainerMemory:
    """Worst-stage bytes of the trainer (see the module docstring)."""
    return max(stage_memories(arch, shape, padded_vocab), key=lambda m: m.total)


@dataclass(frozen=True)
class EngineMemory:
    """Bytes of one colocated engine on each of its GPUs."""

    weights: int
    kv_bytes_per_token: int
    kv_tokens: int
    """KV-cache tokens the step asks of this engine at full concurrency."""

    @property
    def kv_cache(self) -> int:
        """KV cache for ``kv_tokens``."""
        return self.kv_bytes_per_token * self.kv_tokens

    @property
    def total(self) -> int:
        """Weights + full KV cache."""
        return self.weights + self.kv_cache


def engine_memory(
    arch: ArchSpec, *, gpus_per_engine: int, weight_bytes: int, kv_bytes: int, kv_tokens: int
) -> EngineMemory:
    """Weights and KV cache of an engine spanning ``gpus_per_engine`` GPUs (per GPU)."""
    counts = ParamCounts.from_arch(arch)
    kv_heads = math.ceil(arch.num_kv_heads / gpus_per_engine)  # replicated beyond n_kv GPUs
    per_token = 2 * arch.num_layers * arch.head_dim * kv_heads * kv_bytes
    return EngineMemory(counts.total * weight_bytes // gpus_per_engine, per_token, kv_tokens)


__all__ = [
    "EngineMemory",
    "ParamCounts",
    "TrainerMemory",
    "TrainerShape",
    "activation_bytes",
    "activation_bytes_per_token_layer",
    "backward_working_bytes",
    "engine_memory",
    "logprob_buffer_bytes",
    "stage_memories",
    "trainer_memory",
]
