"""Read prepared RPT samples back with O(1) memory per sample.

``SampleStore.open(prepared_dir, split)`` memory-maps the sample array, the token
``IndexedDataset`` and the entropy array written by ``pipeline.prepare_data``; a sample's
context and continuation are sliced out of the document's tokens only when it is accessed.
The only per-document state held in memory is the list of document ids and token offsets.
Usage::

    store = SampleStore.open("runs/data/champ", "train")
    sample = store[0]
    sample.continuation_token_bytes[0]     # exact bytes of x_t
    store.context_text(sample)             # the context as text, for the prompt
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from megatron_rpt.config_utils import update_from_dict
from megatron_rpt.data.config import DataConfig
from megatron_rpt.data.pipeline import FORMAT_NAME, FORMAT_VERSION
from megatron_rpt.data.samples import SAMPLE_DTYPE
from megatron_rpt.data.tokens import (
    ByteVocabulary,
    decode_utf8_trimmed,
    read_vocab_bytes,
    table_digest,
)
from megatron_rpt.data.types import RPTSample, difficulty_bucket
from megatron_rpt.errors import DataError

Split = Literal["train", "valid"]


def read_meta(prepared_dir: str | Path) -> dict[str, Any]:
    """``meta.json`` of a prepared directory, checked for format and version."""
    path = Path(prepared_dir) / "meta.json"
    if not path.is_file():
        raise DataError(
            f"{prepared_dir}: not a prepared data directory (no meta.json; run "
            "tools/prepare_rpt_data.py, or it was interrupted)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON or not UTF-8
        raise DataError(f"{path}: unreadable ({exc}); prepare the data again") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not a JSON object; prepare the data again")
    if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format {meta.get('format')} v{meta.get('format_version')}, expected "
            f"{FORMAT_NAME} v{FORMAT_VERSION}; prepare the data again"
        )
    return meta


def data_config_from_meta(meta: dict[str, Any]) -> DataConfig:
    """The DataConfig a prepared directory was made with (unknown keys are ignored)."""
    known = {f.name for f in fields(DataConfig)}
    return update_from_dict(
        DataConfig(), {k: v for k, v in meta["data_config"].items() if k in known}
    )


class SampleStore:
    """Random access to the samples of one split of a prepared directory."""

    def __init__(
        self,
        prepared_dir: Path,
        split: Split,
        *,
        meta: dict[str, Any],
        context_tokens: int,
        continuation_tokens: int,
    ) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prepared_dir = prepared_dir
        self.split = split
        self.meta = meta
        self.config = data_config_from_meta(meta)
        self.context_tokens = context_tokens
        self.continuation_tokens = continuation_tokens
        self.thresholds = tuple(self.config.difficulty_thresholds)
        samples_file = prepared_dir / f"samples-{split}.npy"
        self.samples = _read(samples_file, lambda: np.load(samples_file, mmap_mode="r"))
        if self.samples.dtype != SAMPLE_DTYPE or self.samples.ndim != 1:
            raise DataError(f"{samples_file}: not a sample array ({self.samples.dtype})")
        self.tokens = _read(
            prepared_dir / "tokens.idx",
            lambda: IndexedDataset(str(prepared_dir / "tokens"), mmap=True),
        )
        self.table = _read(prepared_dir / "vocab_bytes.idx", lambda: read_vocab_bytes(prepared_dir))
        if table_digest(self.table) != meta["tokenizer"]["byte_table_blake2b"]:
            raise DataError(f"{prepared_dir}: vocab_bytes files do not match meta.json")
        docs_file = prepared_dir / "documents.jsonl"
        self.doc_ids = _read(docs_file, lambda: _doc_ids(docs_file))
        lengths = self.tokens.sequence_lengths
        self.doc_offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        _check_consistency(self, meta)

    @classmethod
    def open(
        cls,
        prepared_dir: str | Path,
        split: Split = "train",
        *,
        context_tokens: int | None = None,
        continuation_tokens: int | None = None,
    ) -> SampleStore:
        """Open ``split`` of ``prepared_dir``; lengths default to the prepared DataConfig's."""
        if split not in ("train", "valid"):
            raise DataError(f"split must be 'train' or 'valid', got {split!r}")
        prepared_dir = Path(prepared_dir)
        meta = read_meta(prepared_dir)
        cfg = meta["data_config"]
        for name in (
            f"samples-{split}.npy",
            "tokens.bin",
            "tokens.idx",
            "entropy.bin",
            "documents.jsonl",
        ):
            if not (prepared_dir / name).is_file():
                raise DataError(f"{prepared_dir / name}: missing from the prepared directory")
        return cls(
            prepared_dir,
            split,
            meta=meta,
            context_tokens=int(context_tokens or cfg["context_tokens"]),
            continuation_tokens=int(continuation_tokens or cfg["continuation_tokens"]),
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get the paths and reopen the memory maps, not copies of the data.
        return {
            "prepared_dir": self.prepared_dir,
            "split": self.split,
            "context_tokens": self.context_tokens,
            "continuation_tokens": self.continuation_tokens,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["prepared_dir"],
            state["split"],
            meta=read_meta(state["prepared_dir"]),
            context_tokens=state["context_tokens"],
            continuation_tokens=state["continuation_tokens"],
        )

    def __getitem__(self, index: int) -> RPTSample:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"sample {index} out of range for {n} {self.split} samples")
        index %= n
        rec = self.samples[index]
        doc, t = int(rec["doc_index"]), int(rec["position"])
        n_tokens = int(self.tokens.sequence_lengths[doc])
        c0 = max(0, t - self.context_tokens)
        k = min(self.continuation_tokens, n_tokens - t)
        context = np.asarray(self.tokens.get(doc, offset=c0, length=t - c0), dtype=np.int64)
        continuation = np.asarray(self.tokens.get(doc, offset=t, length=k), dtype=np.int64)
        if len(context) and int(max(context.max(), continuation.max(initial=0))) >= len(self.table):
            raise DataError(
                f"{self.prepared_dir / 'tokens.bin'}: document {doc} holds token ids beyond the "
                f"vocabulary ({len(self.table)}); the file is corrupted, prepare the data again"
            )
        entropy = float(rec["entropy"])
        return RPTSample(
            sample_index=index,
            doc_index=doc,
            doc_id=self.doc_ids[doc],
            position=t,
            context_ids=context,
            continuation_ids=continuation,
            continuation_token_bytes=tuple(self.table[i] for i in continuation.tolist()),
            entropy=entropy,
            bucket=difficulty_bucket(entropy, self.thresholds),
        )

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of token ids via the exact byte table (a cut character at either end is
        dropped; see ``tokens.decode_utf8_trimmed``)."""
        return decode_utf8_trimmed(b"".join(self.table[int(i)] for i in ids))

    def context_text(self, sample: RPTSample) -> str:
        """The sample's context as text, exactly as it appears in the document."""
        return self.decode(sample.context_ids)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise DataError unless ``tokenizer`` maps ids to the same bytes as the prepared data."""
        digest = ByteVocabulary.from_tokenizer(tokenizer).digest()
        if digest != self.meta["tokenizer"]["byte_table_blake2b"]:
            raise DataError(
                f"{self.prepared_dir}: prepared with tokenizer "
                f"{self.meta['tokenizer']['name_or_path']}, which differs from "
                f"{getattr(tokenizer, 'name_or_path', 'the given tokenizer')}; prepare the data "
                "again with the policy's tokenizer"
            )


def _read(path: Path, load: Any) -> Any:
    """``load()``; any failure is a DataError naming ``path``."""
    try:
        return load()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt numpy/indexed/JSON files
        raise DataError(f"{path}: unreadable ({exc}); prepare the data again") from None


def _doc_ids(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["doc_id"] for line in fh]


def _check_consistency(store: SampleStore, meta: dict[str, Any]) -> None:
    """File sizes and sample bounds against meta.json, so corruption fails here by name."""
    d, summary = store.prepared_dir, meta.get("summary", {})
    lengths = np.asarray(store.tokens.sequence_lengths, dtype=np.int64)
    n_docs, n_tokens = len(lengths), int(lengths.sum())
    itemsize = np.dtype(store.tokens.index.dtype).itemsize
    if (d / "tokens.bin").stat().st_size != n_tokens * itemsize:
        raise DataError(f"{d / 'tokens.bin'}: size does not match tokens.idx (truncated?)")
    if summary.get("tokens", n_tokens) != n_tokens or summary.get("documents", n_docs) != n_docs:
        raise DataError(f"{d / 'tokens.idx'}: token/document counts differ from meta.json")
    if len(store.doc_ids) != n_docs:
        raise DataError(f"{d / 'documents.jsonl'}: {len(store.doc_ids)} lines, {n_docs} expected")
    expected = summary.get("kept_train" if store.split == "train" else "valid_positions")
    path = d / f"samples-{store.split}.npy"
    if expected is not None and len(store.samples) != expected:
        raise DataError(f"{path}: {len(store.samples)} samples, meta.json says {expected}")
    doc = np.asarray(store.samples["doc_index"], dtype=np.int64)
    pos = np.asarray(store.samples["position"], dtype=np.int64)
    bad = (doc < 0) | (doc >= n_docs)
    if not bad.any():
        bad = (pos < 0) | (pos >= lengths[doc])
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            f"{path}: sample {i} points outside its document (doc_index {doc[i]}, position "
            f"{pos[i]}); the file is corrupted, prepare the data again"
        )


__all__ = ["SampleStore", "data_config_from_meta", "read_meta"]
