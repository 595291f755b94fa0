"""Read corpus documents: embedded CHAMP, JSONL, plain text, Megatron indexed datasets.

``DataConfig.corpus`` is one entry or several joined with commas; each entry is

* ``embedded:champ``: the CHAMP problems with their human solutions (``assets.champ_documents``);
* a ``.jsonl`` file: one JSON object per line, text in ``text_field``, optional id in
  ``id_field`` (default id ``<file name>:<line>``); blank lines are ignored;
* a ``.txt`` file: the whole file is one document (id ``<file name>``);
* a directory: its ``*.txt`` and ``*.jsonl`` files (not recursive), sorted by name;
* a Megatron indexed dataset prefix (``PREFIX.bin`` + ``PREFIX.idx``, e.g. written by
  Megatron-LM's ``tools/preprocess_data.py``): documents are already token ids and are read
  with ``megatron.core.datasets.indexed_dataset.IndexedDataset`` (one document = the sequences
  between two ``document_indices`` entries). Every id must be below the tokenizer's vocabulary
  size (a corpus tokenised with another tokenizer is the usual cause of a failure).

Invalid UTF-8 (``on_invalid_utf8``): ``error`` stops with the file, line and byte offset;
``replace`` substitutes U+FFFD for the bad bytes; ``skip`` drops the document and reports it in
the summary. Text that cannot be encoded as UTF-8 (a JSON ``\\udXXX`` lone surrogate) falls
under the same policy.

The train/validation split is decided per document by a salted blake2b hash of its id
(:func:`split_of`): deterministic, independent of corpus order and of ``max_documents``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_rpt.assets import champ_documents
from megatron_rpt.data.config import DataConfig
from megatron_rpt.data.types import CorpusDocument
from megatron_rpt.errors import DataError

EMBEDDED_CHAMP = "embedded:champ"


@dataclass
class ReadStats:
    """Documents dropped while reading (per reason), with a few examples for the summary."""

    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    replaced_utf8: int = 0

    def skip(self, reason: str, where: str) -> None:
        """Count one skipped document."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {reason}")


def split_of(doc_id: str, validation_fraction: float, seed: int) -> str:
    """'valid' or 'train' from a salted hash of the document id.

    >>> split_of("doc-1", 0.0, 1), split_of("doc-1", 1.0, 1)
    ('train', 'valid')
    >>> split_of("doc-1", 0.5, 7) == split_of("doc-1", 0.5, 7)
    True
    """
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest()
    return "valid" if int.from_bytes(digest, "little") / 2**64 < validation_fraction else "train"


def corpus_entries(cfg: DataConfig) -> list[str]:
    """The comma-separated entries of ``cfg.corpus``."""
    entries = [e.strip() for e in cfg.corpus.split(",") if e.strip()]
    if not entries:
        raise DataError("data.corpus: empty corpus specification")
    return entries


def entry_format(entry: str, cfg: DataConfig) -> str:
    """Resolve ``corpus_format='auto'`` for one entry (champ / jsonl / text / indexed / dir)."""
    if entry == EMBEDDED_CHAMP:
        return "champ"
    if entry.startswith("embedded:"):
        raise DataError(f"data.corpus: unknown embedded corpus {entry!r}; known: {EMBEDDED_CHAMP}")
    path = Path(entry)
    if cfg.corpus_format == "indexed" or (
        cfg.corpus_format == "auto" and Path(entry + ".idx").is_file()
    ):
        return "indexed"
    if path.is_dir():
        return "dir"
    if not path.exists():
        if Path(entry + ".bin").exists() or Path(entry + ".idx").exists():
            missing = ".idx" if Path(entry + ".bin").exists() else ".bin"
            raise DataError(f"{entry}{missing}: indexed dataset file not found")
        raise DataError(f"{path}: corpus file not found")
    if cfg.corpus_format != "auto":
        return cfg.corpus_format
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".txt":
        return "text"
    raise DataError(
        f"{path}: cannot tell the corpus format from the name (expected .jsonl, .txt, a "
        "directory or an indexed-dataset prefix); set data.corpus_format"
    )


def input_files(cfg: DataConfig) -> list[str]:
    """Every file the corpus reads (for the resume fingerprint)."""
    files: list[str] = []
    for entry in corpus_entries(cfg):
        fmt = entry_format(entry, cfg)
        if fmt == "indexed":
            files += [entry + ".bin", entry + ".idx"]
        elif fmt == "dir":
            files += [str(p) for p in _dir_files(Path(entry), cfg)]
        elif fmt != "champ":
            files.append(entry)
    return files


def _dir_files(path: Path, cfg: DataConfig) -> list[Path]:
    patterns = {"jsonl": ["*.jsonl"], "text": ["*.txt"]}.get(
        cfg.corpus_format, ["*.txt", "*.jsonl"]
    )
    files = sorted({p for pat in patterns for p in path.glob(pat) if p.is_file()})
    if not files:
        raise DataError(f"{path}: directory has no {' or '.join(patterns)} files")
    return files


