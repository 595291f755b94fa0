"""Standard next-token accuracy: batched whole-document passes equal a per-position reference
loop; long documents are windowed exactly; Megatron checkpoints give the HF numbers; bad
inputs (empty split, foreign tokenizer, missing files) fail with one clear line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from megatron_rpt.errors import CheckpointError, DataError
from megatron_rpt.eval.config import EvalConfig
from megatron_rpt.eval.dataset import load_prepared_split
from megatron_rpt.eval.models import ModelRef, materialize
from megatron_rpt.eval.next_token import (
    ForwardStats,
    load_causal_lm,
    predict_next_tokens,
    standard_correct,
)
from megatron_rpt.eval.runner import build_eval_set
from tests.helpers.eval_helpers import prepare_tiny, shared_tiny


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model_dir, prepared = shared_tiny()
    return model_dir, prepared, load_prepared_split(prepared), load_causal_lm(model_dir)


def _needed(eval_set):
    return {
        int(d): np.unique(eval_set.position_P[eval_set.doc_P == d])
        for d in np.unique(eval_set.doc_P)
    }


@torch.inference_mode()
def _reference(model, eval_set) -> np.ndarray:
    """One forward per position on x[:t]; argmax of the last logits over the vocabulary."""
    V = len(eval_set.table)
    out = []
    for d, t in zip(eval_set.doc_P, eval_set.position_P, strict=True):
        ids = torch.from_numpy(eval_set.doc_tokens[d][:t])[None]
        out.append(int(model(input_ids=ids, logits_to_keep=1).logits[0, -1, :V].argmax()))
    return np.array(out)


def test_standard_accuracy_equals_a_per_position_reference_loop(tiny):
    _, _, eval_set, model = tiny
    assert len(eval_set) > 500 and len(eval_set.doc_tokens) == 3
    ref_pred = _reference(model, eval_set)
    ref_correct = ref_pred == eval_set.target_ids()
    assert 0.2 < ref_correct.mean() < 1.0  # the fixture model is right often, not always

    stats = ForwardStats()
    correct = standard_correct(model, eval_set, stats=stats)
    assert np.array_equal(correct, ref_correct)
    assert stats.forward_calls == 1  # all three documents in one batched pass, not one per position
    # a small token budget packs the documents into several batches: same predictions
    stats = ForwardStats()
    preds = predict_next_tokens(model, eval_set.doc_tokens, _needed(eval_set), vocab_size=len(eval_set.table),
                                window_tokens=512, window_overlap=64, batch_tokens=400, logits_chunk_tokens=37, stats=stats)  # fmt: skip
    assert stats.forward_calls == 3
    got = np.array([preds[int(d)][np.searchsorted(_needed(eval_set)[int(d)], t)]
                    for d, t in zip(eval_set.doc_P, eval_set.position_P, strict=True)])  # fmt: skip
    assert np.array_equal(got, ref_pred)
    # a subset of positions reads only the windows that hold them, same answers
    sub = eval_set.subset(np.arange(0, len(eval_set), 50))
    assert np.array_equal(standard_correct(model, sub), ref_correct[::50])


def test_long_documents_are_read_in_overlapping_windows(tiny, tmp_path):
    """With a receptive field shorter than the overlap, windowed == single pass, exactly."""
    from megatron_rpt.assets import smollm2_dir
    from megatron_rpt.testing.tiny_models import save_tiny_causal_lm

    _, _, eval_set, _ = tiny
    path = save_tiny_causal_lm(tmp_path / "swa", smollm2_dir(), arch="mistral", sliding_window=8)
    model = load_causal_lm(path)  # 2 layers x window 8: each logit sees at most 15 tokens
    one_pass = standard_correct(model, eval_set, window_tokens=4096)
    stats = ForwardStats()
    windowed = predict_next_tokens(model, eval_set.doc_tokens, _needed(eval_set), vocab_size=len(eval_set.table),
                                   window_tokens=64, window_overlap=16, stats=stats)  # fmt: skip
    assert stats.windows > 10
    full = predict_next_tokens(model, eval_set.doc_tokens, _needed(eval_set), vocab_size=len(eval_set.table),
                               window_tokens=4096)  # fmt: skip
    for d in full:
        assert np.array_equal(windowed[d], full[d])
    assert np.array_equal(
        standard_correct(model, eval_set, window_tokens=64, window_overlap=16), one_pass
    )


def test_megatron_checkpoint_is_evaluated_like_its_hf_source(tiny, tmp_path):
    from megatron_rpt.checkpoint.hf_to_megatron import convert_hf_to_megatron

    model_dir, _, eval_set, model = tiny
    ckpt = convert_hf_to_megatron(model_dir, tmp_path / "mg")
    with materialize([ModelRef("mg", str(ckpt))], workdir=tmp_path) as (resolved,):
        assert resolved.kind == "megatron" and resolved.hf_dir.is_dir()
        exported = load_causal_lm(resolved.hf_dir)
        assert np.array_equal(
            standard_correct(exported, eval_set), standard_correct(model, eval_set)
        )
        export_dir = resolved.hf_dir
    assert not export_dir.exists()  # the temporary export is removed afterwards


def test_empty_split_is_a_clear_error(tiny, tmp_path):
    model_dir, _, _, _ = tiny
    _, prepared = prepare_tiny(tmp_path, validation_fraction=0.0, model_dir=model_dir)
    with pytest.raises(DataError, match=r"prepared-0.0 \(split valid\): no positions to evaluate"):
        load_prepared_split(prepared)


def _foreign_tokenizer_model(model_dir, dest):
    """The same model with two vocabulary entries swapped in its tokenizer."""
    shutil.copytree(model_dir, dest)
    spec = json.loads((dest / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "Ġthe", "Ġof"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dest / "tokenizer.json").write_text(json.dumps(spec))
    return dest


def test_models_must_share_the_datas_tokenizer(tiny, tmp_path):
    from megatron_rpt.data.config import DataConfig

    model_dir, prepared, _, _ = tiny
    other = _foreign_tokenizer_model(model_dir, tmp_path / "other")
    refs = [ModelRef("base", str(model_dir)), ModelRef("other", str(other))]
    with pytest.raises(
        DataError,
        match=r"--model other=.*other: its tokenizer \(49152 tokens\) differs from the one .*prepared-0.5 \(split valid\) was prepared with",
    ):
        build_eval_set(refs, EvalConfig(), DataConfig(), prepared_dir=str(prepared))
    with pytest.raises(DataError, match="entropy_model=.*its tokenizer"):
        build_eval_set(
            refs[:1], EvalConfig(entropy_model=str(other)), DataConfig(), prepared_dir=str(prepared)
        )
    with pytest.raises(CheckpointError, match="--model gone=.*nope: not found"):
        build_eval_set(
            [ModelRef("gone", str(tmp_path / "nope"))],
            EvalConfig(),
            DataConfig(),
            prepared_dir=str(prepared),
        )
    with pytest.raises(DataError, match="not a prepared data directory"):
        build_eval_set(refs[:1], EvalConfig(), DataConfig(), prepared_dir=str(tmp_path))


def test_entropy_model_rebuckets_and_a_raw_corpus_is_scored_on_the_fly(tiny, tmp_path):
    from megatron_rpt.data.config import DataConfig
    from megatron_rpt.data.entropy import EntropyScorer

    model_dir, prepared, eval_set, _ = tiny
    refs = [ModelRef("base", str(model_dir))]
    cfg = EvalConfig(entropy_model=str(model_dir), dtype="float32", device="cpu")
    rescored = build_eval_set(refs, cfg, DataConfig(), prepared_dir=str(prepared))
    assert rescored.entropy_source.startswith(str(model_dir))
    # the prepared proxy *is* this model: rescoring reproduces its (float16-stored) entropies
    assert np.allclose(rescored.entropy_P, eval_set.entropy_P, atol=2e-3)
    corpus = tmp_path / "heldout.jsonl"
    texts = [
        json.loads(x)["text"] for x in (prepared.parent / "corpus.jsonl").read_text().splitlines()
    ]
    corpus.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:2]))
    data = DataConfig(text_field="body", min_context_tokens=4)
    raw = build_eval_set(refs, EvalConfig(device="cpu"), data, corpus=str(corpus))
    assert raw.tokenizer_digest == eval_set.tokenizer_digest and len(raw.doc_tokens) == 2
    scorer = EntropyScorer.from_pretrained(model_dir, vocab_size=len(raw.table), device="cpu")
    ent = scorer.score_documents(raw.doc_tokens)
    assert np.allclose(
        raw.entropy_P, [ent[d][t] for d, t in zip(raw.doc_P, raw.position_P, strict=True)]
    )
    assert raw.position_P.min() >= 4
