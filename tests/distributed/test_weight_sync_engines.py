"""Weight sync with one HF engine per group of ranks (gloo, 4 processes, trainer TP=2 x DP=2).

One spawned run builds a tiny Qwen2 (biases included) at TP=2, perturbs every parameter with
layout-independent noise, and syncs into engines of three sizes over the same trainer:

* engine TP 2 (= trainer TP): engines on ranks {0, 1} and {2, 3}, one per replica;
* engine TP 1: an engine on every rank, each fed by its own rank alone;
* engine TP 4: one engine across both replicas (engine TP differs from trainer TP), each rank
  sending a quarter of every split tensor.

Each engine's lead holds an ``HFEngine``; every engine rank sends only its own pieces to it. After
the sync every engine tensor changed, every engine's logits equal the trainer's (<= 1e-4, fp32)
and its tensors equal a single-process TP=1 export bit for bit; every engine ran the probe.
Then an engine crash and a corrupted bucket each fail the sync on every rank, and a later sync
succeeds.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rpt.testing.distributed import run_distributed
from megatron_rpt.testing.tiny_models import VOCAB, save_tiny_model
from tests.distributed.test_weight_sync import (
    LOGITS_TOL,
    _built,
    _cfg,
    _CrashingEngine,
    _engine_outputs,
    _expect_sync_error,
    _hf_engine,
    _perturb,
    _setup,
    _tp1_export,
)

ENGINE_TPS = (2, 1, 4)


def _engine_groups(engine_tp):
    """(this rank's engine rank, its gloo group); every rank creates every group."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for first in range(0, world, engine_tp):
        ranks = list(range(first, first + engine_tp))
        group = dist.new_group(ranks, backend="gloo")
        if rank in ranks:
            mine = group
    return rank % engine_tp, mine


def _run(rank, world_size, hf_dir, tokens):
    from megatron_rpt.model.logits import forward_logits
    from megatron_rpt.weight_sync import WeightSync
    from tests.helpers.faults import FaultyLink

    groups = _setup(2, 1)
    built = _built(hf_dir, groups)
    _perturb(built, groups)
    trainer_logits = forward_logits(built, torch.from_numpy(tokens), groups)
    res = {"trainer_logits": trainer_logits}
    for engine_tp in ENGINE_TPS:
        engine_rank, group = _engine_groups(engine_tp)
        engine = _hf_engine(hf_dir) if engine_rank == 0 else None
        before = None if engine is None else {n: p.clone() for n, p in engine.model.state_dict().items()}
        link = FaultyLink()
        sync = WeightSync(
            built, groups, engine, _cfg(),
            engine_rank=engine_rank, engine_tp=engine_tp, engine_group=group, bucket_filter=link,
        )  # fmt: skip
        out = {"metrics": sync(version=1), "hf_bytes": sync.plan.hf_bytes}
        if engine is not None:
            out.update(_engine_outputs(engine, before, tokens))
        if engine_tp == 2:
            crash = None if engine is None or rank != 2 else _CrashingEngine(engine, after=2)
            crashing = WeightSync(
                built, groups, crash if rank == 2 else engine, _cfg(verify="probe"),
                engine_rank=engine_rank, engine_tp=engine_tp, engine_group=group,
            )  # fmt: skip
            out["crash"] = _expect_sync_error(lambda s=crashing: s(version=2))
            with link.corrupting(2):
                out["corrupt"] = _expect_sync_error(lambda s=sync: s(version=3))
            out["after"] = sync(version=4)
        res[engine_tp] = out
    reference = _tp1_export(hf_dir)  # collective (group creation): every rank takes part
    res["reference"] = reference if rank == 0 else None
    return res


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf_dir = str(save_tiny_model("qwen2", tmp_path_factory.mktemp("models") / "qwen2"))
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))
    return hf_dir, tokens.numpy()


def test_every_engine_gets_per_rank_shards_and_the_trainers_weights(model):
    hf_dir, tokens = model
    results = run_distributed(_run, 4, args=(hf_dir, tokens), timeout=900)
    reference = results[0]["reference"]
    for engine_tp in ENGINE_TPS:
        hf_bytes = results[0][engine_tp]["hf_bytes"]
        for first in range(0, 4, engine_tp):
            members = [results[r][engine_tp] for r in range(first, first + engine_tp)]
            lead = members[0]
            m = lead["metrics"]
            assert m.pushed and m.engine_rank == 0 and m.buckets > 1
            assert m.probe_max_abs_diff is not None and m.probe_max_abs_diff < 1e-4
            assert m.checked_tensors == len(reference)
            assert lead["unchanged"] == []
            diff = (lead["engine_logits"] - results[first]["trainer_logits"]).abs().max().item()
            assert diff <= LOGITS_TOL, (engine_tp, first, diff)
            for name, tensor in reference.items():
                assert torch.equal(lead["engine_state"][name], tensor), (engine_tp, name)
            # Per-rank shards: the ranks' payloads add up to the model exactly once, and
            # beyond engine rank 0 (which also carries the unsplit tensors) each rank
            # carries about 1/engine_tp of it.
            sizes = [x["metrics"].bytes for x in members]
            assert sum(sizes) == hf_bytes, (engine_tp, sizes, hf_bytes)
            assert [x["metrics"].engine_rank for x in members] == list(range(engine_tp))
            assert all(not x["metrics"].pushed for x in members[1:])
            for size in sizes[1:]:
                assert 0 < size <= hf_bytes / engine_tp
    for r in range(4):  # one engine's crash and a corrupted bucket fail everywhere, no hang
        two = results[r][2]
        assert two["crash"] and "rank 2" in two["crash"] and "simulated engine crash" in two["crash"]
        assert two["corrupt"] and "differ" in two["corrupt"]
        assert two["after"].seconds > 0
    assert results[0][2]["after"].probe_max_abs_diff < 1e-4
    assert results[2][2]["after"].probe_max_abs_diff < 1e-4
