"""EngineFleet + EngineGuard: a dying or hanging engine is detected, rebuilt, re-synced and the
work retried; too many failures stop the run; errors outside the engine are not retried.

Uses a canned engine behind tests.helpers.faults.FaultyEngine and a recording push
function (no process group: with one process the fleet's broadcasts are the identity).
"""

import time

import pytest

from megatron_rpt.errors import InputError
from megatron_rpt.rollout.placement import EnginePlacement
from megatron_rpt.rollout.routing import block_seed
from megatron_rpt.rollout.scheduling import RolloutRequest
from megatron_rpt.rollout.types import RolloutEngine, SamplingParams
from megatron_rpt.testing.fake_engine import FakeRolloutEngine
from megatron_rpt.trainer.engine_guard import EngineGuard, RolloutEngineError
from megatron_rpt.trainer.fleet import EngineFleet
from megatron_rpt.weight_sync import WeightSyncError
from tests.helpers.faults import EngineFaults, FaultyEngine

PARAMS = SamplingParams(temperature=0.8, n=2, max_new_tokens=4, seed=5)
SEED = block_seed(5, 0)  # both requests are one block (one document)
EXPECTED = [f"3-{SEED}-0", f"3-{SEED}-1", f"3-{SEED}-0", f"3-{SEED}-1"]


def _respond(prompt, params):
    """Deterministic completions: text derived from the prompt and the seed."""
    if len(prompt) > 3:
        raise InputError("prompt too long")
    return [f"{sum(prompt)}-{params.seed}-{j}" for j in range(params.n)]


def canned_engine():
    return FakeRolloutEngine(_respond)


def make_guard(faults, *, timeout_s=5.0, max_restarts=2, sync_fails=()):
    syncs = []
    guard = EngineGuard(lambda: FaultyEngine(canned_engine(), faults), timeout_s=timeout_s)

    def push(version, engines):
        syncs.append((id(guard.engine), version))
        if len(syncs) in sync_fails:
            raise WeightSyncError(f"injected sync failure #{len(syncs)}")
        guard.update_weights([], version=version)
        return len(syncs)

    fleet = EngineFleet(
        EnginePlacement(1, 1), guard, push, rank=0, max_restarts=max_restarts, block_contexts=8
    )
    return fleet, syncs


def rollout(guard, prompts=((1, 2), (3,))):
    requests = [RolloutRequest("doc", i, p) for i, p in enumerate(prompts)]
    return [c.text for g in guard.generate(requests, PARAMS) for c in g]


def test_the_guard_is_an_engine():
    guard = EngineGuard(canned_engine, timeout_s=5.0)
    guard.start()
    assert isinstance(guard, RolloutEngine)
    assert guard.generate([[1, 2]], PARAMS)[0][1].text == "3-5-1"
    guard.update_weights([], version=4)
    assert guard.engine.weight_version == 4 and guard.health()
    guard.shutdown()
    assert not guard.health()


def test_no_fault():
    guard, syncs = make_guard(EngineFaults())
    guard.start(version=0)
    assert rollout(guard) == [*EXPECTED]
    assert guard.restarts == [0] and len(syncs) == 1


def test_engine_dies_once_then_recovers(caplog):
    faults = EngineFaults({1: "die"})
    guard, syncs = make_guard(faults)
    guard.start(version=3)
    with caplog.at_level("WARNING"):
        out = rollout(guard)
    assert out == [*EXPECTED]  # the retried work, same result
    assert faults.engines_built == 2
    # The new engine got the trainer's weights (a full sync at the current version) first.
    assert [v for _, v in syncs] == [3, 3] and syncs[0][0] != syncs[1][0]
    assert guard.guard.engine.weight_version == 3
    assert guard.failures == [0] and guard.restarts == [1]
    assert "rollout engine 0 failure 1/2" in caplog.text and "injected: engine died" in caplog.text


def test_hung_engine_is_abandoned_and_replaced(caplog):
    faults = EngineFaults({1: "hang"}, hang_s=30.0)
    guard, syncs = make_guard(faults, timeout_s=0.5)
    guard.start(version=0)
    t0 = time.monotonic()
    with caplog.at_level("WARNING"):
        out = rollout(guard)
    assert time.monotonic() - t0 < 10  # detected by the deadline, not by the 30 s sleep
    assert out == [*EXPECTED]
    assert faults.engines_built == 2 and guard.restarts == [1]
    assert "did not return within 0.5 s" in caplog.text


def test_always_failing_engine_stops_the_run():
    faults = EngineFaults(always="die")
    guard, _ = make_guard(faults, max_restarts=2)
    guard.start(version=0)
    with pytest.raises(
        RolloutEngineError,
        match=r"rollout engine 0 \(lead rank 0\) failed 3 times in a row \(rollout.max_restarts=2\)",
    ):
        rollout(guard)
    assert faults.engines_built == 3  # the first engine + 2 restarts, then stop


def test_failed_weight_push_restarts_the_engine():
    faults = EngineFaults()
    guard, syncs = make_guard(faults, sync_fails=(2,))
    guard.start(version=0)
    assert guard.push_weights(version=1) == 3  # sync 2 failed, sync 3 went to a new engine
    assert faults.engines_built == 2 and guard.guard.engine.weight_version == 1


def test_errors_outside_the_engine_are_not_retried():
    faults = EngineFaults()
    guard, _ = make_guard(faults)
    guard.start(version=0)
    with pytest.raises(InputError, match="prompt too long"):
        rollout(guard, prompts=((1, 2, 3, 4),))
    assert faults.engines_built == 1 and guard.restarts == [0]