def _decode(
    raw: bytes, where: str, base_offset: int, cfg: DataConfig, stats: ReadStats
) -> str | None:
    """UTF-8 per the policy; None when the document is to be skipped."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if cfg.on_invalid_utf8 == "error":
            raise DataError(
                f"{where}: invalid UTF-8 at byte offset {base_offset + exc.start} "
                "(set data.on_invalid_utf8=replace or skip)"
            ) from None
        if cfg.on_invalid_utf8 == "skip":
            stats.skip("invalid UTF-8", where)
            return None
        stats.replaced_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def _check_encodable(text: str, where: str, cfg: DataConfig, stats: ReadStats) -> str | None:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as exc:
        if cfg.on_invalid_utf8 == "error":
            raise DataError(
                f"{where}: text has a lone surrogate at character {exc.start} and is not valid "
                "UTF-8 (set data.on_invalid_utf8=replace or skip)"
            ) from None
        if cfg.on_invalid_utf8 == "skip":
            stats.skip("invalid UTF-8", where)
            return None
        stats.replaced_utf8 += 1
        return text.encode("utf-8", errors="replace").decode("utf-8")


def _read_jsonl(path: Path, cfg: DataConfig, stats: ReadStats) -> Iterator[CorpusDocument]:
    offset, limit = 0, cfg.max_document_bytes
    with open(path, "rb") as fh:
        # readline(limit + 1): a huge line is refused after limit bytes, never read whole.
        for lineno, raw in enumerate(iter(lambda: fh.readline(limit + 1), b""), start=1):
            line_offset, offset = offset, offset + len(raw)
            where = f"{path}:{lineno}"
            if len(raw.rstrip(b"\r\n")) > limit:
                raise _too_large(where, cfg)
            if not raw.strip():
                continue
            line = _decode(raw, where, line_offset, cfg, stats)
            if line is not None:
                obj = _loads(line, where)
                yield from _jsonl_document(obj, path, lineno, cfg, stats)


def _loads(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def _jsonl_document(
    obj: object, path: Path, lineno: int, cfg: DataConfig, stats: ReadStats
) -> Iterator[CorpusDocument]:
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if cfg.text_field not in obj:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise DataError(
            f"{where}: field '{cfg.text_field}' (data.text_field) missing; keys present: {keys}"
        )
    text = obj[cfg.text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{cfg.text_field}' is {type(text).__name__}, not a string")
    doc_id = f"{path.name}:{lineno}"
    if cfg.id_field is not None:
        if cfg.id_field not in obj:
            keys = ", ".join(sorted(map(str, obj)))
            raise DataError(
                f"{where}: field '{cfg.id_field}' (data.id_field) missing; keys present: {keys}"
            )
        doc_id = str(obj[cfg.id_field])
    text = _check_encodable(text, where, cfg, stats)
    if text is not None:
        yield CorpusDocument(doc_id=doc_id, source=where, text=text)


def _too_large(where: str, cfg: DataConfig) -> DataError:
    return DataError(
        f"{where}: document longer than data.max_document_bytes={cfg.max_document_bytes}; "
        "split it into smaller documents or raise the setting"
    )


def _read_text(path: Path, cfg: DataConfig, stats: ReadStats) -> Iterator[CorpusDocument]:
    with open(path, "rb") as fh:
        raw = fh.read(cfg.max_document_bytes + 1)  # bounded even for /dev/zero
    if len(raw) > cfg.max_document_bytes:
        raise _too_large(str(path), cfg)
    text = _decode(raw, str(path), 0, cfg, stats)
    if text is not None:
        yield CorpusDocument(doc_id=path.name, source=str(path), text=text)


def _read_indexed(prefix: str, vocab_size: int | None) -> Iterator[CorpusDocument]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise DataError(f"{prefix}{suffix}: indexed dataset file not found")
    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except Exception as exc:  # a corrupt .idx raises assorted errors inside megatron
        raise DataError(f"{prefix}.idx: cannot read indexed dataset ({exc})") from None
    bounds = dataset.document_indices
    name = Path(prefix).name
    for doc in range(len(bounds) - 1):
        lo, hi = int(bounds[doc]), int(bounds[doc + 1])
        parts = [np.asarray(dataset[i]) for i in range(lo, hi)]
        ids = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        if ids.size and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size)):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise DataError(
                f"{prefix}.bin: document {doc} has token id {bad}, outside the tokenizer's "
                f"vocabulary of {vocab_size} (was it tokenised with another tokenizer?)"
            )
        yield CorpusDocument(doc_id=f"{name}:{doc}", source=f"{prefix}:{doc}", token_ids=ids)


def _read_champ() -> Iterator[CorpusDocument]:
    for doc in champ_documents():
        yield CorpusDocument(doc_id=doc.doc_id, source=doc.source, text=doc.text)


def iter_documents(
    cfg: DataConfig, stats: ReadStats, *, vocab_size: int | None = None
) -> Iterator[CorpusDocument]:
    """Every document of every corpus entry, in order; duplicate ids raise DataError."""
    seen: dict[str, str] = {}
    for entry in corpus_entries(cfg):
        fmt = entry_format(entry, cfg)
        if fmt == "champ":
            docs = _read_champ()
        elif fmt == "indexed":
            docs = _read_indexed(entry, vocab_size)
        elif fmt == "dir":
            docs = (
                d
                for p in _dir_files(Path(entry), cfg)
                for d in (
                    _read_jsonl(p, cfg, stats)
                    if p.suffix == ".jsonl"
                    else _read_text(p, cfg, stats)
                )
            )
        elif fmt == "jsonl":
            docs = _read_jsonl(Path(entry), cfg, stats)
        else:
            docs = _read_text(Path(entry), cfg, stats)
        for doc in docs:
            if doc.doc_id in seen:
                raise DataError(
                    f"{doc.source}: duplicate document id {doc.doc_id!r} (first at "
                    f"{seen[doc.doc_id]}); ids must be unique for the split"
                )
            seen[doc.doc_id] = doc.source
            yield doc


__all__ = [
    "EMBEDDED_CHAMP",
    "ReadStats",
    "corpus_entries",
    "input_files",
    "iter_documents",
    "split_of",
]
