"""Chunked fused log-prob/entropy (single rank) against the naive full-vocab reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rpt.errors import DataError
from megatron_rpt.loss.logprobs import (
    logprobs_from_hidden,
    logprobs_from_logits,
    naive_logprobs_entropy,
    response_positions,
)


def _problem(T=11, H=6, V=13, pad=0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=dtype)
    weight = torch.randn(V + pad, H, generator=g, dtype=dtype)
    if pad:
        weight[V:] = 50.0  # padding rows that would dominate the softmax if not excluded
    labels = torch.randint(0, V, (T,), generator=g)
    g_lp = torch.randn(T, generator=g, dtype=torch.float32)
    g_ent = torch.randn(T, generator=g, dtype=torch.float32)
    return hidden, weight, labels, g_lp, g_ent


def _grads(fn, hidden, weight, g_lp, g_ent):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp, ent = fn(h, w)
    loss = (lp * g_lp.to(lp.dtype)).sum()
    if g_ent is not None:
        loss = loss + (ent * g_ent.to(ent.dtype)).sum()
    loss.backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11, 64])
@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("with_entropy_grad", [False, True])
def test_hidden_matches_naive_values_and_grads(chunk_size, pad, with_entropy_grad):
    V = 13
    hidden, weight, labels, g_lp, g_ent = _problem(V=V, pad=pad)
    g_ent = g_ent if with_entropy_grad else None

    def fused(h, w):
        return logprobs_from_hidden(
            h, w, labels, true_vocab_size=V, chunk_size=chunk_size,
            entropy_requires_grad=with_entropy_grad,
        )

    def naive(h, w):
        return naive_logprobs_entropy(h, w, labels, true_vocab_size=V)

    lp, ent, gh, gw = _grads(fused, hidden, weight, g_lp, g_ent)
    rlp, rent, rgh, rgw = _grads(naive, hidden, weight, g_lp, g_ent)
    # fp64 inputs keep the softmax math in fp64: the algorithm must agree to rounding.
    for a, b in ((lp, rlp), (ent, rent), (gh, rgh), (gw, rgw)):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    if pad:
        assert torch.all(gw[V:] == 0)


def test_fp32_matches_naive_within_fp32_tolerance():
    hidden, weight, labels, g_lp, g_ent = _problem(T=37, H=16, V=50, pad=6, dtype=torch.float32)

    def fused(h, w):
        return logprobs_from_hidden(h, w, labels, true_vocab_size=50, chunk_size=8,
                                    entropy_requires_grad=True)

    def naive(h, w):
        return naive_logprobs_entropy(h, w, labels, true_vocab_size=50)

    got = _grads(fused, hidden, weight, g_lp, g_ent)
    ref = _grads(naive, hidden, weight, g_lp, g_ent)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck_fp64(temperature):
    """Finite differences of the custom backward (independent of the naive reference)."""
    hidden, weight, labels, _, _ = _problem(T=5, H=3, V=6, pad=2)

    def f(h, w):
        return logprobs_from_hidden(h, w, labels, true_vocab_size=6, chunk_size=2,
                                    entropy_requires_grad=True, temperature=temperature)

    assert torch.autograd.gradcheck(f, (hidden.requires_grad_(), weight.requires_grad_()))

    def g(x):
        return logprobs_from_logits(x, labels, true_vocab_size=6, chunk_size=3,
                                    entropy_requires_grad=True, temperature=temperature)

    assert torch.autograd.gradcheck(g, ((hidden @ weight.t()).detach().requires_grad_(),))


def test_temperature_divides_logits():
    hidden, weight, labels, g_lp, g_ent = _problem()
    got = _grads(lambda h, w: logprobs_from_hidden(h, w, labels, chunk_size=4, temperature=0.8,
                                                   entropy_requires_grad=True),
                 hidden, weight, g_lp, g_ent)
    ref = _grads(lambda h, w: naive_logprobs_entropy(h, w, labels, temperature=0.8),
                 hidden, weight, g_lp, g_ent)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_entropy_has_no_grad_unless_asked():
    hidden, weight, labels, _, _ = _problem()
    h = hidden.clone().requires_grad_(True)
    lp, ent = logprobs_from_hidden(h, weight, labels, chunk_size=4)
    assert lp.requires_grad and not ent.requires_grad
    lp2, ent2 = logprobs_from_hidden(h, weight, labels, compute_entropy=False)
    assert ent2 is None
    torch.testing.assert_close(lp2, lp)


def test_only_hidden_or_only_weight_requires_grad():
    hidden, weight, labels, g_lp, _ = _problem()
    h = hidden.clone().requires_grad_(True)
    (logprobs_from_hidden(h, weight, labels, chunk_size=3)[0] * g_lp).sum().backward()
    rh = hidden.clone().requires_grad_(True)
    (naive_logprobs_entropy(rh, weight, labels)[0] * g_lp).sum().backward()
    torch.testing.assert_close(h.grad, rh.grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 5, 100])
def test_logits_variant_matches_naive(chunk_size):
    V, pad = 13, 3
    hidden, weight, labels, g_lp, g_ent = _problem(V=V, pad=pad)
    logits = (hidden @ weight.t()).detach()
    x = logits.clone().requires_grad_(True)
    lp, ent = logprobs_from_logits(x, labels, true_vocab_size=V, chunk_size=chunk_size,
                                   entropy_requires_grad=True, temperature=1.3)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    y = logits.clone().requires_grad_(True)
    ref_logp = torch.log_softmax(y[:, :V] / 1.3, dim=-1)
    rlp = ref_logp.gather(1, labels[:, None]).squeeze(1)
    rent = -(ref_logp.exp() * ref_logp).sum(-1)
    ((rlp * g_lp).sum() + (rent * g_ent).sum()).backward()
    torch.testing.assert_close(lp, rlp, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ent, rent, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-10, rtol=1e-10)
    assert torch.all(x.grad[:, V:] == 0)
    assert torch.equal(x.detach(), logits)  # input untouched by the in-place softmax


def test_bf16_close_to_fp32_reference():
    hidden, weight, labels, _, _ = _problem(T=20, H=32, V=64, dtype=torch.float32)
    lp, ent = logprobs_from_hidden(hidden.bfloat16(), weight.bfloat16(), labels, chunk_size=7)
    rlp, rent = naive_logprobs_entropy(hidden, weight, labels)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, rlp, atol=0.3, rtol=0.05)
    torch.testing.assert_close(ent, rent, atol=0.3, rtol=0.05)


def test_empty_and_bad_inputs():
    hidden, weight, labels, _, _ = _problem()
    lp, ent = logprobs_from_hidden(hidden[:0], weight, labels[:0])
    assert lp.shape == ent.shape == (0,)
    with pytest.raises(DataError, match="outside the vocabulary"):
        logprobs_from_hidden(hidden, weight, labels + 100, true_vocab_size=13)
    with pytest.raises(ValueError, match="labels_T"):
        logprobs_from_hidden(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="dtype|float"):
        logprobs_from_hidden(hidden.float(), weight, labels)


def _positions_loop(cu, prompt, seq_lens):
    out, seq = [], []
    for s in range(len(prompt)):
        for tok in range(cu[s] + prompt[s], cu[s] + seq_lens[s]):
            out.append(tok - 1)  # the position that predicts packed token `tok`
            seq.append(s)
    return out, seq


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 5), st.integers(0, 3)),
                min_size=1, max_size=5))
def test_response_positions_matches_loop(specs):
    prompt = [p for p, _, _ in specs]
    seq_lens = [p + r for p, r, _ in specs]
    slots = [p + r + pad for p, r, pad in specs]
    cu = [0]
    for n in slots:
        cu.append(cu[-1] + n)
    idx = response_positions(torch.tensor(cu), torch.tensor(prompt), torch.tensor(seq_lens))
    want, seq = _positions_loop(cu, prompt, seq_lens)
    assert idx.positions_T.tolist() == want
    assert idx.label_positions_T.tolist() == [p + 1 for p in want]
    assert idx.seq_ids_T.tolist() == seq


def test_response_positions_slice_then_logprob_equals_full_sequence():
    """Slicing hidden states before the output layer gives the full-logits answer."""
    g = torch.Generator().manual_seed(1)
    cu, prompt = torch.tensor([0, 7, 12, 20]), torch.tensor([4, 2, 5])
    tokens = torch.randint(0, 9, (20,), generator=g)
    hidden = torch.randn(20, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(9, 5, generator=g, dtype=torch.float64)
    idx = response_positions(cu, prompt)
    lp, _ = logprobs_from_hidden(hidden[idx.positions_T], weight, tokens[idx.label_positions_T],
                                 chunk_size=3)
    full = torch.log_softmax(hidden @ weight.t(), -1)  # every position
    want = [float(full[j - 1, tokens[j]]) for s in range(3)
            for j in range(int(cu[s] + prompt[s]), int(cu[s + 1]))]
    torch.testing.assert_close(lp, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=0)


def test_response_positions_rejects_bad_layout():
    with pytest.raises(ValueError, match="prompt_len"):
        response_positions(torch.tensor([0, 4]), torch.tensor([0]))
    with pytest.raises(ValueError, match="prompt_len"):
        response_positions(torch.tensor([0, 4]), torch.tensor([5]))
    with pytest.raises(ValueError, match="same number"):
        response_positions(torch.tensor([0, 4, 6]), torch.tensor([1]))
