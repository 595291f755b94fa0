"""metrics.jsonl across crashes: one line per completed step, torn lines cut, lost lines restored."""

import json
import logging

import yaml

from megatron_rpt.trainer.run_logger import LogConfig, RunLogger, read_metrics

CFG = LogConfig(wandb="disabled", progress_bar=False, plot=False)


def _open(run_dir, start_step, restored=None, config=None):
    return RunLogger(
        CFG, run_dir, run_name="t", objective="rpt", start_step=start_step, total_steps=8,
        config=config or {"train": {"steps": 8}}, enabled=True, restored_record=restored,
    )  # fmt: skip


def _write(run_dir, steps, tail=b""):
    lines = b"".join(json.dumps({"step": s, "x": s}).encode() + b"\n" for s in steps)
    (run_dir / "metrics.jsonl").write_bytes(lines + tail)


def _steps(run_dir):
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    return [json.loads(line)["step"] for line in text.splitlines()]


def _resume_and_log(run_dir, start, restored=None, until=8):
    log = _open(run_dir, start, restored)
    for s in range(start + 1, until + 1):
        log.log({"step": s, "x": s})
    log.close()


def test_line_lost_between_checkpoint_and_log_is_restored(tmp_path, caplog):
    _write(tmp_path, [1, 2, 3, 4, 5])  # killed after step 6's checkpoint, before its line
    with caplog.at_level(logging.WARNING):
        _resume_and_log(tmp_path, 6, restored={"step": 6, "x": 6})
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert any("restored the line of step 6" in r.message for r in caplog.records)


def test_torn_last_line_is_cut_not_appended_to(tmp_path, caplog):
    _write(tmp_path, [1, 2, 3, 4], tail=b'{"step": 5, "x": 5, "y": [1, 2')
    with caplog.at_level(logging.WARNING):
        _resume_and_log(tmp_path, 4)
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert any("1 torn or unreadable" in r.message for r in caplog.records)


def test_torn_line_of_the_checkpoint_step_is_replaced(tmp_path):
    _write(tmp_path, [1, 2, 3, 4, 5], tail=b'{"step": 6, "x"')
    _resume_and_log(tmp_path, 6, restored={"step": 6, "x": 6})
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_undecodable_bytes_and_later_steps_are_dropped(tmp_path):
    _write(tmp_path, [1, 2, 3, 4, 5, 6, 7], tail=b"\xff\xfe\x00garbage\n")
    _resume_and_log(tmp_path, 6)
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))


def test_duplicates_are_dropped_and_fresh_start_empties(tmp_path):
    _write(tmp_path, [1, 2, 2, 3])
    _resume_and_log(tmp_path, 3, until=4)
    assert _steps(tmp_path) == [1, 2, 3, 4]
    _resume_and_log(tmp_path, 0, until=2)
    assert _steps(tmp_path) == [1, 2]


def test_config_yaml_written_when_the_logger_opens(tmp_path):
    _open(tmp_path, 0, config={"optimizer": {"lr": 0.003}}).close()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"optimizer": {"lr": 0.003}}
