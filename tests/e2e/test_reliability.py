"""Reliability of a real training run (tiny recipe, 5 steps, a checkpoint after every step).

* Kill and resume: the entry point is SIGKILLed in the middle of step 4 (a phase hook passed
  to ``megatron_rpt.train.main`` holds it there so the kill lands at a known point); the same command run again resumes from the last complete checkpoint (step 3).
  Over the whole run the contexts consumed, the per-step rewards and the final weights equal
  an uninterrupted run's: no context trained twice or skipped, an exact resume.
* Engine faults inside the loop: the engine dies in one step and hangs in another; each is
  detected, the engine rebuilt and re-synced, and the step retried; the run equals the
  uninterrupted one. An engine that always dies stops the run with a clear error.
"""


import pytest
import torch

from megatron_rpt.testing.distributed import run_distributed
from tests.helpers import train_helpers as th


def _assert_same_run(run, reference):
    got, want = th.metrics(run), th.metrics(reference)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for key in ("data/sample_ids", "rollout/reward_mean", "train/grad_norm", "data/consumed"):
        assert [r[key] for r in got] == [r[key] for r in want], key
    ids = [i for r in got for i in r["data/sample_ids"]]
    assert len(ids) == len(set(ids)) == 20  # within one epoch: nothing twice
    a, b = th.hf_weights(run), th.hf_weights(reference)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_sigkill_mid_step_then_same_command_resumes_exactly(tmp_path):
    reference = th.reference_run()
    run, marker = tmp_path / "run", tmp_path / "stalled"
    cmd = th.stalling_cmd(run, "train", 3, marker, *th.SHORT)
    th.kill_at_stall(cmd, th.env(), marker, timeout=400)
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000003"
    assert [r["step"] for r in th.metrics(run)] == [1, 2, 3]

    again = th.run_train(run, *th.SHORT)  # the same command, no stall
    assert f"resumed from {ckpts / 'step_0000003'} at step 3" in again.stderr
    _assert_same_run(run, reference)


def _train_with_faults(rank, world_size, argv, plan, always):
    from megatron_rpt.train import config_from_args, main, parse_args
    from megatron_rpt.trainer.builders import rollout_engine_factory
    from tests.helpers.faults import EngineFaults, FaultyEngine

    faults = EngineFaults(plan, always=always, hang_s=600)
    inner = rollout_engine_factory(config_from_args(parse_args(argv)))
    main(argv, engine_factory=lambda: FaultyEngine(inner(), faults))
    return faults.injected, faults.engines_built


def _fault_env():
    env = {k: th.env()[k] for k in ("MEGATRON_RPT_TINY_ASSETS", "WANDB_MODE")}
    return {**env, "OMP_NUM_THREADS": "2"}


@pytest.mark.slow
def test_engine_that_dies_or_hangs_is_restarted_and_the_step_retried(tmp_path):
    reference = th.reference_run()
    run = tmp_path / "run"
    argv = th.train_argv(run, *th.SHORT, "rollout.timeout_s=20")
    # Sampling calls: step 1 -> #1, step 2 -> #2 dies, retried as #3; step 3 -> #4 hangs
    # (detected after rollout.timeout_s), retried as #5; steps 4-5 -> #6, #7.
    [(injected, built)] = run_distributed(
        _train_with_faults, 1, args=(argv, {2: "die", 4: "hang"}, None), timeout=600,
        env=_fault_env(),
    )  # fmt: skip
    assert injected == [(2, "die"), (4, "hang")] and built == 3
    _assert_same_run(run, reference)


@pytest.mark.slow
def test_engine_that_always_dies_stops_the_run(tmp_path):
    run = tmp_path / "run"
    argv = th.train_argv(run, *th.SHORT, "rollout.max_restarts=2")
    with pytest.raises(RuntimeError, match=r"failed 3 times in a row \(rollout.max_restarts=2\)"):
        run_distributed(
            _train_with_faults, 1, args=(argv, {}, "die"), timeout=600, env=_fault_env()
        )
    assert not (run / "checkpoints").exists()  # nothing was trained on partial data
