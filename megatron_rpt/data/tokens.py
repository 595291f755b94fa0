r"""Exact bytes of every token id, and the check that a document's tokens reproduce its text.

The RPT reward compares the UTF-8 bytes of a prediction with the bytes of the document's own
tokens x_t, x_t+1, ... and accepts only lengths that end on a token boundary. Those bytes must
come from the vocabulary itself: ``tokenizer.decode([id])`` of a token that holds half of a
multi-byte character returns U+FFFD, and re-tokenising a continuation string can split it
differently from the document.

Two vocabulary families are supported; the family is read from the tokenizer's backend
(``tokenizers`` JSON: decoder, pre-tokenizer, model), never guessed from the model name:

* **byte-level BPE** (GPT-2, SmolLM2, Qwen2, Llama-3): every vocabulary string is a sequence
  of printable stand-ins for bytes (GPT-2's byte<->unicode map, e.g. ``Ġ`` = space).
* **SentencePiece style** (Llama-2, Mistral; BPE or Unigram with a ``Metaspace`` or
  ``Replace('▁', ' ')`` decoder): ``▁`` stands for a space and ``<0xNN>`` byte-fallback tokens
  for single bytes. These tokenizers usually prepend a space to the whole text ("dummy
  prefix"); :class:`ByteVocabulary` detects that so the round-trip check accounts for it.

Anything else (WordPiece, tokenizers without a ``tokenizers`` backend) raises ``DataError``.
Added and special tokens map to the bytes of their literal text.

Round-trip policy: a document whose token bytes do not reproduce its text exactly (a
normalizer that lower-cases or NFKC-folds, an added token that strips neighbouring spaces) is
**skipped and reported** in the summary by the pipeline; if no document survives, the pipeline
stops with an error naming the tokenizer.

>>> inv = _byte_decoder()
>>> bytes(inv[c] for c in "Ġhello")             # GPT-2 stand-in for a space
b' hello'
>>> decode_utf8_trimmed("é!".encode()[1:])          # a leading half character is dropped
'!'
>>> decode_utf8_trimmed(b"ab" + "é".encode()[:1])  # and so is a trailing one
'ab'
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from megatron_rpt.assets import resolve_model_path
from megatron_rpt.errors import DataError

VocabularyKind = Literal["byte_level", "sentencepiece"]
VOCAB_BYTES_BIN = "vocab_bytes.bin"
VOCAB_BYTES_IDX = "vocab_bytes.idx"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's map from the printable stand-in characters back to byte values."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values, code_points = printable[:], printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            # Bytes that are not printable Latin-1 (controls, space) are shifted past 255.
            byte_values.append(b)
            code_points.append(256 + shift)
            shift += 1
    return {chr(c): b for b, c in zip(byte_values, code_points, strict=True)}


def _backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a transformers tokenizer (or the object itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is None and hasattr(tokenizer, "to_str") and hasattr(tokenizer, "get_vocab"):
        backend = tokenizer
    if backend is None:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise DataError(
            f"tokenizer {name}: needs a fast (`tokenizers`-backed) tokenizer to read exact token "
            "bytes; this one has no backend_tokenizer"
        )
    return backend


def _components(node: dict | None) -> list[dict]:
    """Flatten a decoder/pre-tokenizer/normalizer node (``Sequence`` or single) to a list."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        items = node.get("decoders") or node.get("pretokenizers") or node.get("normalizers") or []
        return [c for item in items for c in _components(item)]
    return [node]


def vocabulary_kind(spec: dict) -> tuple[VocabularyKind, str]:
    """(kind, space stand-in) from a ``tokenizers`` JSON spec; DataError for other families."""
    decoders = _components(spec.get("decoder"))
    pre = _components(spec.get("pre_tokenizer"))
    types = {d.get("type") for d in decoders}
    if "ByteLevel" in types or (not decoders and any(p.get("type") == "ByteLevel" for p in pre)):
        return "byte_level", ""
    for d in decoders + pre:
        if d.get("type") == "Metaspace":
            return "sentencepiece", d.get("replacement", "▁")
    for d in decoders:
        pattern = (d.get("pattern") or {}).get("String")
        if d.get("type") == "Replace" and d.get("content") == " " and pattern:
            return "sentencepiece", pattern
    model = (spec.get("model") or {}).get("type")
    raise DataError(
        f"unsupported tokenizer family (model {model}, decoder {sorted(t for t in types if t)}): "
        "exact token bytes are known only for byte-level BPE and SentencePiece-style vocabularies"
    )


def _piece_bytes(piece: str, kind: VocabularyKind, space: str, byte_fallback: bool) -> bytes:
    if kind == "byte_level":
        inv = _byte_decoder()
        try:
            return bytes(inv[c] for c in piece)
        except KeyError as exc:
            raise DataError(
                f"token {piece!r} contains {exc.args[0]!r}, which is not a byte-level stand-in "
                "character; the tokenizer is not pure byte-level BPE"
            ) from None
    if byte_fallback:
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
    return piece.replace(space, " ").encode("utf-8")


def token_byte_table(tokenizer: Any) -> list[bytes]:
    """Exact bytes of every token id ``0 .. max_id`` (ids without a token map to ``b''``).

    Args:
        tokenizer: a transformers fast tokenizer or a ``tokenizers.Tokenizer``.

    Returns:
        ``table`` with ``b"".join(table[i] for i in ids)`` equal to the UTF-8 text the ids
        encode (plus a leading space for SentencePiece tokenizers that add a dummy prefix).
    """
    return _table_and_kind(tokenizer)[0]


