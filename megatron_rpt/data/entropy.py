r"""Top-k next-token entropy of a proxy causal LM at every document position.

RPT keeps the positions where a small proxy model is uncertain (paper Sec. 3.3: entropy over
the proxy's top-16 next-token candidates). Here, for a document x_0..x_{n-1}:

    H_t = -sum_{i in topk} q_i log q_i,   q = softmax(top-k logits of p(. | x_<t))   (nats)

stored at index t (the uncertainty about token t given everything before it). Position 0 has
no left context and no score: NaN. The top-k probabilities are renormalised over the k
candidates, so H_t lies in [0, ln k] (ln 16 = 2.77). Only logits of ids the tokenizer defines
are used (models often pad the output layer beyond the tokenizer's vocabulary).

Long documents are scored in windows of at most ``window`` tokens. Window j+1 starts
``overlap`` tokens before window j ends and writes only the positions window j did not, so
every position past the first window is scored with at least ``overlap`` tokens of left
context. Starting each window from scratch instead would score its first tokens with almost
no context and make every window start look falsely high-entropy (the casinca/LLM-quest
lesson, docs/METHOD.md §5). For a model whose receptive field is shorter than
``overlap`` the windowed scores equal single-pass scores exactly (tested).

Windows are packed into right-padded batches of at most ``batch_tokens`` tokens (rows x
longest row). Scoring is resumable: documents are processed in chunks; after each chunk the
float16 memmap is flushed and then a per-document "done" array is replaced atomically, so an
interrupted run continues after the last finished chunk.

Letters: B batch rows, L window length, V vocabulary, K top-k.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_rpt.dtypes import torch_dtype
from megatron_rpt.errors import DataError

logger = logging.getLogger(__name__)

Window = tuple[int, int, int]
"""(start, end, score_from): tokens x[start:end] go in; positions [score_from, end) come out."""


def topk_entropy(logits_V: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy (nats) of the softmax renormalised over the k largest logits. [..., V] -> [...].

    >>> round(float(topk_entropy(torch.zeros(100), 16)), 4)   # uniform top-16: ln 16
    2.7726
    >>> abs(float(topk_entropy(torch.tensor([0.0, -1e4, -1e4]), 2)))  # one certain candidate
    0.0
    """
    top = logits_V.topk(min(k, logits_V.shape[-1]), dim=-1).values.float()
    logq = torch.log_softmax(top, dim=-1)
    return -(logq.exp() * logq).sum(-1)


def plan_windows(n_tokens: int, window: int, overlap: int) -> list[Window]:
    """Windows covering positions 1..n-1 of an ``n_tokens`` document (see module docstring).

    >>> plan_windows(10, 4, 2)
    [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    >>> plan_windows(3, 8, 2), plan_windows(1, 8, 2)
    ([(0, 3, 1)], [])
    """
    assert 1 <= overlap < window, (overlap, window)  # a window's first token has no score
    windows: list[Window] = []
    if n_tokens < 2:
        return windows
    start, score_from = 0, 1
    while True:
        end = min(start + window, n_tokens)
        windows.append((start, end, score_from))
        if end == n_tokens:
            return windows
        start, score_from = end - overlap, end


