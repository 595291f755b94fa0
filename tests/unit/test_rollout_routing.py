"""Placement and routing of the rollout fleet (pure functions; the fleet itself is tested in
tests/distributed/test_engine_fleet.py)."""

from __future__ import annotations

import random

import pytest

from megatron_rpt.errors import ConfigError
from megatron_rpt.rollout.placement import EnginePlacement
from megatron_rpt.rollout.routing import block_seed, make_blocks, route
from megatron_rpt.rollout.scheduling import RolloutRequest


def test_placement_every_rank_in_one_engine_led_by_its_first_rank():
    p = EnginePlacement(world_size=32, gpus_per_engine=4, gpus_per_node=8)
    assert p.num_engines == 8 and p.leads() == list(range(0, 32, 4))
    for rank in range(32):
        slot = p.slot(rank)
        assert rank in p.ranks(slot.engine) and slot.lead_rank == p.ranks(slot.engine).start
        assert slot.is_lead == (rank % 4 == 0)
    assert [p.base_gpu_id(e) for e in range(8)] == [0, 4] * 4  # two engines per 8-GPU node


@pytest.mark.parametrize(
    ("world", "per_engine", "node", "match"),
    [(6, 4, None, "must divide the world size 6"), (16, 3, 8, "must divide"),
     (24, 6, 8, "fill whole nodes")],
)  # fmt: skip
def test_placement_rejects_layouts_that_do_not_tile(world, per_engine, node, match):
    with pytest.raises(ConfigError, match=match):
        EnginePlacement(world, per_engine, gpus_per_node=node)


def _requests(seed=0, docs=12, contexts=40):
    rng = random.Random(seed)
    out = []
    for _ in range(contexts):
        doc = rng.randrange(docs)
        out.append(RolloutRequest(f"doc{doc}", rng.randrange(1000), (1,) * rng.randrange(5, 60)))
    return out


def test_blocks_keep_documents_together_and_cover_every_request_once():
    reqs = _requests()
    blocks = make_blocks(reqs, max_contexts=4, n=8, max_new_tokens=32)
    seen = [i for b in blocks for i in b.requests]
    assert sorted(seen) == list(range(len(reqs)))
    home = {}
    for b in blocks:
        for i in b.requests:
            assert home.setdefault(reqs[i].doc_id, b.index) == b.index  # one block per document
        docs = {reqs[i].doc_id for i in b.requests}
        assert len(b.requests) <= 4 or len(docs) == 1  # only a big document overflows


@pytest.mark.parametrize("engines", [1, 2, 3, 4])
def test_route_is_balanced_and_blocks_do_not_depend_on_engine_count(engines):
    reqs = _requests(seed=engines)
    plan = route(reqs, engines, max_contexts=4, n=8, max_new_tokens=32)
    assert plan.blocks == route(reqs, 1, max_contexts=4, n=8, max_new_tokens=32).blocks
    assert sorted(b for bs in plan.engines for b in bs) == list(range(len(plan.blocks)))
    load = plan.load()
    biggest = max(b.tokens for b in plan.blocks)
    assert max(load) - min(load) <= biggest  # greedy largest-first bound


def test_block_seeds_differ_per_block_and_keep_none():
    seeds = {block_seed(3, b) for b in range(100)}
    assert len(seeds) == 100 and block_seed(None, 5) is None
    assert block_seed(3, 7) == block_seed(3, 7) != block_seed(4, 7)


def test_each_sglang_engine_gets_its_gpus_port_and_weight_group():
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.trainer.builders import _sglang_server_of

    rollout = RolloutConfig(engine="sglang")
    p = EnginePlacement(16, 4, gpus_per_node=8)
    s = _sglang_server_of(rollout, p, 3).sglang  # second engine of the second node
    assert (s.tp_size, s.port, s.extra_args["base-gpu-id"]) == (4, 30001, 4)
    assert (s.nccl_master_port, s.weight_group_name) == (29601, "megatron_rpt_weights_3")
    d = EnginePlacement(16, 4, gpus_per_node=8, mode="disaggregated", engine_gpu_offset=8)
    assert _sglang_server_of(rollout, d, 2).sglang.extra_args["base-gpu-id"] == 8
    wide = EnginePlacement(16, 16, gpus_per_node=8)  # the one-engine fallback keeps tp_size
    assert _sglang_server_of(rollout, wide, 0) is rollout
