"""Top-k entropy scoring: a naive full-softmax reference, batching, overlapping windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_rpt.assets import champ_documents, smollm2_dir
from megatron_rpt.data.entropy import EntropyScorer, plan_windows
from megatron_rpt.errors import DataError
from megatron_rpt.testing.tiny_models import save_tiny_causal_lm

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir())


@pytest.fixture(scope="module")
def docs(tokenizer):
    texts = [d.text for d in champ_documents()[:4]]
    return [np.asarray(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _naive_entropy(model, ids: np.ndarray, vocab: int, k: int) -> np.ndarray:
    """One unbatched forward; full softmax, keep the k largest probabilities, renormalise."""
    with torch.no_grad():
        logits = model(torch.tensor(ids)[None]).logits[0, :, :vocab].double()
    probs = torch.softmax(logits, dim=-1).numpy()
    out = np.full(len(ids), np.nan)
    for t in range(1, len(ids)):
        top = np.sort(probs[t - 1])[::-1][:k]
        q = top / top.sum()
        out[t] = -sum(x * math.log(x) for x in q if x > 0)
    return out


def test_matches_naive_reference_with_batching(tmp_path, tokenizer, docs):
    path = save_tiny_causal_lm(tmp_path / "tiny", smollm2_dir())
    vocab = len(tokenizer)
    # a budget below the total forces several packed, right-padded batches
    scorer = EntropyScorer.from_pretrained(
        path,
        vocab_size=vocab,
        device="cpu",
        top_k=16,
        window_tokens=512,
        window_overlap=64,
        batch_tokens=600,
    )
    got = scorer.score_documents(docs)
    assert scorer.forward_calls >= 2
    model = _load(path)
    for ids, ent in zip(docs, got, strict=True):
        ref = _naive_entropy(model, ids, vocab, 16)
        assert np.isnan(ent[0]) and np.all(np.isfinite(ent[1:]))
        np.testing.assert_allclose(ent[1:], ref[1:], atol=2e-4)
        assert ent[1:].std() > 0.05  # the tiny model is not uniformly uncertain
    assert np.all(got[0][1:] <= math.log(16) + 1e-5)


def test_windows_give_single_pass_scores_when_overlap_covers_the_receptive_field(
    tmp_path, tokenizer, docs
):
    # sliding-window attention 4 x 2 layers: logits depend on the last 7 tokens only
    path = save_tiny_causal_lm(tmp_path / "swa", smollm2_dir(), arch="mistral", sliding_window=4)
    vocab = len(tokenizer)
    doc = [docs[0][:200]]

    def run(window: int, overlap: int) -> np.ndarray:
        return EntropyScorer.from_pretrained(
            path, vocab_size=vocab, device="cpu", window_tokens=window, window_overlap=overlap
        ).score_documents(doc)[0]

    single = run(4096, 1)
    np.testing.assert_allclose(run(32, 8), single, atol=1e-5, equal_nan=True)
    # the lesson: window starts scored without context look different (falsely uncertain)
    naive = run(32, 1)
    starts = [s + 1 for s, _, _ in plan_windows(200, 32, 1)[1:]]
    assert np.abs(naive[starts] - single[starts]).max() > 1e-3


def test_plan_windows_covers_every_position_once():
    for n, w, o in [(2, 2, 1), (57, 16, 5), (100, 10, 9), (5, 100, 50)]:
        covered = [p for _, e, f in plan_windows(n, w, o) for p in range(f, e)]
        assert covered == list(range(1, n))
        for s, e, f in plan_windows(n, w, o):
            assert e - s <= w and (f == 1 or f - s >= o)


def test_proxy_with_too_few_logits_is_rejected(tmp_path, tokenizer):
    path = save_tiny_causal_lm(tmp_path / "small", smollm2_dir(), vocab_size=1000)
    with pytest.raises(
        DataError, match="proxy model has 1000 output logits but the tokenizer has 49152"
    ):
        EntropyScorer.from_pretrained(path, vocab_size=len(tokenizer), device="cpu")


def test_real_smollm2_is_more_certain_on_text_than_on_shuffled_tokens(tokenizer, docs):
    """The one test with real weights: scores mean something (about 10 s on 2 cores)."""
    scorer = EntropyScorer.from_pretrained(smollm2_dir(), vocab_size=len(tokenizer), device="cpu")
    doc = docs[1][:160]
    shuffled = np.random.default_rng(0).permutation(doc)
    real, noise = scorer.score_documents([doc, shuffled])
    assert np.nanmean(real) + 0.5 < np.nanmean(noise)
