"""Post-sync checks: does the engine hold exactly the trainer's weights?

Two complementary checks (``weight_sync.verify``), because they catch different failures:

* **Fingerprints** ('checksum', 'full'): while the pushing rank streams the HF tensors it
  records ``tensor_fingerprint`` of each (sha256 of the float32 bytes of the first
  ``checksum_rows`` rows, or of the whole tensor in 'full' mode); afterwards it asks the engine
  for the same fingerprints of what it actually holds (``RolloutEngine.weight_checksums``).
  Any lost, reordered, stale, half-copied or overwritten bucket - the silent corruption
  users of other RL stacks have reported (SGLang bucket races, bugs after pause/resume, e.g.
  sgl-project/sglang#14178 and #15246) - changes at least one
  fingerprint. It cannot see a conversion bug: the stream itself would be wrong.
* **Probe** (every mode but 'none'; cheap, on by default): the engine decodes
  ``probe_new_tokens`` greedily after a fixed prompt and returns their log-probs; the trainer
  runs its own Megatron forward (``model.logits.forward_logits``) on prompt + response and
  computes the log-probs of the same tokens. Their mean absolute difference (the statistic
  slime logs as ``train_rollout_logprob_abs_diff``) must be within ``probe_tolerance``. This
  is end to end (gather, conversion, transport and the engine's numerics) but statistical: a
  small corruption can hide under the tolerance, which is what fingerprints are for.

A failed check raises ``WeightSyncError`` naming the tensors (fingerprints) or the worst token
(probe); ``push.sync_weights`` makes every rank raise it.

Fingerprints are exact for the HF engine and for SGLang at engine TP = 1. SGLang's
``/get_weights_by_name`` answers with engine TP rank 0's shard, which equals the first rows of
the full tensor only for weights split along dim 0 (rollout/sglang_engine.py); with engine
TP > 1 use ``verify='probe'`` until per-shard fingerprints exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_rpt.distributed import ParallelGroups
from megatron_rpt.model.build import BuiltModel
from megatron_rpt.model.logits import forward_logits
from megatron_rpt.rollout.types import RolloutEngine, SamplingParams, tensor_fingerprint


class WeightSyncError(RuntimeError):
    """The engine does not hold the trainer's weights after a sync (or the push failed)."""


class StreamFingerprints:
    """Fingerprints of the tensors as they are streamed to the engine (pushing rank)."""

    def __init__(self, max_rows: int | None) -> None:
        self.max_rows = max_rows
        self.expected: dict[str, str] = {}

    def record(self, name: str, tensor: torch.Tensor) -> None:
        """Remember the fingerprint of ``tensor`` under its HF name."""
        self.expected[name] = tensor_fingerprint(tensor, self.max_rows)

    def check(self, engine: RolloutEngine) -> str | None:
        """None when the engine's fingerprints all match, else a message naming the tensors."""
        names = list(self.expected)
        got = engine.weight_checksums(names, max_rows=self.max_rows)
        bad = [n for n in names if got.get(n) != self.expected[n]]
        if not bad:
            return None
        rows = "all rows" if self.max_rows is None else f"first {self.max_rows} rows"
        return (
            f"{len(bad)} of {len(names)} tensors differ between the trainer's stream and the "
            f"engine ({rows} hashed): {bad[:8]}{' ...' if len(bad) > 8 else ''}"
        )


def probe_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    """The fixed probe prompt: ``length`` token ids drawn from ``seed`` (same at every sync).

    >>> probe_prompt(100, 4, 0) == probe_prompt(100, 4, 0)
    True
    >>> all(0 <= t < 100 for t in probe_prompt(100, 16, 1))
    True
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=gen).tolist()


def engine_probe(
    engine: RolloutEngine, prompt: list[int], new_tokens: int
) -> tuple[list[int], list[float]]:
    """Greedy continuation of ``prompt`` and its per-token log-probs (``log softmax(z)[y]``)."""
    params = SamplingParams(temperature=0.0, n=1, max_new_tokens=new_tokens, return_logprobs=True)
    completion = engine.generate([prompt], params)[0][0]
    assert completion.logprobs is not None and completion.token_ids
    return list(completion.token_ids), list(completion.logprobs)


def trainer_logprobs(
    built: BuiltModel, groups: ParallelGroups, prompt: Sequence[int], response: Sequence[int]
) -> list[float] | None:
    """Log-probs of ``response`` after ``prompt`` under the Megatron model (fp32 logits).

    Collective over the model-parallel group (every rank passes the same tokens); the result
    is on the last pipeline stage, None elsewhere.
    """
    device = next(built.chunks[0].parameters()).device
    tokens = torch.tensor([list(prompt) + list(response)], dtype=torch.long, device=device)
    if groups.vpp_size:  # the interleaved schedule needs a multiple of PP microbatches
        tokens = tokens.expand(groups.pp_size, -1).contiguous()
    logits_BSV = forward_logits(built, tokens, groups)
    if logits_BSV is None:
        return None
    start = len(prompt) - 1
    logp_RV = torch.log_softmax(logits_BSV[0, start : start + len(response)].float(), dim=-1)
    ids_R = torch.tensor(list(response), device=logp_RV.device)
    return logp_RV.gather(-1, ids_R[:, None])[:, 0].tolist()


@dataclass(frozen=True)
class ProbeResult:
    """Engine vs trainer log-probs of the probe's greedy tokens."""

    response: list[int]
    engine_logprobs: list[float]
    trainer_logprobs: list[float]

    @property
    def abs_diffs(self) -> list[float]:
        """|engine - trainer| per response token."""
        pairs = zip(self.engine_logprobs, self.trainer_logprobs, strict=True)
        return [abs(a - b) for a, b in pairs]

    @property
    def max_abs_diff(self) -> float:
        """Largest |engine - trainer| over the response tokens."""
        return max(self.abs_diffs)

    @property
    def mean_abs_diff(self) -> float:
        """Mean |engine - trainer| over the response tokens (the checked statistic)."""
        return sum(self.abs_diffs) / len(self.abs_diffs)

    def error(self, tolerance: float) -> str | None:
        """None when the mean difference is within ``tolerance``, else a message with the worst
        token. The mean, not the max: one near-tie token in bf16 must not fail a sync."""
        if self.mean_abs_diff <= tolerance:
            return None
        diffs = self.abs_diffs
        worst = max(range(len(diffs)), key=diffs.__getitem__)
        return (
            f"probe: engine and trainer log-probs differ by {self.mean_abs_diff:.4g} on average "
            f"> tolerance {tolerance:g} over {len(diffs)} greedy tokens (worst: token {worst}, "
            f"id {self.response[worst]}: engine {self.engine_logprobs[worst]:.4f}, trainer "
            f"{self.trainer_logprobs[worst]:.4f})"
        )
