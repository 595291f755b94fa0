"""The positions an evaluation scores: a held-out split of prepared data, or a raw corpus.

``EvalSet`` holds the token ids of the evaluated documents, one row per scored position
(document, position t, entropy of x_t given x<t) and the exact token bytes, whatever the
source:

* ``load_prepared_split(dir, "valid")``: every eligible position of the validation documents
  written by ``tools/prepare_rpt_data.py`` (entropies from the data's proxy model);
* ``load_corpus(data_cfg, tokenizer, scorer)``: any corpus ``DataConfig`` can read, tokenised
  with the evaluated models' tokenizer and scored on the fly; every document is treated as
  held out and every eligible position (``data/samples.py``) is kept.

``rescore_entropy`` replaces the entropies with another model's (the paper buckets its
held-out set with the evaluated 14B base model, not with the 1.5B training proxy).

Letters: P positions, D documents.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_rpt.data.config import DataConfig
from megatron_rpt.data.readers import ReadStats, iter_documents
from megatron_rpt.data.samples import select_positions
from megatron_rpt.data.tokens import ByteVocabulary, decode_utf8_trimmed
from megatron_rpt.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Documents and the positions of them that are evaluated (arrays aligned on P)."""

    source: str
    """Where the positions come from (prepared directory + split, or the corpus), for reports."""
    tokenizer_name: str
    """Tokenizer the token ids come from."""
    tokenizer_digest: str
    """blake2b digest of its id -> bytes table (``data/tokens.table_digest``)."""
    table: Sequence[bytes]
    """Exact bytes of every token id."""
    doc_ids: list[str]
    """Stable id of each document [D]."""
    doc_tokens: Sequence[np.ndarray]
    """int64 token ids of each document [D][n_d] (read lazily from prepared data)."""
    doc_P: np.ndarray
    """int64 [P]: index into doc_ids/doc_tokens of each position's document."""
    position_P: np.ndarray
    """int64 [P]: t, the index of the target token x_t in its document."""
    entropy_P: np.ndarray
    """float32 [P]: top-k entropy (nats) of x_t given x<t under ``entropy_source``."""
    entropy_source: str
    """Model whose entropies bucket the positions."""
    context_tokens: int
    """Reasoning prompts hold the last this-many document tokens before t."""
    continuation_tokens: int
    """True continuation tokens kept for the reward (K)."""

    def __len__(self) -> int:
        return len(self.position_P)

    def subset(self, index_P: np.ndarray) -> EvalSet:
        """The same documents with only the positions ``index_P`` (kept in that order)."""
        index_P = np.asarray(index_P, dtype=np.int64)
        return dataclasses.replace(
            self,
            doc_P=self.doc_P[index_P],
            position_P=self.position_P[index_P],
            entropy_P=self.entropy_P[index_P],
        )

    def with_entropy(self, entropy_P: np.ndarray, source: str) -> EvalSet:
        """The same positions bucketed by other entropies."""
        assert len(entropy_P) == len(self)
        return dataclasses.replace(
            self, entropy_P=np.asarray(entropy_P, dtype=np.float32), entropy_source=source
        )

    def context_ids(self, i: int) -> np.ndarray:
        """x[max(0, t-C):t] of position i."""
        ids, t = self.doc_tokens[self.doc_P[i]], int(self.position_P[i])
        return ids[max(0, t - self.context_tokens) : t]

    def continuation_ids(self, i: int) -> np.ndarray:
        """x[t:t+K] of position i (the true next token first)."""
        ids, t = self.doc_tokens[self.doc_P[i]], int(self.position_P[i])
        return ids[t : t + self.continuation_tokens]

    def continuation_bytes(self, i: int) -> tuple[bytes, ...]:
        """Exact bytes of each continuation token of position i."""
        return tuple(self.table[int(j)] for j in self.continuation_ids(i))

    def context_text(self, i: int) -> str:
        """The context of position i as text (a character cut by left truncation is dropped)."""
        return decode_utf8_trimmed(b"".join(self.table[int(j)] for j in self.context_ids(i)))

    def rows_by_doc(self) -> dict[int, np.ndarray]:
        """Document -> indices of its positions (in order of position), one sort over P."""
        order = np.lexsort((self.position_P, self.doc_P))
        docs, starts = np.unique(self.doc_P[order], return_index=True)
        return dict(zip(docs.tolist(), np.split(order, starts[1:]), strict=True))

    def target_ids(self) -> np.ndarray:
        """int64 [P]: x_t of every position (each document is read once)."""
        out = np.empty(len(self), dtype=np.int64)
        for d, rows in self.rows_by_doc().items():
            out[rows] = self.doc_tokens[d][self.position_P[rows]]
        return out


class _IndexedDocs(Sequence):
    """Documents of a Megatron ``IndexedDataset`` by local index, read on access (mmap).

    The last few documents read are kept, since the windows and positions of one document are
    visited together.
    """

    def __init__(self, dataset: Any, doc_indices: np.ndarray, cache: int = 16) -> None:
        self.dataset = dataset
        self.doc_indices = doc_indices
        self._read = functools.lru_cache(maxsize=cache)(self._read_uncached)

    def _read_uncached(self, d: int) -> np.ndarray:
        return np.asarray(self.dataset[int(self.doc_indices[d])], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.doc_indices)

    def __getitem__(self, d: int) -> np.ndarray:  # type: ignore[override]
        return self._read(int(d))


