"""Shared helpers for bench/ scripts: machine description, result JSON, table printing."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

# ``RPT_BENCH_RESULTS`` redirects every script's JSON (``make bench-quick`` writes its small-size
# runs to bench/results/quick/ so they never overwrite the numbers docs/BENCHMARKS.md cites).
RESULTS = Path(os.environ.get("RPT_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict[str, Any]:
    """Device, CPU count, memory and library versions, recorded next to every result."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    try:
        import importlib.metadata

        info["megatron_core"] = importlib.metadata.version("megatron-core")
    except Exception:  # noqa: BLE001
        pass
    return info


def write_result(name: str, rows: list[dict[str, Any]], **extra: Any) -> Path:
    """Write ``bench/results/<name>.json`` with the machine description, say where, return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "rows": rows, **extra}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def print_table(rows: list[dict[str, Any]]) -> None:
    """A plain fixed-width table of the rows (all rows share keys)."""
    if not rows:
        return
    keys = list(rows[0])
    cells = [[_fmt(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
