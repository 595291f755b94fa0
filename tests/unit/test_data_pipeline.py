"""prepare_data end to end with a tiny random proxy: layout, filters, resume, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_rpt.assets import champ_documents, smollm2_dir
from megatron_rpt.data import entropy as entropy_mod
from megatron_rpt.data.config import DataConfig
from megatron_rpt.data.pipeline import SAMPLE_DTYPE, prepare_data
from megatron_rpt.data.readers import split_of
from megatron_rpt.data.tokens import token_byte_table
from megatron_rpt.errors import DataError, InputError
from megatron_rpt.reward.next_token import boxable
from megatron_rpt.testing.tiny_models import save_tiny_causal_lm

torch.set_num_threads(1)
EXTRA = ["한국어 문장과 😀 그리고 café: x² + y² = z², naïve résumé.", "Short one.", ""]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("pipeline")
    model = save_tiny_causal_lm(root / "tiny", smollm2_dir())
    texts = [d.text for d in champ_documents()[:10]] + EXTRA
    corpus = root / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"body": t, "id": f"d{i}"}) + "\n" for i, t in enumerate(texts))
    )
    return {
        "root": root,
        "model": model,
        "corpus": corpus,
        "texts": texts,
        "tokenizer": AutoTokenizer.from_pretrained(str(model)),
    }


def _cfg(setup, **kw) -> DataConfig:
    base = dict(
        corpus=str(setup["corpus"]),
        text_field="body",
        id_field="id",
        tokenizer=str(setup["model"]),
        entropy_device="cpu",
        validation_fraction=0.3,
        split_seed=3,
        min_context_tokens=4,
        entropy_threshold=2.0,
        entropy_window_tokens=256,
        entropy_window_overlap=32,
        entropy_batch_tokens=256,
    )
    base.update(kw)
    return DataConfig(**base)


def _load(out: Path) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(out / "tokens"))
    return {
        "docs": [json.loads(x) for x in open(out / "documents.jsonl")],
        "tokens": [np.array(ds[i]) for i in range(len(ds))],  # copies: ds unmaps on delete
        "entropy": np.fromfile(out / "entropy.bin", dtype=np.float16),
        "train": np.load(out / "samples-train.npy"),
        "valid": np.load(out / "samples-valid.npy"),
        "meta": json.loads((out / "meta.json").read_text()),
    }


def test_layout_filters_and_summary(setup, tmp_path):
    cfg = _cfg(setup)
    summary = prepare_data(cfg, tmp_path / "out")
    got = _load(tmp_path / "out")
    tok, texts = setup["tokenizer"], setup["texts"]
    table = token_byte_table(tok)
    usable = [(i, t) for i, t in enumerate(texts) if t]  # the empty document is skipped
    assert summary.documents_skipped == {"empty": 1}
    assert [d["doc_id"] for d in got["docs"]] == [f"d{i}" for i, _ in usable]
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in got["tokens"]])])
    assert len(got["entropy"]) == offsets[-1] == summary.tokens
    train_rows, valid_rows, unboxable = [], [], 0
    for d, ((_, text), doc, ids) in enumerate(zip(usable, got["docs"], got["tokens"], strict=True)):
        assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
        assert doc["split"] == split_of(doc["doc_id"], 0.3, 3) and doc["n_tokens"] == len(ids)
        ent = got["entropy"][offsets[d] : offsets[d + 1]].astype(np.float32)
        assert np.isnan(ent[0]) and np.isfinite(ent[1:]).all()
        for t in range(len(ids)):  # eligibility recomputed here from its definition
            piece = table[ids[t]]
            ok = t >= 4 and piece and (piece[0] & 0xC0) != 0x80 and ids[t] > 16
            if ok and doc["split"] == "valid":
                valid_rows.append((d, t, ent[t]))
            elif ok and ent[t] >= 2.0 and boxable(piece):
                train_rows.append((d, t, ent[t]))
            elif ok and ent[t] >= 2.0:
                unboxable += 1  # e.g. "}": no box can hold it
        assert doc["n_kept"] == sum(
            r[0] == d for r in (train_rows if doc["split"] == "train" else valid_rows)
        )
    assert summary.unboxable_train_targets == unboxable
    for name, rows in (("train", train_rows), ("valid", valid_rows)):
        assert got[name].dtype == SAMPLE_DTYPE
        assert [tuple(r) for r in got[name].tolist()] == [(d, t, float(e)) for d, t, e in rows]
    # a continuation-byte target exists in the Korean document and is never a sample
    assert any((table[i][0] & 0xC0) == 0x80 for i in got["tokens"][10] if table[i])
    assert (
        summary.kept_train == len(train_rows) > 0 and summary.valid_positions == len(valid_rows) > 0
    )
    assert summary.train_buckets["hard"] == sum(e > 1.5 for *_, e in train_rows)
    meta = got["meta"]
    assert meta["format_version"] == 1 and meta["tokenizer"]["vocab_size"] == len(table)
    assert meta["data_config"]["entropy_threshold"] == 2.0
    assert meta["summary"]["kept_train"] == len(train_rows)


def test_position_cap_is_a_deterministic_subsample(setup, tmp_path):
    full = _load(_prepared(setup, tmp_path / "full"))["train"]
    a = _load(_prepared(setup, tmp_path / "a", max_positions_per_document=3))["train"]
    b = _load(_prepared(setup, tmp_path / "b", max_positions_per_document=3))["train"]
    assert np.array_equal(a, b)
    assert np.bincount(a["doc_index"]).max() == 3
    assert set(map(tuple, a[["doc_index", "position"]].tolist())) <= set(
        map(tuple, full[["doc_index", "position"]].tolist())
    )


def test_random_per_document_keeps_one_eligible_position_per_document(setup, tmp_path):
    """RLP's protocol: one position per train document, whatever its entropy, reproducible;
    the validation positions do not change."""
    full = _load(_prepared(setup, tmp_path / "full"))
    # a threshold that keeps no position under the entropy filter: ignored here
    kw = {"train_positions": "random_per_document", "entropy_threshold": 100.0}
    got = [_load(_prepared(setup, tmp_path / n, **kw)) for n in ("a", "b")]
    a, b = got[0]["train"], got[1]["train"]
    assert np.array_equal(a, b) and len(a) > 0
    assert np.bincount(a["doc_index"]).max() == 1
    assert np.array_equal(got[0]["valid"], full["valid"])
    assert (a["position"] >= 4).all()  # eligible: at least min_context_tokens of context
    train_docs = {d["doc_index"] for d in full["docs"] if d["split"] == "train"}
    assert set(a["doc_index"].tolist()) == train_docs


def _prepared(setup, out: Path, **kw) -> Path:
    prepare_data(_cfg(setup, **kw), out)
    return out


def test_resume_after_interruption_gives_identical_output(setup, tmp_path, monkeypatch):
    reference = _prepared(setup, tmp_path / "reference")
    calls = {"n": 0}
    original = entropy_mod.EntropyScorer.score_documents

    def interrupted(self, docs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, docs)

    monkeypatch.setattr(entropy_mod.EntropyScorer, "score_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(_cfg(setup), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    monkeypatch.setattr(entropy_mod.EntropyScorer, "score_documents", original)
    summary = prepare_data(_cfg(setup), tmp_path / "out")
    assert 0 < summary.documents_resumed < summary.documents  # continued, did not restart
    assert summary.tokens_scored < summary.tokens
    for name in (
        "tokens.bin",
        "tokens.idx",
        "entropy.bin",
        "documents.jsonl",
        "samples-train.npy",
        "samples-valid.npy",
        "vocab_bytes.bin",
        "vocab_bytes.idx",
    ):
        assert (tmp_path / "out" / name).read_bytes() == (reference / name).read_bytes(), name
    assert not (tmp_path / ".out.work").exists()


def test_zero_kept_is_an_error_without_output_and_scores_are_reused(setup, tmp_path):
    with pytest.raises(
        DataError, match=r"data.entropy_threshold=9 keeps 0 of \d+ eligible"
    ) as info:
        prepare_data(_cfg(setup, entropy_threshold=9.0), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.work").is_dir()
    summary = prepare_data(_cfg(setup, entropy_threshold=2.5), tmp_path / "out")
    assert summary.documents_resumed == summary.documents and summary.tokens_scored == 0
    with pytest.raises(InputError, match="output already exists"):
        prepare_data(_cfg(setup), tmp_path / "out")
    prepare_data(_cfg(setup), tmp_path / "out", overwrite=True)
    assert (
        json.loads((tmp_path / "out" / "meta.json").read_text())["data_config"]["entropy_threshold"]
        == 2.0
    )


def test_bad_corpora_and_tokenizers(setup, tmp_path):
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="the corpus has no documents"):
        prepare_data(_cfg(setup, corpus=str(empty)), tmp_path / "o1")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"body": "\xff"}\n')
    with pytest.raises(
        DataError, match=r"no usable documents \(1 read; skipped invalid UTF-8: 1\)"
    ):
        prepare_data(
            _cfg(setup, corpus=str(bad), on_invalid_utf8="skip", id_field=None), tmp_path / "o0"
        )
    assert not (tmp_path / ".o0.work").exists()
    # a policy tokenizer whose normalizer changes text: such documents are skipped and counted
    raw = Tokenizer.from_file(str(smollm2_dir() / "tokenizer.json"))
    raw.normalizer = normalizers.Lowercase()
    lower = tmp_path / "lower_tok"
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(lower)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        json.dumps({"body": "Upper Case Text"})
        + "\n"
        + json.dumps({"body": "all lower case text here"})
        + "\n"
    )
    summary = prepare_data(
        _cfg(
            setup,
            corpus=str(mixed),
            id_field=None,
            tokenizer=str(lower),
            entropy_model=str(setup["model"]),
            entropy_threshold=0.0,
            validation_fraction=0.0,
        ),
        tmp_path / "o2",
    )
    assert summary.documents == 1 and summary.documents_skipped == {
        "token bytes differ from the text": 1
    }
    upper = tmp_path / "upper.jsonl"
    upper.write_text(json.dumps({"body": "Only Upper"}) + "\n")
    with pytest.raises(DataError, match="token bytes reproduce none of the 1 documents"):
        prepare_data(
            _cfg(
                setup,
                corpus=str(upper),
                id_field=None,
                tokenizer=str(lower),
                entropy_model=str(setup["model"]),
            ),
            tmp_path / "o3",
        )
    # a proxy whose tokenizer maps ids to other bytes
    spec = json.loads((smollm2_dir() / "tokenizer.json").read_text())
    v = spec["model"]["vocab"]
    v["a"], v["b"] = v["b"], v["a"]
    other = tmp_path / "other_tok"
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec))).save_pretrained(
        other
    )
    proxy = save_tiny_causal_lm(tmp_path / "proxy", other)
    with pytest.raises(DataError, match="its tokenizer differs from the policy's"):
        prepare_data(_cfg(setup, entropy_model=str(proxy)), tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in (0, 1, 3, 4))


def test_megatron_indexed_corpus(setup, tmp_path):
    import torch as th
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tok = setup["tokenizer"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in setup["texts"][:3]]
    builder = IndexedDatasetBuilder(str(tmp_path / "pre_text_document.bin"), dtype=np.int32)
    for doc in ids:
        builder.add_item(th.tensor(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "pre_text_document.idx"))
    prepare_data(
        _cfg(
            setup,
            corpus=str(tmp_path / "pre_text_document"),
            validation_fraction=0.0,
            entropy_threshold=0.0,
        ),
        tmp_path / "out",
    )
    got = _load(tmp_path / "out")
    assert [t.tolist() for t in got["tokens"]] == ids
    assert [d["doc_id"] for d in got["docs"]] == [f"pre_text_document:{i}" for i in range(3)]


def test_targets_no_box_can_hold_are_dropped_from_training_and_counted():
    from megatron_rpt.data.samples import Summary, boxable_mask, select_positions

    table = [b" a", b"}", b" }", b"{", b" \\", b"}."]
    ok_box = boxable_mask(table)
    assert ok_box.tolist() == [True, False, False, True, True, False]
    cfg = DataConfig(min_context_tokens=1, entropy_threshold=1.0)
    ids = np.array([0, 1, 2, 3, 4, 5, 0])
    ent = np.full(len(ids), 2.0, dtype=np.float32)
    ok_target = np.ones(len(table), dtype=bool)
    train = {"split": "train", "doc_id": "d"}
    eligible, kept = select_positions(cfg, train, ids, ent, ok_target, ok_box)
    assert eligible.tolist() == [1, 2, 3, 4, 5, 6] and kept.tolist() == [3, 4, 6]
    assert select_positions(cfg, train, ids, ent, ok_target)[1].tolist() == [1, 2, 3, 4, 5, 6]
    # validation keeps every eligible position (evaluation is not a rollout budget)
    assert select_positions(cfg, {"split": "valid", "doc_id": "d"}, ids, ent, ok_target, ok_box)[1].tolist() == [1, 2, 3, 4, 5, 6]
    assert "dropped: target not boxable" in Summary(unboxable_train_targets=3).format_table()