def pack_by_length(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group row indices (longest first) into batches with rows * longest <= batch_tokens.

    >>> pack_by_length([3, 5, 2, 5], 10)
    [[1, 3], [0, 2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class EntropyScorer:
    """Scores documents with a causal LM (any ``transformers`` ``*ForCausalLM``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        vocab_size: int,
        top_k: int = 16,
        window_tokens: int = 2048,
        window_overlap: int = 512,
        batch_tokens: int = 8192,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model.eval()
        self.vocab_size = vocab_size
        self.top_k = top_k
        self.window_tokens = window_tokens
        self.window_overlap = window_overlap
        self.batch_tokens = max(batch_tokens, window_tokens)
        self.device = torch.device(device)
        self.forward_calls = 0

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        vocab_size: int,
        dtype: str = "float32",
        device: str = "auto",
        **kwargs: Any,
    ) -> EntropyScorer:
        """Load a HF causal LM directory (safetensors preferred; no remote code)."""
        from transformers import AutoModelForCausalLM

        resolved = resolve_device(device)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch_dtype(dtype, "data.entropy_dtype")
            )
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot load the entropy proxy model ({exc})") from None
        out = model.get_output_embeddings()
        n_out = out.weight.shape[0] if out is not None else model.config.vocab_size
        if n_out < vocab_size:
            raise DataError(
                f"{path}: proxy model has {n_out} output logits but the tokenizer has "
                f"{vocab_size} tokens; it cannot score this tokenizer's ids"
            )
        return cls(model.to(resolved), vocab_size=vocab_size, device=resolved, **kwargs)

    @torch.inference_mode()
    def _forward(self, rows: list[np.ndarray]) -> list[torch.Tensor]:
        """Entropies of next tokens for each row: row r [L_r] -> [L_r - 1] (positions 1..)."""
        self.forward_calls += 1
        longest = max(len(r) for r in rows)
        ids_BL = torch.zeros((len(rows), longest), dtype=torch.long)
        mask_BL = torch.zeros((len(rows), longest), dtype=torch.long)
        for b, row in enumerate(rows):
            ids_BL[b, : len(row)] = torch.from_numpy(np.asarray(row, dtype=np.int64))
            mask_BL[b, : len(row)] = 1
        logits_BLV = self.model(
            input_ids=ids_BL.to(self.device),
            attention_mask=mask_BL.to(self.device),
            use_cache=False,
        ).logits
        ent_BL = topk_entropy(logits_BLV[..., : self.vocab_size], self.top_k).cpu()
        return [ent_BL[b, : len(row) - 1] for b, row in enumerate(rows)]

    def score_documents(self, docs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """float32 [n] per document: NaN at position 0, H_t at t >= 1."""
        out = [np.full(len(d), np.nan, dtype=np.float32) for d in docs]
        jobs = [
            (d, w)
            for d, doc in enumerate(docs)
            for w in plan_windows(len(doc), self.window_tokens, self.window_overlap)
        ]
        rows = [docs[d][s:e] for d, (s, e, _) in jobs]
        for batch in pack_by_length([len(r) for r in rows], self.batch_tokens):
            for j, ent_L in zip(batch, self._forward([rows[j] for j in batch]), strict=True):
                d, (start, end, score_from) = jobs[j]
                # row position i predicts document position start + i + 1
                out[d][score_from:end] = ent_L[score_from - start - 1 :].numpy()
        return out


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"data.entropy_device={device}: no CUDA device is available")
    return torch.device(device)


@dataclass
class ScoringStats:
    """What one (possibly resumed) scoring run did."""

    documents_scored: int = 0
    documents_resumed: int = 0
    tokens_scored: int = 0
    seconds: float = 0.0


def _save_done(path: Path, done: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, done)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def score_corpus(
    scorer: EntropyScorer,
    get_doc: Callable[[int], np.ndarray],
    offsets: np.ndarray,
    entropy_path: Path,
    done_path: Path,
    *,
    chunk_tokens: int | None = None,
    progress: bool | None = None,
) -> ScoringStats:
    """Fill the float16 memmap ``entropy_path`` (aligned with the concatenated documents).

    Args:
        get_doc: document index -> its token ids.
        offsets: int64 [D+1], document d is tokens[offsets[d]:offsets[d+1]].
        done_path: bool [D] array of finished documents (``.npy``); resumes from it.
        chunk_tokens: tokens per resumable chunk (default 4 x the scorer's batch budget).
        progress: tqdm bar (None: only on a terminal).
    """
    from tqdm.auto import tqdm

    n_docs, total = len(offsets) - 1, int(offsets[-1])
    fresh = not (entropy_path.exists() and done_path.exists())
    ent = np.memmap(entropy_path, dtype=np.float16, mode="w+" if fresh else "r+", shape=(total,))
    if fresh:
        ent[:] = np.nan
        done = np.zeros(n_docs, dtype=bool)
    else:
        done = np.load(done_path)
        assert done.shape == (n_docs,), "work directory does not match the tokens"
    lengths = np.diff(offsets)
    stats = ScoringStats(documents_resumed=int(done.sum()))
    todo = [d for d in range(n_docs) if not done[d]]
    if stats.documents_resumed:
        logger.info(
            "resuming entropy scoring: %d of %d documents already scored",
            stats.documents_resumed,
            n_docs,
        )
    chunk_tokens = chunk_tokens or 4 * scorer.batch_tokens
    bar = tqdm(
        total=int(lengths[todo].sum()) if todo else 0,
        unit="tok",
        desc="entropy",
        disable=(not progress) if progress is not None else None,
    )
    start_time = time.perf_counter()
    i = 0
    while i < len(todo):
        chunk, size = [], 0
        while i < len(todo) and (not chunk or size + lengths[todo[i]] <= chunk_tokens):
            chunk.append(todo[i])
            size += int(lengths[todo[i]])
            i += 1
        for d, scores in zip(
            chunk, scorer.score_documents([get_doc(d) for d in chunk]), strict=True
        ):
            ent[offsets[d] : offsets[d + 1]] = scores
        ent.flush()  # scores reach the file before the chunk is marked done
        done[chunk] = True
        _save_done(done_path, done)
        stats.documents_scored += len(chunk)
        stats.tokens_scored += size
        bar.update(size)
    bar.close()
    stats.seconds = time.perf_counter() - start_time
    del ent
    return stats


__all__ = [
    "EntropyScorer",
    "ScoringStats",
    "plan_windows",
    "resolve_device",
    "score_corpus",
    "topk_entropy",
]
