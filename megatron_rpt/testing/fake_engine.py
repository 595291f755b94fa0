"""``FakeRolloutEngine``: a ``RolloutEngine`` with scripted completions, for testing extensions.

A custom reward, rollout phase or evaluation can be driven without a model:

    engine = FakeRolloutEngine(lambda prompt, params: ["</think>\\boxed{ a}"] * params.n)
    completions = engine.generate([[1, 2, 3]], SamplingParams(n=4))

``respond(prompt_ids, params)`` returns the ``params.n`` completions of one prompt, as texts
(wrapped in a ``Completion`` with placeholder token ids, and log-probs of -1 when
``params.return_logprobs``) or as ``Completion``
objects; it may raise to model an engine error. Every ``generate`` call is recorded in
``calls``. ``update_weights`` consumes the stream and keeps the tensors, so ``weight_checksums``
answers with their fingerprints, as a real engine does after a weight sync.

>>> from megatron_rpt.rollout.types import RolloutEngine, SamplingParams
>>> engine = FakeRolloutEngine(lambda prompt, params: [str(sum(prompt))] * params.n)
>>> isinstance(engine, RolloutEngine)
True
>>> [c.text for c in engine.generate([[1, 2]], SamplingParams(n=2))[0]]
['3', '3']
>>> engine.update_weights([("w", torch.ones(2))], version=3); engine.weight_version
3
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from megatron_rpt.rollout.types import (
    Completion,
    PrefixCacheStats,
    SamplingParams,
    tensor_fingerprint,
)

Respond = Callable[[tuple[int, ...], SamplingParams], Sequence["str | Completion"]]


class FakeRolloutEngine:
    """A ``RolloutEngine`` whose completions come from ``respond`` (module docstring)."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.calls: list[tuple[list[tuple[int, ...]], SamplingParams]] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.closed = False
        self._version = 0

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Completion]]:
        """``respond``'s completions for each prompt (exactly ``params.n`` each)."""
        keys = [tuple(int(t) for t in p) for p in prompts]
        self.calls.append((keys, params))
        out = []
        for key in keys:
            items = list(self.respond(key, params))
            if len(items) != params.n:
                raise ValueError(f"respond gave {len(items)} completions, params.n={params.n}")
            out.append([_completion(c, params) for c in items])
        return out

    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        version: int,
        flush_cache: bool = True,
    ) -> None:
        """Keep a copy of every ``(hf_name, tensor)`` of the stream; record ``version``."""
        for name, tensor in named_tensors:
            self.weights[name] = tensor.detach().clone()
        self._version = version

    def release_memory(self) -> None:
        """Nothing to free."""

    def resume_memory(self) -> None:
        """Nothing to restore."""

    def flush_cache(self) -> None:
        """No cache."""

    def health(self) -> bool:
        """True until ``shutdown``."""
        return not self.closed

    def shutdown(self) -> None:
        """Mark the engine closed (idempotent)."""
        self.closed = True

    def weight_checksums(
        self, names: Sequence[str] | None = None, *, max_rows: int | None = 64
    ) -> dict[str, str]:
        """Fingerprints of the tensors received by ``update_weights``."""
        wanted = self.weights if names is None else [n for n in names if n in self.weights]
        return {n: tensor_fingerprint(self.weights[n], max_rows) for n in wanted}

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """No prefix cache."""
        return None

    @property
    def weight_version(self) -> int:
        """Version of the last ``update_weights`` (0 before any)."""
        return self._version


def _completion(item: str | Completion, params: SamplingParams) -> Completion:
    if isinstance(item, Completion):
        return item
    ids = list(range(len(item) // 4 + 1))
    logprobs = [-1.0] * len(ids) if params.return_logprobs else None
    return Completion(token_ids=ids, text=item, logprobs=logprobs, finish_reason="stop")


__all__ = ["FakeRolloutEngine"]
