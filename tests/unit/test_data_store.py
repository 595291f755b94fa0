"""SampleStore: samples equal direct slices of the document tokens; exact context text."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_rpt.assets import champ_documents, smollm2_dir
from megatron_rpt.data.config import DataConfig
from megatron_rpt.data.pipeline import prepare_data
from megatron_rpt.data.store import SampleStore
from megatron_rpt.data.tokens import decode_utf8_trimmed, token_byte_table
from megatron_rpt.data.types import difficulty_bucket
from megatron_rpt.errors import DataError
from megatron_rpt.testing.tiny_models import save_tiny_causal_lm

torch.set_num_threads(1)
KOREAN = "한국어 😀 문장: café résumé 𝔸𝔹ℂ " * 3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("store")
    model = save_tiny_causal_lm(root / "tiny", smollm2_dir())
    texts = [d.text for d in champ_documents()[:6]] + [KOREAN]
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = DataConfig(
        corpus=str(corpus),
        tokenizer=str(model),
        entropy_device="cpu",
        validation_fraction=0.3,
        split_seed=5,
        entropy_threshold=1.0,
        context_tokens=64,
        continuation_tokens=8,
    )
    prepare_data(cfg, root / "out")
    tok = AutoTokenizer.from_pretrained(str(model))
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return {"dir": root / "out", "texts": texts, "docs": docs, "tokenizer": tok}


def test_samples_are_direct_slices_of_the_document(prepared):
    table = token_byte_table(prepared["tokenizer"])
    entropy = np.fromfile(prepared["dir"] / "entropy.bin", dtype=np.float16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in prepared["docs"]])])
    for split in ("train", "valid"):
        store = SampleStore.open(prepared["dir"], split)
        assert isinstance(store.samples, np.memmap) and len(store) > 0
        for i in range(len(store)):
            s = store[i]
            doc = prepared["docs"][s.doc_index]
            t = s.position
            assert s.sample_index == i and s.doc_id == f"c.jsonl:{s.doc_index + 1}"
            assert s.context_ids.dtype == np.int64
            assert s.context_ids.tolist() == doc[max(0, t - 64) : t]
            assert s.continuation_ids.tolist() == doc[t : t + 8]
            assert s.continuation_token_bytes == tuple(table[x] for x in doc[t : t + 8])
            assert s.entropy == float(entropy[offsets[s.doc_index] + t])
            assert s.bucket == difficulty_bucket(s.entropy, (0.5, 1.0, 1.5))
        assert store[-1].sample_index == len(store) - 1
        with pytest.raises(IndexError):
            store[len(store)]


def test_pickling_reopens_the_memory_maps(prepared):
    import pickle

    store = SampleStore.open(prepared["dir"], "valid", context_tokens=5)
    blob = pickle.dumps(store)
    assert len(blob) < 1000  # paths and settings, not the arrays
    again = pickle.loads(blob)
    assert len(again) == len(store) and again.context_tokens == 5
    a, b = again[len(store) - 1], store[len(store) - 1]
    assert (a.doc_index, a.position, a.entropy) == (b.doc_index, b.position, b.entropy)
    assert np.array_equal(a.context_ids, b.context_ids) and len(a.context_ids) == 5


def test_length_overrides_and_exact_context_text(prepared):
    store = SampleStore.open(
        prepared["dir"], "train", context_tokens=100_000, continuation_tokens=2
    )
    for i in range(0, len(store), 7):
        s = store[i]
        assert s.position == len(s.context_ids) and len(s.continuation_ids) <= 2
        text = prepared["texts"][s.doc_index]
        # full context = the text before x_t, byte for byte
        n_bytes = sum(len(store.table[x]) for x in s.context_ids)
        assert store.context_text(s).encode() == text.encode()[:n_bytes]


def test_left_truncation_inside_a_character_drops_the_partial_bytes(prepared):
    korean_doc = len(prepared["texts"]) - 1
    cut = 0
    for split in ("train", "valid"):
        store = SampleStore.open(prepared["dir"], split, context_tokens=3)
        for i in range(len(store)):
            s = store[i]
            if s.doc_index != korean_doc:
                continue
            raw = b"".join(store.table[x] for x in s.context_ids)
            text = store.context_text(s)
            assert raw.endswith(text.encode()) and len(raw) - len(text.encode()) <= 3
            cut += raw != text.encode()
    assert cut > 0, "some 3-token context should start inside a multi-byte character"
    with pytest.raises(UnicodeDecodeError):
        decode_utf8_trimmed(b"a\xffb")


def test_open_errors_and_tokenizer_check(prepared, tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(DataError, match="not a prepared data directory"):
        SampleStore.open(tmp_path)
    with pytest.raises(DataError, match="split must be 'train' or 'valid'"):
        SampleStore.open(prepared["dir"], "test")
    store = SampleStore.open(prepared["dir"])
    store.check_tokenizer(prepared["tokenizer"])
    spec = json.loads((smollm2_dir() / "tokenizer.json").read_text())
    v = spec["model"]["vocab"]
    v["x"], v["y"] = v["y"], v["x"]
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    with pytest.raises(DataError, match="prepare the data again with the policy's tokenizer"):
        store.check_tokenizer(other)


def _xor(path, start_frac, n, value=0x7F):
    data = bytearray(path.read_bytes())
    start = int(len(data) * start_frac)
    for i in range(start, min(len(data), start + n)):
        data[i] ^= value
    path.write_bytes(bytes(data))


def _set_field(path, field, delta):
    samples = np.load(path).copy()
    samples[field][1::2] += delta
    np.save(path, samples)


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("meta.json", lambda p: p.write_text("{garbage"), "meta.json: unreadable"),
        ("meta.json", lambda p: p.write_bytes(b"\xff\xfe"), "meta.json: unreadable"),
        ("samples-train.npy", lambda p: os.truncate(p, p.stat().st_size // 2), "samples-train.npy: unreadable"),
        ("tokens.bin", lambda p: os.truncate(p, p.stat().st_size * 3 // 10), "tokens.bin: size does not match"),
        ("tokens.idx", lambda p: p.write_bytes(os.urandom(p.stat().st_size)), "tokens.idx: unreadable"),
        ("documents.jsonl", lambda p: p.write_text("".join(p.read_text().splitlines(True)[:3])), "documents.jsonl: 3 lines"),
        ("samples-train.npy", lambda p: _set_field(p, "doc_index", 1_000_000), "points outside its document"),
        ("samples-train.npy", lambda p: _set_field(p, "position", 1_000_000), "points outside its document"),
        ("samples-train.npy", lambda p: np.save(p, np.load(p)[:0]), "samples-train.npy: 0 samples"),
    ],
)  # fmt: skip
def test_corrupt_prepared_files_are_one_data_error(prepared, tmp_path, name, change, message):
    copy = Path(shutil.copytree(prepared["dir"], tmp_path / "copy"))
    change(copy / name)
    with pytest.raises(DataError, match=message) as err:
        SampleStore.open(copy, "train")
    assert "\n" not in str(err.value)


def test_token_ids_beyond_the_vocabulary_are_a_data_error(prepared, tmp_path):
    copy = Path(shutil.copytree(prepared["dir"], tmp_path / "copy"))
    _xor(copy / "tokens.bin", 0.3, 64)
    store = SampleStore.open(copy, "train")
    with pytest.raises(DataError, match="tokens.bin: document .* beyond the vocabulary"):
        for i in range(len(store)):
            store[i]