def _table_and_kind(tokenizer: Any) -> tuple[list[bytes], VocabularyKind]:
    backend = _backend(tokenizer)
    spec = json.loads(backend.to_str())
    kind, space = vocabulary_kind(spec)
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback", False))
    vocab: dict[str, int] = backend.get_vocab(with_added_tokens=False)
    added = spec.get("added_tokens") or []
    size = 1 + max([*vocab.values(), *(a["id"] for a in added), -1])
    table = [b""] * size
    for piece, idx in vocab.items():
        table[idx] = _piece_bytes(piece, kind, space, byte_fallback)
    for token in added:  # literal text, whatever the vocabulary family ...
        content = token["content"]
        m = _BYTE_FALLBACK.fullmatch(content) if byte_fallback else None
        # ... except byte-fallback pieces, which some conversions list as added tokens
        table[token["id"]] = bytes([int(m.group(1), 16)]) if m else content.encode("utf-8")
    return table, kind


def table_digest(table: Sequence[bytes]) -> str:
    """blake2b-128 of the table (length-prefixed entries): equal digests = same id->bytes map."""
    h = hashlib.blake2b(digest_size=16)
    for entry in table:
        h.update(len(entry).to_bytes(4, "little"))
        h.update(entry)
    return h.hexdigest()


def decode_utf8_trimmed(data: bytes) -> str:
    """Decode UTF-8, dropping a partial character cut off at the start or at the end.

    A context left-truncated to its last C tokens can start inside a multi-byte character;
    those leading continuation bytes are dropped. Invalid bytes elsewhere raise.
    """
    start = 0
    while start < min(3, len(data)) and (data[start] & 0xC0) == 0x80:
        start += 1
    data = data[start:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data":
            return data[: exc.start].decode("utf-8")
        raise


@dataclass(frozen=True)
class ByteVocabulary:
    """A tokenizer's id -> bytes table with what the pipeline needs to know about it."""

    table: list[bytes]
    """Exact bytes of every token id."""
    kind: VocabularyKind
    """'byte_level' or 'sentencepiece'."""
    dummy_prefix: bytes
    """b' ' when the tokenizer prepends a space to every text (SentencePiece), else b''."""
    special_ids: frozenset[int]
    """Ids of special/control tokens (never used as RPT targets)."""

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ByteVocabulary:
        """Build the table and detect the dummy prefix by encoding a probe text."""
        table, kind = _table_and_kind(tokenizer)
        backend = _backend(tokenizer)
        probe = b"".join(table[i] for i in backend.encode("a", add_special_tokens=False).ids)
        spec = json.loads(backend.to_str())
        special = {t["id"] for t in spec.get("added_tokens") or [] if t.get("special")}
        special |= set(getattr(tokenizer, "all_special_ids", []) or [])
        return cls(
            table=table,
            kind=kind,
            dummy_prefix=b" " if probe == b" a" else b"",
            special_ids=frozenset(special),
        )

    def __len__(self) -> int:
        return len(self.table)

    def digest(self) -> str:
        """See :func:`table_digest`."""
        return table_digest(self.table)

    def join(self, ids: Sequence[int] | np.ndarray) -> bytes:
        """Concatenated bytes of ``ids``."""
        table = self.table
        return b"".join(table[int(i)] for i in ids)

    def roundtrip_ok(self, ids: Sequence[int] | np.ndarray, text: str) -> bool:
        """True when the tokens' bytes are exactly the text's UTF-8 (after the dummy prefix)."""
        return self.join(ids) == self.dummy_prefix + text.encode("utf-8")

    def target_mask(self) -> np.ndarray:
        """bool [V]: tokens that can be an RPT target x_t.

        Excluded: special tokens, empty entries, and tokens starting with a UTF-8 continuation
        byte (the context would end inside a character and no text prediction can match).
        """
        mask = np.array([bool(b) and (b[0] & 0xC0) != 0x80 for b in self.table], dtype=bool)
        for i in self.special_ids:
            if 0 <= i < len(mask):
                mask[i] = False
        return mask


def write_vocab_bytes(table: Sequence[bytes], directory: str | Path) -> None:
    """``vocab_bytes.bin`` (all entries concatenated) + ``vocab_bytes.idx`` (int64 LE offsets,
    V+1 values; entry i is ``bin[idx[i]:idx[i+1]]``)."""
    directory = Path(directory)
    offsets = np.zeros(len(table) + 1, dtype="<i8")
    np.cumsum([len(b) for b in table], out=offsets[1:])
    (directory / VOCAB_BYTES_BIN).write_bytes(b"".join(table))
    offsets.tofile(directory / VOCAB_BYTES_IDX)


def read_vocab_bytes(directory: str | Path) -> list[bytes]:
    """Inverse of :func:`write_vocab_bytes`."""
    directory = Path(directory)
    try:
        blob = (directory / VOCAB_BYTES_BIN).read_bytes()
        offsets = np.fromfile(directory / VOCAB_BYTES_IDX, dtype="<i8")
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: vocabulary bytes file missing") from None
    if len(offsets) < 1 or offsets[-1] != len(blob):
        raise DataError(f"{directory / VOCAB_BYTES_IDX}: offsets do not match {VOCAB_BYTES_BIN}")
    return [blob[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]


def load_tokenizer(name_or_path: str) -> Any:
    """AutoTokenizer from a HF directory or ``embedded:smollm2`` (no remote code)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot load a tokenizer ({exc})") from None


__all__ = [
    "ByteVocabulary",
    "decode_utf8_trimmed",
    "load_tokenizer",
    "read_vocab_bytes",
    "table_digest",
    "token_byte_table",
    "vocabulary_kind",
    "write_vocab_bytes",
]
