"""Plain records passed between the data modules (no I/O, no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Bucket = Literal["none", "easy", "medium", "hard"]
BUCKETS: tuple[Bucket, ...] = ("easy", "medium", "hard")


@dataclass(frozen=True)
class CorpusDocument:
    """One document as read from the corpus, before tokenisation.

    Exactly one of ``text`` (JSONL, text files, CHAMP) and ``token_ids`` (Megatron indexed
    datasets, already tokenised) is set.
    """

    doc_id: str
    """Stable id; the train/validation split is a hash of it."""
    source: str
    """Where the document came from (file, file:line, or prefix:index), for messages."""
    text: str | None = None
    token_ids: np.ndarray | None = None


@dataclass(frozen=True, eq=False)  # numpy fields: == would be ambiguous
class RPTSample:
    """One RPT question: the context before position t and the true continuation from t.

    ``continuation_token_bytes`` are the exact bytes of the document's own tokens x_t, x_t+1, ...
    (from the byte-level vocabulary), which is what the prefix-match reward compares against.
    Near the end of a document the continuation is shorter than K.
    """

    sample_index: int
    """Index of the sample in its split (``SampleStore[sample_index]``)."""
    doc_index: int
    """Index of the document in the prepared data (``documents.jsonl`` / ``tokens.idx``)."""
    doc_id: str
    """The document's stable id."""
    position: int
    """t: index of the target token x_t inside the document."""
    context_ids: np.ndarray
    """int64 [<= C]: x[max(0, t-C):t], the last C document tokens before t."""
    continuation_ids: np.ndarray
    """int64 [<= K]: x[t:t+K], the true next token first."""
    continuation_token_bytes: tuple[bytes, ...]
    """Exact bytes of each continuation token."""
    entropy: float
    """Proxy model's top-k entropy (nats) of x_t given x<t."""
    bucket: Bucket
    """Highest difficulty bucket whose threshold the entropy exceeds, else 'none'."""


def difficulty_bucket(entropy: float, thresholds: tuple[float, float, float]) -> Bucket:
    """The highest of easy/medium/hard whose threshold ``entropy`` exceeds (strictly).

    The paper's buckets are nested (a hard position is also medium and easy); a sample carries
    the highest one.

    >>> [difficulty_bucket(e, (0.5, 1.0, 1.5)) for e in (0.2, 0.5, 0.7, 1.2, 3.0)]
    ['none', 'none', 'easy', 'medium', 'hard']
    """
    bucket: Bucket = "none"
    for name, threshold in zip(BUCKETS, thresholds, strict=True):
        if entropy > threshold:
            bucket = name
    return bucket


__all__ = ["BUCKETS", "Bucket", "CorpusDocument", "RPTSample", "difficulty_bucket"]
