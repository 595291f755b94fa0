"""Standard next-token accuracy: the greedy argmax of one forward pass equals the true token.

For every evaluated document the model reads the whole document in **one** forward pass
(teacher forcing), and the prediction for position t is ``argmax_v logits[t-1, v]`` over the
ids the tokenizer defines (models often pad the output layer beyond the vocabulary). Documents
longer than the model's context are read in windows that overlap by ``window_overlap`` tokens,
exactly as the entropy scorer does (``data/entropy.plan_windows``): each later window re-reads
the end of the previous one and predicts only positions the previous one did not, so every
prediction has at least ``window_overlap`` tokens of left context. Windows of several documents
are packed into right-padded batches of at most ``batch_tokens`` tokens; windows with no
evaluated position are skipped. The output layer runs only at the evaluated positions, in
chunks of ``logits_chunk_tokens``, so full-vocabulary logits of a batch never exist at once.

This is the paper's "standard next-token prediction" mode (RPT Table 1). Its per-position
result equals a loop that runs the model once per position on ``x[:t]`` (tested), as long as
the document fits in one window.

Letters: B rows in a batch, L padded row length, N evaluated positions in a batch, H hidden,
V vocabulary, P positions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_rpt.data.entropy import pack_by_length, plan_windows
from megatron_rpt.dtypes import torch_dtype
from megatron_rpt.errors import CheckpointError

logger = logging.getLogger(__name__)

def load_causal_lm(hf_dir: str | Path, *, dtype: str = "float32", device: str = "cpu"):  # noqa: ANN201
    """An HF ``*ForCausalLM`` in eval mode (safetensors only, no remote code)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(hf_dir), dtype=torch_dtype(dtype, "eval.dtype"), use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{hf_dir}: cannot load the model ({exc})") from None
    return model.to(device).eval()


def output_rows(model: torch.nn.Module) -> int:
    """Rows of the output layer (logits per position)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


@dataclass
class _Window:
    doc: int
    start: int
    end: int
    targets: np.ndarray
    """Document positions predicted from this window (each in [score_from, end))."""


@dataclass
class ForwardStats:
    """How much work the standard pass did (for logs and tests)."""

    forward_calls: int = 0
    windows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    batches: list[int] = field(default_factory=list)


def _plan(
    doc_tokens: Sequence[np.ndarray],
    needed: dict[int, np.ndarray],
    window: int,
    overlap: int,
) -> list[_Window]:
    out = []
    for d, positions in needed.items():
        for start, end, score_from in plan_windows(len(doc_tokens[d]), window, overlap):
            lo, hi = np.searchsorted(positions, [score_from, end])
            if hi > lo:
                out.append(_Window(d, start, end, positions[lo:hi]))
    return out


@torch.inference_mode()
def _argmax_batch(
    model: torch.nn.Module,
    doc_tokens: Sequence[np.ndarray],
    windows: list[_Window],
    *,
    vocab_size: int,
    chunk: int,
) -> list[np.ndarray]:
    """Predicted ids at each window's targets (one forward over the packed windows)."""
    device = next(model.parameters()).device
    longest = max(w.end - w.start for w in windows)
    ids_BL = torch.zeros((len(windows), longest), dtype=torch.long)
    mask_BL = torch.zeros((len(windows), longest), dtype=torch.long)
    rows, cols = [], []
    for b, w in enumerate(windows):
        n = w.end - w.start
        ids_BL[b, :n] = torch.from_numpy(doc_tokens[w.doc][w.start : w.end])
        mask_BL[b, :n] = 1
        rows.append(np.full(len(w.targets), b))
        cols.append(w.targets - w.start - 1)  # row index i predicts document position start+i+1
    hidden_BLH = model.base_model(
        input_ids=ids_BL.to(device), attention_mask=mask_BL.to(device), use_cache=False
    ).last_hidden_state
    b_idx = torch.from_numpy(np.concatenate(rows)).to(device)
    l_idx = torch.from_numpy(np.concatenate(cols)).to(device)
    hidden_NH = hidden_BLH[b_idx, l_idx]
    head = model.get_output_embeddings()
    pred_N = (
        torch.cat([head(h).float()[:, :vocab_size].argmax(-1) for h in hidden_NH.split(chunk)])
        .cpu()
        .numpy()
    )
    return np.split(pred_N, np.cumsum([len(w.targets) for w in windows])[:-1])


def predict_next_tokens(
    model: torch.nn.Module,
    doc_tokens: Sequence[np.ndarray],
    needed: dict[int, np.ndarray],
    *,
    vocab_size: int,
    window_tokens: int,
    window_overlap: int = 512,
    batch_tokens: int = 8192,
    logits_chunk_tokens: int = 1024,
    stats: ForwardStats | None = None,
) -> dict[int, np.ndarray]:
    """Greedy predictions of x_t at ``needed[d]`` positions (sorted, >= 1) of each document d.

    Returns int64 arrays aligned with ``needed[d]``.
    """
    import time

    assert 1 <= window_overlap < window_tokens, (window_overlap, window_tokens)
    stats = stats if stats is not None else ForwardStats()
    t0 = time.perf_counter()
    windows = _plan(doc_tokens, needed, window_tokens, window_overlap)
    out = {d: np.full(len(p), -1, dtype=np.int64) for d, p in needed.items()}
    for batch in pack_by_length([w.end - w.start for w in windows], max(batch_tokens, window_tokens)):
        chosen = [windows[i] for i in batch]
        preds = _argmax_batch(
            model, doc_tokens, chosen, vocab_size=vocab_size, chunk=logits_chunk_tokens
        )
        stats.forward_calls += 1
        stats.batches.append(len(chosen))
        stats.tokens += sum(w.end - w.start for w in chosen)
        for w, p in zip(chosen, preds, strict=True):
            out[w.doc][np.searchsorted(needed[w.doc], w.targets)] = p
    stats.windows += len(windows)
    stats.seconds += time.perf_counter() - t0
    return out


def standard_correct(
    model: torch.nn.Module,
    eval_set,  # noqa: ANN001 - dataset.EvalSet
    *,
    window_tokens: int | None = None,
    window_overlap: int = 512,
    batch_tokens: int = 8192,
    logits_chunk_tokens: int = 1024,
    stats: ForwardStats | None = None,
) -> np.ndarray:
    """bool [P]: the greedy next-token prediction at each position of ``eval_set`` is right."""
    vocab_size = len(eval_set.table)
    if output_rows(model) < vocab_size:
        raise CheckpointError(
            f"model has {output_rows(model)} output logits but the data's tokenizer has "
            f"{vocab_size} tokens"
        )
    if window_tokens is None:
        window_tokens = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    window_overlap = min(window_overlap, window_tokens - 1)
    groups = eval_set.rows_by_doc()
    needed = {d: np.unique(eval_set.position_P[rows]) for d, rows in groups.items()}
    preds = predict_next_tokens(
        model,
        eval_set.doc_tokens,
        needed,
        vocab_size=vocab_size,
        window_tokens=window_tokens,
        window_overlap=window_overlap,
        batch_tokens=batch_tokens,
        logits_chunk_tokens=logits_chunk_tokens,
        stats=stats,
    )
    pred_P = np.full(len(eval_set), -1, dtype=np.int64)
    for d, rows in groups.items():
        pred_P[rows] = preds[d][np.searchsorted(needed[d], eval_set.position_P[rows])]
    assert (pred_P >= 0).all(), "a position was not predicted"
    return pred_P == eval_set.target_ids()


__all__ = [
    "ForwardStats",
    "load_causal_lm",
    "output_rows",
    "predict_next_tokens",
    "standard_correct",
]
