"""A real training run (tiny recipe, 5 steps) against a second writer, a lost metrics line,
a corrupted checkpoint and a refused resume.

* A second run on a busy run_dir fails at once with one line; the first finishes intact with
  every metrics line.
* A run stopped between a checkpoint's ``latest`` and its metrics line (the state it leaves:
  ``latest`` = step 3, metrics lines 1-2) gets the line of step 3 back from the checkpoint on
  resume: metrics.jsonl ends with exactly steps 1-5.
* A flipped byte in a checkpoint file stops the resume with one line naming the file; a
  resume refused because the config changed leaves config.yaml as it was.
"""

import json
import shutil
import subprocess
import time

import pytest

from tests.helpers import train_helpers as th


def _fixture(tmp_path, latest: int, lines: int):
    """A copy of the reference run as a kill after checkpoint ``latest`` leaves it."""
    run = shutil.copytree(th.reference_run(), tmp_path / "run")
    ckpts = run / "checkpoints"
    for p in ckpts.glob("step_*"):
        if int(p.name.split("_")[1]) > latest:
            shutil.rmtree(p)
    shutil.rmtree(run / "hf")
    (ckpts / "latest").write_text(f"step_{latest:07d}\n")
    text = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(text[:lines]))
    return run


@pytest.mark.slow
def test_second_run_on_a_busy_run_dir_fails_at_once(tmp_path):
    th.reference_run()  # prepared data exists, so the first run does not hold the data lock
    run = tmp_path / "run"
    first = subprocess.Popen(th.train_cmd(run, *th.SHORT), env=th.env(), cwd=th.ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (run / ".lock").is_file() or not (run / ".lock").read_text().strip():
        assert first.poll() is None, first.stderr.read()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    second = subprocess.run(th.train_cmd(run, *th.SHORT), env=th.env(), cwd=th.ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert second.returncode == 2, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: run.run_dir={run} is in use by PID {first.pid} on host ")
    assert "Traceback" not in second.stderr
    _, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-4000:]
    assert [r["step"] for r in th.metrics(run)] == [1, 2, 3, 4, 5]
    assert (run / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_line_lost_after_latest_is_restored_from_the_checkpoint(tmp_path):
    run = _fixture(tmp_path, latest=3, lines=2)
    proc = th.run_train(run, *th.SHORT)
    assert "restored the line of step 3" in proc.stderr
    got, want = th.metrics(run), th.metrics(th.reference_run())
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for key in ("data/sample_ids", "rollout/reward_mean", "train/grad_norm"):
        assert [r[key] for r in got] == [r[key] for r in want], key


@pytest.mark.slow
def test_corrupt_checkpoint_and_refused_resume_leave_the_run_as_it_was(tmp_path):
    run = _fixture(tmp_path, latest=3, lines=3)
    config = (run / "config.yaml").read_text()
    refused = subprocess.run(th.train_cmd(run, *th.SHORT, "optimizer.lr=1e-2"), env=th.env(),
                             cwd=th.ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert refused.returncode == 2 and "LR schedule differs" in refused.stderr, refused.stderr
    assert (run / "config.yaml").read_text() == config
    shard = run / "checkpoints" / "step_0000003" / "optimizer" / "__0_1.distcp"
    data = bytearray(shard.read_bytes())
    data[int(len(data) * 0.7)] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = subprocess.run(th.train_cmd(run, *th.SHORT), env=th.env(), cwd=th.ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{shard}: checksum mismatch" in last
    assert "Traceback" not in proc.stderr
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        1, 2, 3,
    ]  # fmt: skip