def _require_positions(n: int, where: str) -> None:
    if n == 0:
        raise DataError(
            f"{where}: no positions to evaluate (the split is empty; hold out more documents "
            "with data.validation_fraction, or check data.min_context_tokens)"
        )


def load_prepared_split(
    prepared_dir: str | Path, split: str = "valid", *, context_tokens: int | None = None
) -> EvalSet:
    """Every position of ``split`` in a prepared directory (validation: every eligible one).

    Position arrays are held in memory (about 20 bytes per position); document tokens are read
    from the memory-mapped ``tokens.bin`` only when a document is evaluated.
    """
    from megatron_rpt.data.store import SampleStore

    store = SampleStore.open(prepared_dir, split, context_tokens=context_tokens)  # type: ignore[arg-type]
    where = f"{prepared_dir} (split {split})"
    _require_positions(len(store), where)
    samples = np.asarray(store.samples)
    docs, doc_P = np.unique(samples["doc_index"].astype(np.int64), return_inverse=True)
    meta = store.meta
    return EvalSet(
        source=where,
        tokenizer_name=str(meta["tokenizer"]["name_or_path"]),
        tokenizer_digest=str(meta["tokenizer"]["byte_table_blake2b"]),
        table=store.table,
        doc_ids=[store.doc_ids[int(d)] for d in docs],
        doc_tokens=_IndexedDocs(store.tokens, docs),
        doc_P=doc_P.astype(np.int64),
        position_P=samples["position"].astype(np.int64),
        entropy_P=samples["entropy"].astype(np.float32),
        entropy_source=f"prepared data proxy ({meta['proxy_model']['path']}, "
        f"top-{meta['proxy_model']['top_k']})",
        context_tokens=store.context_tokens,
        continuation_tokens=store.continuation_tokens,
    )


def load_corpus(cfg: DataConfig, tokenizer: Any, scorer: Any, *, scorer_name: str) -> EvalSet:
    """Tokenise and score a corpus on the fly; every document is held out.

    Args:
        cfg: how to read the corpus (``corpus``, ``corpus_format``, fields, ``max_documents``,
            ``min_context_tokens``, ``context_tokens``, ``continuation_tokens``).
        tokenizer: the evaluated models' tokenizer.
        scorer: an ``EntropyScorer`` that shares the tokenizer.
    """
    vocab = ByteVocabulary.from_tokenizer(tokenizer)
    stats, doc_ids, doc_tokens = ReadStats(), [], []
    for doc in iter_documents(cfg, stats, vocab_size=len(vocab)):
        if cfg.max_documents is not None and len(doc_ids) >= cfg.max_documents:
            break
        if doc.token_ids is not None:
            ids = np.asarray(doc.token_ids, dtype=np.int64)
        else:
            ids = np.asarray(
                tokenizer(doc.text, add_special_tokens=False, split_special_tokens=True)[
                    "input_ids"
                ],
                dtype=np.int64,
            )
            if not vocab.roundtrip_ok(ids, doc.text):
                stats.skip("token bytes differ from the text", doc.source)
                continue
        if len(ids):
            doc_ids.append(doc.doc_id)
            doc_tokens.append(ids)
    if stats.skipped:
        logger.warning("corpus %s: skipped documents %s", cfg.corpus, dict(stats.skipped))
    if not doc_tokens:
        raise DataError(f"data.corpus {cfg.corpus}: no usable documents to evaluate")
    ok_target = vocab.target_mask()
    rows = []
    for d, ent in enumerate(scorer.score_documents(doc_tokens)):
        rec = {"split": "valid", "doc_id": doc_ids[d]}
        kept = select_positions(cfg, rec, doc_tokens[d], ent, ok_target)[1]
        rows.extend((d, int(t), float(ent[t])) for t in kept)
    _require_positions(len(rows), f"data.corpus {cfg.corpus}")
    arr = np.array(rows, dtype=np.float64)
    return EvalSet(
        source=f"corpus {cfg.corpus}",
        tokenizer_name=str(getattr(tokenizer, "name_or_path", "")),
        tokenizer_digest=vocab.digest(),
        table=vocab.table,
        doc_ids=doc_ids,
        doc_tokens=doc_tokens,
        doc_P=arr[:, 0].astype(np.int64),
        position_P=arr[:, 1].astype(np.int64),
        entropy_P=arr[:, 2].astype(np.float32),
        entropy_source=f"{scorer_name}, top-{scorer.top_k}",
        context_tokens=cfg.context_tokens,
        continuation_tokens=cfg.continuation_tokens,
    )


def rescore_entropy(eval_set: EvalSet, scorer: Any, *, scorer_name: str) -> EvalSet:
    """Bucket ``eval_set`` by ``scorer``'s entropies instead (one pass per document)."""
    used = np.unique(eval_set.doc_P)
    scores = scorer.score_documents([eval_set.doc_tokens[d] for d in used])
    by_doc = dict(zip(used.tolist(), scores, strict=True))
    entropy_P = np.array(
        [by_doc[int(d)][int(t)] for d, t in zip(eval_set.doc_P, eval_set.position_P, strict=True)],
        dtype=np.float32,
    )
    return eval_set.with_entropy(entropy_P, f"{scorer_name}, top-{scorer.top_k}")


__all__ = ["EvalSet", "load_corpus", "load_prepared_split", "rescore_entropy"]
