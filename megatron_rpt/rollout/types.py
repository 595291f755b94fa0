r"""The rollout-engine contract: sampling parameters, completions, and the ``RolloutEngine``.

Every engine (the HF-transformers engine, the SGLang adapter, test fakes) implements the same
small ``RolloutEngine`` protocol, pinned for each of them by tests/unit/test_rollout_contract.py:

* ``generate`` takes token-id prompts and returns ``n`` completions per prompt, in prompt order;
* ``update_weights`` consumes a stream of ``(hf_name, tensor)`` in Hugging Face naming (what the
  Megatron -> HF weight sync produces) and loads it in place;
* ``release_memory`` / ``resume_memory`` free and restore accelerator memory around training;
* ``flush_cache`` drops the prefix (radix) cache, which is stale after every weight update;
* ``health``, ``shutdown``, and two verification hooks: ``weight_checksums`` (per-tensor
  checksums of what the engine actually holds, for post-sync checks) and
  ``prefix_cache_stats`` (prefix-cache hit rate when the engine exposes it).

Log-probabilities (the quantity the trainer compares against)
--------------------------------------------------------------
``Completion.logprobs[i]`` is ``log softmax(z_i / T)[y_i]``: the log-probability of the sampled
token ``y_i`` under the **temperature-scaled distribution over the full vocabulary**, where
``z_i`` are the model's fp32 logits at that step and ``T`` the sampling temperature. It is taken
**before** top-k / top-p truncation (no renormalisation over the kept set), which is what SGLang
returns by default (``SGLANG_RETURN_ORIGINAL_LOGPROB`` unset). Greedy decoding
(``temperature == 0`` or ``top_k == 1``) uses ``T = 1``, i.e. plain ``log softmax(z_i)``, as
SGLang does. A trainer reproducing
these numbers computes ``log_softmax(logits / T)`` on the same prompt + response tokens.

Token ids and text
------------------
``Completion.token_ids`` are the generated ids **including** the stop token when one was sampled
(EOS or a ``stop_token_ids`` member), so ``len(token_ids) == len(logprobs)`` always. ``text`` is
their decoding with special tokens skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from megatron_rpt.errors import InputError

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length", "box", "abort"]
"""Why a completion ended: a stop/EOS token ("stop"), ``max_new_tokens`` ("length"), the
final ``\boxed{...}`` after ``</think>`` closed with ``stop_at_final_box`` ("box"), or the
engine aborted the request ("abort")."""

FINISH_REASONS: tuple[str, ...] = ("stop", "length", "box", "abort")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample; defaults are the RPT paper's rollout settings (temperature 0.8, G = 8)."""

    temperature: float = 0.8
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables it."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 disables it."""
    max_new_tokens: int = 8192
    """Longest response in tokens (the paper's 8k response budget)."""
    n: int = 8
    """Samples per prompt (the paper's G)."""
    seed: int | None = None
    """Seed of this call's sampling; None draws fresh randomness."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end a response (the tokenizer's EOS ids always do)."""
    stop_at_final_box: bool = False
    r"""End a response as soon as a complete ``\boxed{...}`` follows ``</think>``."""
    return_logprobs: bool = True
    """Return per-token log-probabilities (see the module docstring for the distribution)."""

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and self.temperature == self.temperature):
            raise InputError(f"sampling temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise InputError(f"sampling top_k must be -1 or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise InputError(f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise InputError(f"sampling n must be >= 1, got {self.n}")

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(kw_only=True)
class Completion:
    """One sampled response to one prompt."""

    token_ids: list[int]
    """Generated token ids, the stop token included when one was sampled."""
    text: str
    """``token_ids`` decoded with special tokens skipped (convenient for logs). The reward does
    not trust it where that matters: with a tokenizer whose ``</think>`` is a special token it
    re-decodes the ids with special tokens kept, and in completion mode it reads the ids' bytes
    (``reward.scoring``)."""
    logprobs: list[float] | None
    """Per generated token, ``log softmax(logits / T)`` of the sampled token (module docstring);
    None when ``return_logprobs`` was false."""
    finish_reason: FinishReason
    """Why generation ended ("stop", "length", "box" or "abort")."""
    cached_tokens: int | None = None
    """Prompt tokens served from the engine's prefix cache, when the engine reports it."""
    meta: dict = field(default_factory=dict)
    """Engine-specific extras (weight version, timings)."""


@dataclass(frozen=True)
class PrefixCacheStats:
    """Prefix-cache use over the requests an engine has served since the last reset."""

    prompt_tokens: int
    """Prompt tokens submitted."""
    cached_tokens: int
    """Of those, tokens the engine served from its prefix cache."""

    @property
    def hit_rate(self) -> float:
        """cached / prompt tokens (0 when nothing was submitted)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@runtime_checkable
class RolloutEngine(Protocol):
    """What the RPT loop needs from an inference engine (module docstring)."""

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Completion]]:
        """``params.n`` completions for each prompt; ``result[i]`` belongs to ``prompts[i]``."""
        ...

    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        version: int,
        flush_cache: bool = True,
    ) -> None:
        """Load ``(hf_name, tensor)`` pairs in place; unknown names or shapes raise InputError."""
        ...

    def release_memory(self) -> None:
        """Free accelerator memory (weights and KV cache) so the trainer can use it."""
        ...

    def resume_memory(self) -> None:
        """Re-acquire what ``release_memory`` freed."""
        ...

    def flush_cache(self) -> None:
        """Drop every cached prefix (mandatory after a weight update)."""
        ...

    def health(self) -> bool:
        """True when the engine can serve requests."""
        ...

    def shutdown(self) -> None:
        """Stop the engine and free its resources; idempotent."""
        ...

    def weight_checksums(
        self, names: Sequence[str] | None = None, *, max_rows: int | None = 64
    ) -> dict[str, str]:
        """``tensor_fingerprint`` of the engine's current tensors by HF name."""
        ...

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """Prefix-cache statistics, or None when the engine does not expose them."""
        ...

    @property
    def weight_version(self) -> int:
        """Version passed to the last successful ``update_weights`` (initial weights: 0)."""
        ...


def tensor_fingerprint(tensor: torch.Tensor, max_rows: int | None = 64) -> str:
    """sha256 of the first ``max_rows`` rows (dim 0; all when None) as float32 bytes.

    The form every engine can serve: SGLang's ``/get_weights_by_name`` returns exactly the
    first ``truncate_size`` rows of a weight as float32 values, so the trainer, the HF engine
    and SGLang compare the same bytes. Prefixed with the shape of the hashed rows so a reshaped
    tensor with equal bytes never matches.

    >>> import torch
    >>> a = torch.arange(6.0).reshape(3, 2)
    >>> tensor_fingerprint(a, 2) == tensor_fingerprint(a.clone(), 2)
    True
    >>> tensor_fingerprint(a, 2) == tensor_fingerprint(a, None)
    False
    """
    import hashlib

    import torch

    t = tensor.detach()
    head = t if max_rows is None or t.dim() == 0 else t[:max_rows]
    data = head.to("cpu", dtype=torch.float32).contiguous().numpy().tobytes()
    shape = "x".join(str(d) for d in head.shape)
    return f"{shape}:{hashlib.sha256(data).hexdigest()[:32]}"


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int | None = None) -> None:
    """Raise InputError for empty prompts or ids outside ``[0, vocab_size)``."""
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise InputError(f"prompt {i} is empty; every prompt needs at least one token id")
        if vocab_size is not None:
            bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
            if bad:
                raise InputError(
                    f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}"
                )
