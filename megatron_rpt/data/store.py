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
    meta = json.loads(path.read_text(encoding="utf-8"))
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
        self.samples = np.load(prepared_dir / f"samples-{split}.npy", mmap_mode="r")
        assert self.samples.dtype == SAMPLE_DTYPE, self.samples.dtype
        self.tokens = IndexedDataset(str(prepared_dir / "tokens"), mmap=True)
        self.table = read_vocab_bytes(prepared_dir)
        if table_digest(self.table) != meta["tokenizer"]["byte_table_blake2b"]:
            raise DataError(f"{prepared_dir}: vocab_bytes files do not match meta.json")
        self.doc_ids = [
            json.loads(line)["doc_id"]
            for line in open(prepared_dir / "documents.jsonl", encoding="utf-8")
        ]
        lengths = self.tokens.sequence_lengths
        self.doc_offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

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

    def document_entropy(self, doc_index: int) -> np.ndarray:
        """float16 [n_tokens] entropies of one document (memory-mapped)."""
        ent = np.memmap(self.prepared_dir / "entropy.bin", dtype=np.float16, mode="r")
        return ent[self.doc_offsets[doc_index] : self.doc_offsets[doc_index + 1]]

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


__all__ = ["SampleStore", "data_config_from_meta", "read_meta"]
