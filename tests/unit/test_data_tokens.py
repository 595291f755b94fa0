"""Exact token bytes: byte-level BPE (real SmolLM2 vocabulary) and SentencePiece-style."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from megatron_rpt.assets import smollm2_dir
from megatron_rpt.data.tokens import (
    ByteVocabulary,
    read_vocab_bytes,
    table_digest,
    token_byte_table,
    write_vocab_bytes,
)
from megatron_rpt.errors import DataError

TEXTS = [
    "Let x = 2.  Then  x^2 = 4 (two spaces)\n\tand a tab",
    " leading space, trailing space ",
    "한국어 and 😀 and 𝔸 and ℵ₀ — multi-byte characters",
    "café naïve \\frac{1}{2} $\\alpha$",
]


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir())


def test_byte_level_table_is_exact_where_decode_is_not(smol):
    vocab = ByteVocabulary.from_tokenizer(smol)
    assert vocab.kind == "byte_level" and vocab.dummy_prefix == b""
    assert len(vocab) == len(smol)
    split_char = False
    for text in TEXTS:
        ids = smol(text, add_special_tokens=False)["input_ids"]
        assert vocab.join(ids) == text.encode("utf-8")
        assert vocab.roundtrip_ok(ids, text)
        pieces = [vocab.table[i] for i in ids]
        # some token holds part of a character: per-token decode() cannot give its bytes
        for i, piece in zip(ids, pieces, strict=True):
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError:
                split_char = True
                assert "\ufffd" in smol.decode([i])
    assert split_char, "test texts should contain a character split across tokens"
    # GPT-2 stand-ins: 'Ġ' is a space, 'Ċ' a newline
    assert vocab.table[smol.convert_tokens_to_ids("Ġthe")] == b" the"
    assert vocab.table[smol.convert_tokens_to_ids("Ċ")] == b"\n"
    assert vocab.table[smol.convert_tokens_to_ids("<|im_end|>")] == b"<|im_end|>"
    assert smol.convert_tokens_to_ids("<|im_end|>") in vocab.special_ids


def test_target_mask_excludes_specials_and_continuation_bytes(smol):
    vocab = ByteVocabulary.from_tokenizer(smol)
    mask = vocab.target_mask()
    for i, piece in enumerate(vocab.table):
        expected = bool(piece) and (piece[0] & 0xC0) != 0x80 and i not in vocab.special_ids
        assert mask[i] == expected
    assert not mask.all() and mask.sum() > 40000


def _sentencepiece_style() -> Tokenizer:
    """A Llama-2-style tokenizer: BPE with byte fallback, '▁' for spaces, a dummy prefix."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz▁"),
    )
    tok.train_from_iterator(["hello world the cat sat on the mat with a hat"] * 20, trainer)
    # As in Llama-2's tokenizer.json: byte fallback on, and the <0xNN> pieces are ordinary
    # vocabulary entries (the trainer made them added tokens).
    spec = json.loads(tok.to_str())
    spec["model"]["byte_fallback"] = True
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    return Tokenizer.from_str(json.dumps(spec))


def test_sentencepiece_style_byte_fallback_and_dummy_prefix():
    from transformers import PreTrainedTokenizerFast

    raw = _sentencepiece_style()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    vocab = ByteVocabulary.from_tokenizer(tok)
    assert vocab.kind == "sentencepiece" and vocab.dummy_prefix == b" "
    text = "hello wörld 中 the  cat"  # ö and 中 are not in the vocabulary: byte fallback
    enc = raw.encode(text)
    assert "<0xE4>" in enc.tokens  # first byte of 中
    assert vocab.join(enc.ids) == b" " + text.encode()
    assert vocab.roundtrip_ok(enc.ids, text)
    assert vocab.table[raw.token_to_id("<0xE4>")] == b"\xe4"
    assert vocab.table[raw.token_to_id("▁the")] == b" the"
    assert vocab.table[raw.token_to_id("</s>")] == b"</s>"


def test_unsupported_family_and_changing_normalizer(smol):
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    with pytest.raises(DataError, match="unsupported tokenizer family \\(model WordPiece"):
        token_byte_table(wordpiece)

    lowering = Tokenizer.from_file(str(smollm2_dir() / "tokenizer.json"))
    lowering.normalizer = normalizers.Lowercase()
    vocab = ByteVocabulary.from_tokenizer(lowering)
    ids = lowering.encode("Hello World", add_special_tokens=False).ids
    assert not vocab.roundtrip_ok(ids, "Hello World")  # the pipeline skips such documents
    assert vocab.roundtrip_ok(lowering.encode("hello", add_special_tokens=False).ids, "hello")


def test_vocab_bytes_files_round_trip(tmp_path: Path, smol):
    table = token_byte_table(smol)
    write_vocab_bytes(table, tmp_path)
    assert read_vocab_bytes(tmp_path) == table
    assert table_digest(read_vocab_bytes(tmp_path)) == table_digest(table)
    assert table_digest(table[:-1] + [b"x"]) != table_digest(table)
    (tmp_path / "vocab_bytes.bin").write_bytes(b"short")
    with pytest.raises(DataError, match="offsets do not match"):
        read_vocab_bytes(tmp_path)
