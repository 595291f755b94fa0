"""EngineGuard: a dying or hanging engine is detected, rebuilt, re-synced and the work retried;
too many failures stop the run; errors outside the engine are not retried.

Uses a canned engine behind megatron_rpt.testing.faults.FaultyEngine and a recording sync
function (no process group: with one process the guard's broadcasts are the identity).
"""

import time

import pytest

from megatron_rpt.rollout.types import Completion, SamplingParams
from megatron_rpt.testing.faults import EngineFaults, FaultyEngine
from megatron_rpt.trainer.engine_guard import EngineGuard, RolloutEngineError
from megatron_rpt.weight_sync import WeightSyncError

PARAMS = SamplingParams(temperature=0.8, n=2, max_new_tokens=4, seed=5)


class CannedEngine:
    """Deterministic completions: text derived from the prompt and the seed."""

    def __init__(self):
        self.version, self.closed = 0, False

    def generate(self, prompts, params):
        return [
            [Completion(token_ids=[1, 2], text=f"{sum(p)}-{params.seed}-{j}", logprobs=[-1.0, -1.0],
                        finish_reason="stop") for j in range(params.n)]
            for p in prompts
        ]  # fmt: skip

    def update_weights(self, named_tensors, *, version, flush_cache=True):
        self.version = version

    def health(self):
        return not self.closed

    def shutdown(self):
        self.closed = True


def make_guard(faults, *, timeout_s=5.0, max_restarts=2, sync_fails=()):
    syncs = []

    def sync(engine, version):
        syncs.append((id(engine), version))
        if len(syncs) in sync_fails:
            raise WeightSyncError(f"injected sync failure #{len(syncs)}")
        engine.update_weights([], version=version)
        return len(syncs)

    guard = EngineGuard(
        lambda: FaultyEngine(CannedEngine(), faults), sync,
        timeout_s=timeout_s, max_restarts=max_restarts, is_driver=True,
    )  # fmt: skip
    return guard, syncs


def rollout(guard):
    return [c.text for g in guard.generate([[1, 2], [3]], PARAMS) for c in g]


def test_no_fault():
    guard, syncs = make_guard(EngineFaults())
    guard.start(version=0)
    assert guard.run(rollout, version=0) == ["3-5-0", "3-5-1", "3-5-0", "3-5-1"]
    assert guard.restarts == 0 and len(syncs) == 1


def test_engine_dies_once_then_recovers(caplog):
    faults = EngineFaults({1: "die"})
    guard, syncs = make_guard(faults)
    guard.start(version=3)
    with caplog.at_level("WARNING"):
        out = guard.run(rollout, version=3)
    assert out == ["3-5-0", "3-5-1", "3-5-0", "3-5-1"]  # the retried work, same result
    assert faults.engines_built == 2 and guard.restarts == 1 and guard.failures == 0
    # The new engine got the trainer's weights (a full sync at the current version) first.
    assert [v for _, v in syncs] == [3, 3] and syncs[0][0] != syncs[1][0]
    assert guard.engine.version == 3
    assert "rollout engine failure 1/2" in caplog.text and "injected: engine died" in caplog.text


def test_hung_engine_is_abandoned_and_replaced(caplog):
    faults = EngineFaults({1: "hang"}, hang_s=30.0)
    guard, syncs = make_guard(faults, timeout_s=0.5)
    guard.start(version=0)
    t0 = time.monotonic()
    with caplog.at_level("WARNING"):
        out = guard.run(rollout, version=0)
    assert time.monotonic() - t0 < 10  # detected by the deadline, not by the 30 s sleep
    assert out == ["3-5-0", "3-5-1", "3-5-0", "3-5-1"]
    assert faults.engines_built == 2 and guard.restarts == 1
    assert "did not return within 0.5 s" in caplog.text


def test_always_failing_engine_stops_the_run():
    faults = EngineFaults(always="die")
    guard, _ = make_guard(faults, max_restarts=2)
    guard.start(version=0)
    with pytest.raises(
        RolloutEngineError, match=r"failed 3 times in a row \(rollout.max_restarts=2\)"
    ):
        guard.run(rollout, version=0)
    assert faults.engines_built == 3  # the first engine + 2 restarts, then stop


def test_failed_weight_push_restarts_the_engine():
    faults = EngineFaults()
    guard, syncs = make_guard(faults, sync_fails=(2,))
    guard.start(version=0)
    assert guard.push_weights(version=1) == 3  # sync 2 failed, sync 3 went to a new engine
    assert faults.engines_built == 2 and guard.engine.version == 1


def test_errors_outside_the_engine_are_not_retried():
    faults = EngineFaults()
    guard, _ = make_guard(faults)
    guard.start(version=0)

    def broken(g):
        g.generate([[1]], PARAMS)
        raise KeyError("bug in reward code")

    with pytest.raises(KeyError, match="bug in reward code"):
        guard.run(broken, version=0)
    assert faults.engines_built == 1 and guard.restarts == 0
