"""tools/eval_next_token.py: --help covers every EvalConfig field, an end-to-end run on a tiny
prepared split is deterministic, and bad input gives one line and exit status 2."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_rpt.cli import run_cli
from megatron_rpt.config_utils import field_docs
from megatron_rpt.eval.config import EvalConfig
from tests.helpers.eval_helpers import shared_tiny
from tools.eval_next_token import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return shared_tiny()


def test_help_documents_every_option():
    text = " ".join(build_parser().format_help().split())
    docs = field_docs(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        assert f"--{f.name.replace('_', '-')} " in text, f.name
        assert " ".join(docs[f.name].split()[:6]) in text, f.name
    for opt in ("--model", "--data", "--corpus", "--out", "--set", "--hf-config"):
        assert opt in text


def _run(model, prepared, out, *extra):
    args = ["--model", f"tiny={model}", "--data", str(prepared), "--out", str(out),
            "--mode", "both", "--difficulty-thresholds", "0.5,1.0,1.5", "--n-samples", "2",
            "--pass-k", "2", "--max-new-tokens", "4", "--reasoning-max-positions", "6",
            "--max-positions", "300", "--device", "cpu", "--set", "prompt.template=v2", *extra]  # fmt: skip
    assert main(args) == 0
    return json.loads((out / "eval.json").read_text())


def _numbers(doc):
    return [(r["model"], r["metric"], r["buckets"]) for r in doc["results"]], doc["metrics"]


def test_end_to_end_is_deterministic(tiny, tmp_path, capsys):
    model, prepared = tiny
    a = _run(model, prepared, tmp_path / "a")
    printed = capsys.readouterr().out
    assert (
        "| standard NTP | tiny | " in printed
        and "| next-token reasoning, Pass@2 | tiny |" in printed
    )
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "accuracy.png",
        "eval.json",
        "table.md",
    ]
    assert a["data"]["positions_standard"]["all"] == 300
    assert a["data"]["positions_reasoning"]["all"] == 6
    assert a["settings"]["prompt"]["template"] == "v2"
    assert a["results"][0]["buckets"]["easy"]["n"] == a["data"]["positions_standard"]["easy"]
    assert 0 < a["results"][0]["buckets"]["all"]["value"] < 1
    b = _run(model, prepared, tmp_path / "b")
    assert _numbers(a) == _numbers(b)
    # the output exists: a second run needs --overwrite
    with pytest.raises(SystemExit) as exc:
        run_cli(
            main,
            ["--model", f"tiny={model}", "--data", str(prepared), "--out", str(tmp_path / "a")],
        )
    assert exc.value.code == 2
    assert "output already exists (pass --overwrite" in capsys.readouterr().err


def test_bad_input_is_one_line(tiny, tmp_path):
    model, prepared = tiny
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/eval_next_token.py"), "--model", f"tiny={model}",
         "--data", str(prepared), "--out", str(out), "--difficulty-thresholds", "1.0,0.5,1.5"],
        capture_output=True, text=True, env=ENV, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: eval.difficulty_thresholds must be three increasing values (easy < medium < "
        "hard), got [1.0, 0.5, 1.5]"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{tmp}/nowhere"], "{tmp}/nowhere: not a prepared data directory"),
        (["--model", "x=y=z"], "--model x=y=z: not found"),
        (
            ["--model", "a=embedded:smollm2", "--model", "a={model}"],
            "--model a={model}: the name 'a' is used twice",
        ),
        (["--set", "eval.mode=sometimes"], "eval.mode: 'sometimes' is not one of"),
    ],
)
def test_more_bad_input(tiny, tmp_path, capsys, args, message):
    model, prepared = tiny
    fmt = {"tmp": tmp_path, "model": model}
    argv = ["--model", f"tiny={model}", "--data", str(prepared), "--out", str(tmp_path / "o")]
    argv += [a.format(**fmt) for a in args]
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + message.format(**fmt)), err
    assert not (tmp_path / "o").exists()
