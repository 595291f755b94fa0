"""Exact expected completion-mode reward of an HF model on prepared contexts.

With one new token, the reward of a sampled token t is ``prefix_match_reward(bytes(t),
continuation)``, so the expected reward at temperature T is the softmax(logits / T) mass on
the tokens it rewards: no sampling noise. A token can be rewarded only when its vocabulary bytes
equal the bytes of the first j continuation tokens (j >= 1), so those are the candidates; the
library's own reward rule then decides each candidate.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_rpt.data.store import SampleStore
from megatron_rpt.reward.next_token import prefix_match_reward


def ids_by_bytes(table: list[bytes]) -> dict[bytes, list[int]]:
    """Vocabulary ids of each byte string (several ids may share one)."""
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(table):
        by_bytes.setdefault(b, []).append(i)
    return by_bytes


def rewarded_token_ids(
    table: list[bytes], by_bytes: dict[bytes, list[int]], continuation: tuple[bytes, ...]
) -> list[int]:
    """Vocabulary ids whose bytes the prefix-match reward accepts for ``continuation``."""
    prefixes, acc = [], b""
    for b in continuation:
        acc += b
        prefixes.append(acc)
    candidates = {i for p in prefixes for i in by_bytes.get(p, [])}
    return sorted(i for i in candidates if prefix_match_reward(table[i], continuation) == 1.0)


@torch.no_grad()
def expected_rewards(
    model_dir: str | Path,
    prepared_dir: str | Path,
    sample_ids: list[int],
    *,
    temperature: float,
    context_tokens: int,
) -> list[float]:
    """Per sample: sum of softmax(logits / T) over the rewarded tokens at the context's end."""
    from transformers import AutoModelForCausalLM

    store = SampleStore.open(prepared_dir, "train", context_tokens=context_tokens)
    table = [bytes(b) for b in store.table]
    by_bytes = ids_by_bytes(table)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for index in sample_ids:
        sample = store[index]
        ok = rewarded_token_ids(table, by_bytes, sample.continuation_token_bytes)
        logits = model(torch.tensor([sample.context_ids.tolist()])).logits[0, -1]
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        out.append(float(probs[[i for i in ok if i < probs.numel()]].sum()))
    return out
