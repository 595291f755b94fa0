"""The RPT/RLP/NTP comparison's bookkeeping: a run's objective, steps and FLOPs, and the table."""

import json
import math

import pytest

from megatron_rpt.errors import DataError
from megatron_rpt.eval.compare import Entry, markdown, run_record, write_comparison


def test_run_record_reads_the_last_step(tmp_path):
    run = tmp_path / "rlp"
    run.mkdir()
    records = [
        {"step": 1, "flops/total_cumulative": 10.0, "flops/train_cumulative": 6.0},
        {"step": 2, "flops/total_cumulative": 25.0, "flops/train_cumulative": 12.0,
         "flops/rollout_cumulative": 8.0, "flops/score_cumulative": 5.0},
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.yaml").write_text("train:\n  objective: rlp\n  steps: 2\n")
    assert run_record(run) == ("rlp", 2, {"total": 25.0, "train": 12.0, "rollout": 8.0,
                                          "score": 5.0})  # fmt: skip
    with pytest.raises(DataError, match="no metrics.jsonl"):
        run_record(tmp_path)


def test_table_and_files(tmp_path):
    entries = [
        Entry("base", "embedded:smollm2", accuracy={"easy": 0.5, "medium": 0.25, "hard": 0.125,
              "all": 0.6}, perplexity=7.5),  # fmt: skip
        Entry("ntp", "runs/ntp", objective="ntp", steps=8,
              flops={"total": 3.9e12, "train": 3.9e12, "rollout": 0.0, "score": 0.0},
              accuracy={"easy": 0.5}, perplexity=7.25),  # fmt: skip
    ]
    table = markdown(entries).splitlines()
    assert table[2] == "| base | base | 0 | - | - | - | - | 50.0 | 25.0 | 12.5 | 60.0 | 7.500 |"
    assert table[3].startswith("| ntp | ntp | 8 | 3.9e+12 | 3.9e+12 | 0 | 0 | 50.0 | nan |")
    paths = write_comparison(entries, tmp_path / "out")
    saved = json.loads(paths["compare.json"].read_text())
    assert [e["name"] for e in saved] == ["base", "ntp"] and saved[1]["perplexity"] == 7.25
    assert math.isnan(Entry("x", "y").perplexity)
