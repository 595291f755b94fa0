"""tools/prepare_rpt_data.py: --help covers every DataConfig field, an end-to-end run, and
one-line errors for bad input that leave no output directory."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rpt.assets import champ_documents, smollm2_dir
from megatron_rpt.cli import run_cli
from megatron_rpt.config_utils import field_docs
from megatron_rpt.data.config import DataConfig
from megatron_rpt.data.store import SampleStore
from megatron_rpt.testing.tiny_models import save_tiny_causal_lm

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "prepare_rpt_data.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_causal_lm(root / "tiny", smollm2_dir())
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in champ_documents()[:6]))
    return {"model": model, "corpus": corpus}


def test_help_documents_every_option():
    out = subprocess.run(
        [sys.executable, str(TOOL), "--help"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        check=True,
    ).stdout
    flat = " ".join(out.split())
    docs = field_docs(DataConfig)
    for f in dataclasses.fields(DataConfig):
        assert f"--{f.name.replace('_', '-')} " in out, f.name
        assert " ".join(docs[f.name].split()[:6]) in flat, f.name
    for opt in ("--out", "--overwrite", "--recipe", "--set"):
        assert opt in out


def test_end_to_end_on_a_jsonl_corpus(setup, tmp_path):
    out = tmp_path / "prepared"
    proc = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--corpus",
            str(setup["corpus"]),
            "--tokenizer",
            str(setup["model"]),
            "--entropy-device",
            "cpu",
            "--entropy-threshold",
            "1.0",
            "--validation-fraction",
            "0.2",
            "--set",
            "data.entropy_window_tokens=256",
            "--set",
            "data.entropy_window_overlap=64",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for row in ("documents", "tokens", "kept train (H >= 1)", "hard (H > 1.5)", "time", "tokens/s"):
        assert row in proc.stdout, row
    meta = json.loads((out / "meta.json").read_text())
    assert meta["data_config"]["entropy_window_tokens"] == 256
    assert meta["summary"]["documents"] == 6
    assert len(SampleStore.open(out)) == meta["summary"]["kept_train"] > 0


def _tool():
    spec = importlib.util.spec_from_file_location("prepare_rpt_data_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("missing", ["--corpus", "{tmp}/nope.jsonl"], r"nope.jsonl: corpus file not found"),
        (
            "field",
            ["--corpus", "{corpus}", "--text-field", "body"],
            r"corpus.jsonl:1: field 'body' \(data.text_field\) missing; keys present: text",
        ),
        ("utf8", ["--corpus", "{tmp}/bad.jsonl"], r"bad.jsonl:1: invalid UTF-8 at byte offset 10"),
        ("empty", ["--corpus", "{tmp}/empty.jsonl"], r"the corpus has no documents"),
        ("zero", ["--corpus", "{corpus}", "--entropy-threshold", "50"], r"keeps 0 of \d+ eligible"),
        ("value", ["--entropy-top-k", "many"], r"data.entropy_top_k: expected an integer"),
        ("key", ["--set", "data.entropy_treshold=1"], r"did you mean 'data.entropy_threshold'"),
    ],
)
def test_bad_input_gives_one_line_error_and_no_output(setup, tmp_path, capsys, case, args, message):
    import re

    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "\xff"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path, corpus=setup["corpus"]) for a in args]
    argv += [
        "--tokenizer",
        str(setup["model"]),
        "--entropy-device",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
    ]
    with pytest.raises(SystemExit) as info:
        run_cli(_tool().main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    # only a threshold that keeps nothing leaves the (hidden) scores behind, for reuse
    assert (tmp_path / ".out.work").exists() == (case == "zero")
