"""Vocab-parallel log-prob/entropy on 2 gloo ranks == the single-rank full-vocab reference;
the DP-split policy loss == the full-batch loss (global denominators)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rpt.loss import (
    LossConfig,
    all_reduce_metrics,
    finalize_metrics,
    logprobs_from_hidden,
    logprobs_from_logits,
    naive_logprobs_entropy,
    policy_loss,
)
from megatron_rpt.testing.distributed import run_distributed

T, H = 13, 5
# (real vocab, rows per rank): even split, uneven split, padding on the last shard, and a last
# shard made only of padding.
CASES = [(16, (8, 8)), (16, (10, 6)), (13, (8, 8)), (8, (8, 8))]


def _problem(true_vocab, rows):
    g = torch.Generator().manual_seed(true_vocab * 100 + rows[0])
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(sum(rows), H, generator=g, dtype=torch.float64)
    weight[true_vocab:] = 40.0  # padding rows: would dominate the softmax if they leaked in
    labels = torch.randint(0, true_vocab, (T,), generator=g)
    labels[0], labels[1] = 0, true_vocab - 1  # both ends of the vocab, i.e. both shards
    g_lp = torch.randn(T, generator=g)
    g_ent = torch.randn(T, generator=g)
    return hidden, weight, labels, g_lp, g_ent


def _by_value(obj):
    """Tensors -> numpy arrays for the trip back to the parent.

    torch registers fd-sharing reductions for tensors on multiprocessing queues; a rank that
    exits before the parent unpickles its result then makes the parent fail with EOFError.
    numpy arrays are pickled by value.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().numpy().copy()
    if isinstance(obj, dict):
        return {k: _by_value(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_by_value(v) for v in obj)
    return obj


def _tensors(obj):
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_tensors(v) for v in obj)
    return torch.from_numpy(obj) if hasattr(obj, "dtype") and hasattr(obj, "shape") else obj


def _tp_worker(rank, world_size):
    group = dist.group.WORLD
    out = []
    for true_vocab, rows in CASES:
        hidden, weight, labels, g_lp, g_ent = _problem(true_vocab, rows)
        start = sum(rows[:rank])
        shard = weight[start : start + rows[rank]].clone()
        h = hidden.clone().requires_grad_(True)
        w = shard.clone().requires_grad_(True)
        lp, ent = logprobs_from_hidden(
            h, w, labels, tp_group=group, vocab_start=start, true_vocab_size=true_vocab,
            chunk_size=4, entropy_requires_grad=True, temperature=0.9,
        )
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        # the same with logits already computed, and without the hidden-grad all-reduce
        x = (hidden @ shard.t()).requires_grad_(True)
        lp2, ent2 = logprobs_from_logits(
            x, labels, tp_group=group, vocab_start=start, true_vocab_size=true_vocab,
            chunk_size=5, entropy_requires_grad=True, temperature=0.9,
        )
        ((lp2 * g_lp).sum() + (ent2 * g_ent).sum()).backward()
        h3 = hidden.clone().requires_grad_(True)
        lp3, _ = logprobs_from_hidden(
            h3, shard, labels, tp_group=group, vocab_start=start, true_vocab_size=true_vocab,
            chunk_size=3, temperature=0.9, reduce_hidden_grad=False,
        )
        (lp3 * g_lp).sum().backward()
        out.append(dict(lp=lp.detach(), ent=ent.detach(), gh=h.grad, gw=w.grad,
                        lp2=lp2.detach(), ent2=ent2.detach(), gx=x.grad, gh_partial=h3.grad))
    return _by_value(out)


