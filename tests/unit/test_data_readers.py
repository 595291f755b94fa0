"""Corpus readers: each format, every documented error, and the hash split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_rpt.data.config import DataConfig
from megatron_rpt.data.readers import ReadStats, iter_documents, split_of
from megatron_rpt.errors import DataError


def _read(cfg: DataConfig, vocab_size: int | None = None):
    stats = ReadStats()
    return list(iter_documents(cfg, stats, vocab_size=vocab_size)), stats


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_text_field_ids_and_blank_lines(tmp_path: Path):
    f = _jsonl(tmp_path / "a.jsonl", [{"body": "one", "k": 7}, "", {"body": "two", "k": 8}])
    docs, _ = _read(DataConfig(corpus=str(f), text_field="body"))
    assert [(d.doc_id, d.text) for d in docs] == [("a.jsonl:1", "one"), ("a.jsonl:3", "two")]
    docs, _ = _read(DataConfig(corpus=str(f), text_field="body", id_field="k"))
    assert [d.doc_id for d in docs] == ["7", "8"]


def test_text_files_directory_and_comma_list(tmp_path: Path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "b.txt").write_text("bee\nline two")
    (d / "a.txt").write_text("ay")
    _jsonl(d / "c.jsonl", [{"text": "sea"}])
    (d / "ignored.md").write_text("nope")
    single = tmp_path / "z.txt"
    single.write_text("zed")
    docs, _ = _read(DataConfig(corpus=f"{d},{single}"))
    assert [(x.doc_id, x.text) for x in docs] == [
        ("a.txt", "ay"),
        ("b.txt", "bee\nline two"),
        ("c.jsonl:1", "sea"),
        ("z.txt", "zed"),
    ]


def test_embedded_champ_documents():
    docs, _ = _read(DataConfig(corpus="embedded:champ"))
    assert len(docs) == 270 and all(d.text and d.doc_id.startswith("champ/") for d in docs)


def _write_indexed(prefix: Path, docs: list[list[int]]) -> None:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for doc in docs:  # two sequences per document, like preprocess_data --split-sentences
        half = len(doc) // 2
        builder.add_item(torch.tensor(doc[:half]))
        builder.add_item(torch.tensor(doc[half:]))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")


def test_megatron_indexed_dataset(tmp_path: Path):
    prefix = tmp_path / "corpus_text_document"
    _write_indexed(prefix, [[5, 6, 7, 8], [9, 10, 11]])
    docs, _ = _read(DataConfig(corpus=str(prefix)), vocab_size=100)
    assert [d.doc_id for d in docs] == ["corpus_text_document:0", "corpus_text_document:1"]
    assert [d.token_ids.tolist() for d in docs] == [[5, 6, 7, 8], [9, 10, 11]]
    with pytest.raises(
        DataError, match=r"corpus_text_document\.bin: document 1 has token id 11, outside .* 11"
    ):
        _read(DataConfig(corpus=str(prefix)), vocab_size=11)
    (tmp_path / "corpus_text_document.bin").unlink()
    with pytest.raises(
        DataError, match=r"corpus_text_document\.bin: indexed dataset file not found"
    ):
        _read(DataConfig(corpus=str(prefix)))


@pytest.mark.parametrize(
    "setup, cfg_kw, message",
    [
        (lambda p: None, {}, r"missing\.jsonl: corpus file not found"),
        (
            lambda p: _jsonl(p, [{"text": "ok"}, {"content": "x", "id": 1}]),
            {},
            r"missing\.jsonl:2: field 'text' \(data\.text_field\) missing; keys present: content, id",
        ),
        (
            lambda p: _jsonl(p, [{"text": "ok"}, '{"text": "unterminated']),
            {},
            r"missing\.jsonl:2: not valid JSON",
        ),
        (
            lambda p: _jsonl(p, [{"text": 3}]),
            {},
            r"missing\.jsonl:1: field 'text' is int, not a string",
        ),
        (
            lambda p: _jsonl(p, [{"text": "a"}, {"text": "b"}]),
            {"id_field": "id"},
            r"missing\.jsonl:1: field 'id' \(data\.id_field\) missing",
        ),
        (
            lambda p: _jsonl(p, [{"text": "a", "id": 1}, {"text": "b", "id": 1}]),
            {"id_field": "id"},
            r"missing\.jsonl:2: duplicate document id '1' \(first at .*missing\.jsonl:1\)",
        ),
        (lambda p: p.write_text(""), {"corpus_format": "auto"}, None),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, setup, cfg_kw, message):
    path = tmp_path / "missing.jsonl"
    setup(path)
    cfg = DataConfig(corpus=str(path), **cfg_kw)
    if message is None:  # an empty file reads as zero documents (the pipeline reports it)
        assert _read(cfg)[0] == []
        return
    with pytest.raises(DataError, match=message) as info:
        _read(cfg)
    assert "\n" not in str(info.value)


def test_unknown_extension_and_embedded_name(tmp_path: Path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match=r"a\.csv: cannot tell the corpus format"):
        _read(DataConfig(corpus=str(tmp_path / "a.csv")))
    with pytest.raises(DataError, match="unknown embedded corpus 'embedded:nope'"):
        _read(DataConfig(corpus="embedded:nope"))


def test_invalid_utf8_policies(tmp_path: Path):
    good = b'{"text": "fine"}\n'
    bad_line = b'{"text": "caf\xe9"}\n'  # Latin-1 byte, invalid UTF-8
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(good + bad_line)
    with pytest.raises(
        DataError, match=rf"mixed\.jsonl:2: invalid UTF-8 at byte offset {len(good) + 13}"
    ):
        _read(DataConfig(corpus=str(path)))
    docs, stats = _read(DataConfig(corpus=str(path), on_invalid_utf8="skip"))
    assert [d.text for d in docs] == ["fine"] and stats.skipped == {"invalid UTF-8": 1}
    docs, stats = _read(DataConfig(corpus=str(path), on_invalid_utf8="replace"))
    assert [d.text for d in docs] == ["fine", "caf\ufffd"] and stats.replaced_utf8 == 1

    txt = tmp_path / "t.txt"
    txt.write_bytes(b"ok \xff\xfe")
    with pytest.raises(DataError, match=r"t\.txt: invalid UTF-8 at byte offset 3"):
        _read(DataConfig(corpus=str(txt)))
    surrogate = tmp_path / "s.jsonl"
    surrogate.write_text('{"text": "a\\ud800b"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:1: text has a lone surrogate"):
        _read(DataConfig(corpus=str(surrogate)))


def test_split_is_deterministic_and_independent_of_order(tmp_path: Path):
    ids = [f"doc-{i}" for i in range(2000)]
    splits = {i: split_of(i, 0.1, 7) for i in ids}
    assert 0.07 < sum(s == "valid" for s in splits.values()) / len(ids) < 0.13
    assert {i: split_of(i, 0.1, 7) for i in reversed(ids)} == splits
    assert splits != {i: split_of(i, 0.1, 8) for i in ids}  # the seed salts the hash

    rows = [{"text": f"t{i}", "id": f"doc-{i}"} for i in range(50)]
    a = _jsonl(tmp_path / "a.jsonl", rows)
    b = _jsonl(tmp_path / "b.jsonl", rows[::-1])
    for f in (a, b):
        docs, _ = _read(DataConfig(corpus=str(f), id_field="id"))
        assert {d.doc_id: split_of(d.doc_id, 0.1, 7) for d in docs} == {
            r["id"]: splits[r["id"]] for r in rows
        }


def test_documents_beyond_the_size_bound_are_refused_by_name(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as fh:
        fh.truncate(10_000)  # sparse: no memory or disk used
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"text": "ok"}\n{"text": "' + "x" * 5000 + '"}\n')
    for path, where in ((big, "big.txt"), (lines, "lines.jsonl:2")):
        cfg = DataConfig(corpus=str(path), max_document_bytes=1000)
        with pytest.raises(
            DataError, match=rf"{where}: document longer than data.max_document_bytes=1000"
        ):
            list(iter_documents(cfg, ReadStats()))
    cfg = DataConfig(corpus=str(lines), max_document_bytes=6000)
    assert len(list(iter_documents(cfg, ReadStats()))) == 2
