"""Repository-wide pytest setup (applies to tests/ and to doctests in megatron_rpt/).

* Markers ``gpu``, ``te`` and ``sglang_runtime`` skip automatically when the capability is
  missing (see megatron_rpt/capabilities.py).
* ``--min-passed=N`` fails the session when fewer than N tests passed, so a run in which
  everything was skipped or deselected cannot look green (pytest's own exit code 5 covers only
  "nothing collected").
* Offline defaults: no network for HF hubs or wandb in tests.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--min-passed",
        type=int,
        default=0,
        help="fail the session when fewer than this many tests passed",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from megatron_rpt import capabilities as caps

    checks = {
        "gpu": (caps.have_cuda, "needs a CUDA GPU"),
        "te": (caps.have_te, "needs Transformer Engine"),
        "sglang_runtime": (caps.have_sglang_runtime, "needs the SGLang runtime and a GPU"),
    }
    for item in items:
        for name, (probe, why) in checks.items():
            if item.get_closest_marker(name) is not None and not probe():
                item.add_marker(pytest.mark.skip(reason=why))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    minimum = session.config.getoption("--min-passed")
    if not minimum:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len([r for r in reporter.stats.get("passed", []) if r.when == "call"])
    if passed < minimum and session.exitstatus == 0:
        reporter.write_line(
            f"ERROR: only {passed} tests passed; --min-passed={minimum} requires more "
            "(were tests skipped or deselected?)",
            red=True,
        )
        session.exitstatus = 1
