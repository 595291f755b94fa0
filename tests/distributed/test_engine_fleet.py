"""The engine fleet over gloo ranks with real HF engines (tiny Llama, real SmolLM2 tokenizer).

* 1, 2 and 4 engines (rollout.gpus_per_engine = 4, 2, 1 on 4 ranks) give identical rollouts
  on every rank: routing by document blocks with per-block seeds makes the batch independent
  of the number of engines, and the requests really are spread (per-engine metrics).
* An injected failure in one of two engines restarts only that engine, the other keeps its
  work, and the completions equal the uninterrupted run; an engine that always fails stops
  every rank with an error naming it.
"""

from __future__ import annotations

import pytest

from megatron_rpt.testing.distributed import run_distributed

# 5 documents, 12 contexts; prompts of different lengths so blocks carry different loads.
DOCS = [("d0", 3), ("d1", 1), ("d2", 2), ("d3", 4), ("d4", 2)]


def _requests(tok):  # noqa: ANN001, ANN202
    from megatron_rpt.rollout.scheduling import RolloutRequest

    out = []
    for d, (doc, count) in enumerate(DOCS):
        text = f"Document {doc}: the quick brown fox number {d} jumps " * (d + 1)
        ids = tok.encode(text)
        out += [RolloutRequest(doc, p, tuple(ids[: 4 + 3 * p])) for p in range(count)]
    order = [7, 0, 11, 3, 5, 1, 9, 2, 10, 4, 8, 6]  # documents interleaved, as a sampler would
    return [out[i] for i in order]


def _fleet(rank, world_size, gpus_per_engine, faults=None, max_restarts=2):  # noqa: ANN001, ANN202
    import torch

    from megatron_rpt.rollout.hf_engine import HFEngine
    from megatron_rpt.rollout.placement import EnginePlacement
    from megatron_rpt.trainer.engine_guard import EngineGuard
    from megatron_rpt.trainer.fleet import EngineFleet
    from tests.helpers.faults import FaultyEngine
    from tests.helpers.rollout_helpers import smollm2_tokenizer, tiny_llama

    torch.set_num_threads(1)
    tok = smollm2_tokenizer()
    placement = EnginePlacement(world_size, gpus_per_engine)
    slot = placement.slot(rank)

    def build():  # noqa: ANN202
        engine = HFEngine(tiny_llama(tok), tok, max_batch_rows=8)
        return engine if faults is None else FaultyEngine(engine, faults)

    guard = EngineGuard(build, timeout_s=120, name=f"rollout engine {slot.engine}")
    guard = guard if slot.is_lead else None
    fleet = EngineFleet(
        placement, guard, lambda version, engines: None, rank=rank, max_restarts=max_restarts,
        block_contexts=3,
    )  # fmt: skip
    return fleet, tok


def _rollout(fleet, tok):  # noqa: ANN001, ANN202
    from megatron_rpt.rollout.types import SamplingParams

    params = SamplingParams(temperature=1.0, n=2, max_new_tokens=6, seed=1234)
    groups = fleet.generate(_requests(tok), params)
    flat = [(c.token_ids, c.logprobs, c.finish_reason) for g in groups for c in g]
    return flat, fleet.pop_metrics()


def _engine_counts(rank, world_size):  # noqa: ANN001, ANN202
    out = {}
    for gpus_per_engine in (4, 2, 1):
        fleet, tok = _fleet(rank, world_size, gpus_per_engine)
        fleet.start(version=0)
        out[gpus_per_engine] = _rollout(fleet, tok)
        fleet.shutdown()
    return out


@pytest.mark.timeout(900)
def test_one_two_four_engines_give_identical_rollouts():
    results = run_distributed(_engine_counts, 4, timeout=800)
    reference = results[0][4][0]
    assert len(reference) == 12 * 2 and any(len(t) > 1 for t, _, _ in reference)
    for rank, by_count in enumerate(results):
        for gpus_per_engine, (flat, metrics) in by_count.items():
            assert flat == reference, (rank, gpus_per_engine)
            engines = 4 // gpus_per_engine
            assert metrics["rollout/engines"] == engines
            requests = [metrics[f"rollout/engine{e}/requests"] for e in range(engines)]
            assert sum(requests) == 12 and all(r > 0 for r in requests), requests
            tokens = [metrics[f"rollout/engine{e}/generated_tokens"] for e in range(engines)]
            assert sum(tokens) == sum(len(t) for t, _, _ in flat)
            assert metrics["rollout/load_imbalance"] >= 1.0
            assert metrics == results[0][gpus_per_engine][1] | {
                k: v for k, v in metrics.items() if k.endswith("_s")
            }  # identical on every rank but for the wall times


def _one_engine_fails(rank, world_size, plan, always):  # noqa: ANN001, ANN202
    from megatron_rpt.trainer.engine_guard import RolloutEngineError
    from tests.helpers.faults import EngineFaults

    clean, tok = _fleet(rank, world_size, 1)
    clean.start(version=0)
    reference = _rollout(clean, tok)[0]
    clean.shutdown()
    faults = EngineFaults(plan if rank == 1 else {}, always=always if rank == 1 else None)
    fleet, tok = _fleet(rank, world_size, 1, faults)
    fleet.start(version=0)
    try:
        flat, metrics = _rollout(fleet, tok)
    except RolloutEngineError as exc:
        return str(exc), faults.engines_built
    finally:
        fleet.shutdown()
    return flat == reference, faults.engines_built, fleet.restarts, faults.injected, metrics


@pytest.mark.timeout(600)
def test_a_failing_engine_is_restarted_alone_and_the_rollout_is_unchanged():
    r0, r1 = run_distributed(_one_engine_fails, 2, args=({1: "die"}, None), timeout=500)
    same, built, restarts, injected, metrics = r1
    assert same and r0[0]  # both ranks hold the uninterrupted run's completions
    assert built == 2 and injected == [(1, "die")]  # engine 1 rebuilt once
    assert r0[1] == 1  # engine 0 never restarted
    assert restarts == [0, 1] == r0[2]
    assert metrics["rollout/engine0/requests"] > 0 and metrics["rollout/engine1/requests"] > 0


@pytest.mark.timeout(600)
def test_an_engine_that_always_fails_stops_every_rank_naming_it():
    (m0, _), (m1, built) = run_distributed(_one_engine_fails, 2, args=({}, "die"), timeout=500)
    assert m0 == m1
    assert "rollout engine 1 (lead rank 1) failed 3 times in a row" in m0
    assert built == 3  # the first engine + rollout.max_restarts=2 restarts