def test_vocab_parallel_matches_single_rank_reference():
    results = _tensors(run_distributed(_tp_worker, 2, timeout=180))
    for i, (true_vocab, rows) in enumerate(CASES):
        hidden, weight, labels, g_lp, g_ent = _problem(true_vocab, rows)
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        rlp, rent = naive_logprobs_entropy(h, w, labels, true_vocab_size=true_vocab,
                                           temperature=0.9)
        ((rlp * g_lp).sum() + (rent * g_ent).sum()).backward()
        rh = hidden.clone().requires_grad_(True)
        (naive_logprobs_entropy(rh, weight, labels, true_vocab_size=true_vocab,
                                temperature=0.9)[0] * g_lp).sum().backward()
        logits_grad = torch.zeros(T, sum(rows), dtype=torch.float64)
        for rank in range(2):
            got = results[rank][i]
            for key in ("lp", "lp2"):
                torch.testing.assert_close(got[key], rlp.detach(), atol=1e-10, rtol=1e-10)
            for key in ("ent", "ent2"):
                torch.testing.assert_close(got[key], rent.detach(), atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(got["gh"], h.grad, atol=1e-10, rtol=1e-10)
            start = sum(rows[:rank])
            torch.testing.assert_close(got["gw"], w.grad[start : start + rows[rank]],
                                       atol=1e-10, rtol=1e-10)
            logits_grad[:, start : start + rows[rank]] = got["gx"]
        # d/dlogits = d/dW contracted with hidden: check the logits path through the weight
        torch.testing.assert_close(logits_grad.t() @ hidden, w.grad, atol=1e-10, rtol=1e-10)
        partial_sum = results[0][i]["gh_partial"] + results[1][i]["gh_partial"]
        torch.testing.assert_close(partial_sum, rh.grad, atol=1e-10, rtol=1e-10)
        assert torch.all(w.grad[true_vocab:] == 0)


# ------------------------------------------------------------------------------- DP split

SEQ_LENS = [3, 7, 2, 5, 6]  # rank 0 gets sequences 0-1, rank 1 gets 2-4 (uneven tokens)
V = 9


def _dp_batch():
    g = torch.Generator().manual_seed(7)
    total = sum(SEQ_LENS)
    hidden = torch.randn(total, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(V, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (total,), generator=g)
    seq = torch.repeat_interleave(torch.arange(len(SEQ_LENS)), torch.tensor(SEQ_LENS))
    adv = torch.randn(len(SEQ_LENS), generator=g, dtype=torch.float64)[seq]
    mask = (torch.rand(total, generator=g) > 0.2).double()
    old = -torch.rand(total, generator=g, dtype=torch.float64) * 3
    return hidden, weight, labels, seq, adv, mask, old


def _loss(hidden, weight, labels, seq, adv, mask, old, cfg, n_tok, n_seq):
    lp, ent = logprobs_from_hidden(hidden, weight, labels, chunk_size=4)
    seq_local = torch.unique(seq, return_inverse=True)[1]
    return policy_loss(lp, adv, mask, cfg=cfg, old_logprobs_T=old, entropy_T=ent,
                       global_num_tokens=n_tok, global_num_seqs=n_seq, seq_ids_T=seq_local)


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def _dp_worker(rank, world_size):
    hidden, weight, labels, seq, adv, mask, old = _dp_batch()
    cut = sum(SEQ_LENS[:2])
    part = slice(0, cut) if rank == 0 else slice(cut, None)
    mine = [t[part] for t in (hidden, labels, seq, adv, mask, old)]
    # the global denominators are counted once per step, over every DP rank
    counts = torch.tensor([float(mine[4].sum()), float(len(torch.unique(mine[2])))])
    dist.all_reduce(counts)
    out = []
    for aggregation in AGGREGATIONS:
        w = weight.clone().requires_grad_(True)
        loss, metrics = _loss(mine[0], w, mine[1], mine[2], mine[3], mine[4], mine[5],
                              LossConfig(aggregation=aggregation), float(counts[0]),
                              float(counts[1]))
        loss.backward()
        grad = w.grad.contiguous()
        dist.all_reduce(grad)  # DDP's gradient reduction, as a SUM
        out.append((grad, finalize_metrics(all_reduce_metrics(metrics, dist.group.WORLD))))
    return _by_value(out)


def test_dp_split_equals_full_batch():
    results = _tensors(run_distributed(_dp_worker, 2, timeout=120))
    for i, aggregation in enumerate(AGGREGATIONS):
        hidden, weight, labels, seq, adv, mask, old = _dp_batch()
        w = weight.clone().requires_grad_(True)
        loss, metrics = _loss(hidden, w, labels, seq, adv, mask, old,
                              LossConfig(aggregation=aggregation), float(mask.sum()),
                              float(len(SEQ_LENS)))
        loss.backward()
        want = finalize_metrics(metrics)
        for rank_results in results:
            grad, got = rank_results[i]
            torch.testing.assert_close(grad, w.grad, atol=1e-12, rtol=1e-10)
            assert got.keys() == want.keys()
            for k in want:
                assert abs(got[k] - want[k]) <= 1e-9 * max(1.0, abs(want[k])), (aggregation, k)
