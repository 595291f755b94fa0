"""Checkpoint conversion cost on the real SmolLM2-135M: wall time and peak RSS per direction.

Runs the two CLIs exactly as a user would, each in its own process (peak RSS is that process's
``ru_maxrss`` from ``os.wait4``), HF -> Megatron -> HF, then checks the round trip is
bit-exact. Also measured: a process that only imports the conversion code (torch, Megatron,
transformers-free), so the model-proportional part of the peak is visible. The budget is peak
RSS < 2.5 x the checkpoint's size on disk.

Run: ``python bench/bench_conversion.py`` (writes bench/results/conversion.json).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import RESULTS  # noqa: E402

BUDGET = 2.5


def run(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process; raises on failure."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEGATRON_RPT_LOG_LEVEL="WARNING")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bit_exact(a_dir: Path, b_dir: Path) -> bool:
    import torch
    from safetensors import safe_open

    with (
        safe_open(str(a_dir / "model.safetensors"), "pt") as a,
        safe_open(str(b_dir / "model.safetensors"), "pt") as b,
    ):
        keys = sorted(a.keys())
        return keys == sorted(b.keys()) and all(
            torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in keys
        )


def machine() -> dict:
    import torch

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import importlib.metadata

        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["megatron_core"] = importlib.metadata.version("megatron-core")
    except Exception:  # noqa: BLE001
        pass
    return info


def main() -> None:
    from megatron_rpt.assets import smollm2_dir

    src = smollm2_dir()
    ckpt_bytes = (src / "model.safetensors").stat().st_size
    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_conversion_") as tmp:
        tmp = Path(tmp)
        wall, rss = run(
            [
                py,
                "-c",
                "import megatron_rpt.checkpoint.hf_to_megatron, "
                "megatron_rpt.checkpoint.megatron_to_hf, megatron.core.models.gpt, "
                "megatron.core.dist_checkpointing",
            ]
        )
        rows.append(
            {
                "step": "imports only",
                "wall_s": wall,
                "peak_rss_mib": rss / 2**20,
                "rss_over_ckpt": rss / ckpt_bytes,
            }
        )
        steps = [
            (
                "HF -> Megatron",
                [
                    "tools/convert_hf_to_megatron.py",
                    "--hf-dir",
                    "embedded:smollm2",
                    "--out-dir",
                    str(tmp / "mg"),
                ],
            ),
            (
                "Megatron -> HF",
                [
                    "tools/convert_megatron_to_hf.py",
                    "--megatron-dir",
                    str(tmp / "mg"),
                    "--out-dir",
                    str(tmp / "hf"),
                ],
            ),
        ]
        for name, args in steps:
            wall, rss = run([py, str(ROOT / args[0]), *args[1:]])
            rows.append(
                {
                    "step": name,
                    "wall_s": wall,
                    "peak_rss_mib": rss / 2**20,
                    "rss_over_ckpt": rss / ckpt_bytes,
                }
            )
        exact = bit_exact(src, tmp / "hf")
        megatron_bytes = dir_bytes(tmp / "mg" / "model")
    for r in rows:
        print(
            f"{r['step']:<16} {r['wall_s']:7.1f} s  {r['peak_rss_mib']:8.0f} MiB  "
            f"{r['rss_over_ckpt']:5.2f} x checkpoint"
        )
    print(
        f"checkpoint: HF safetensors {ckpt_bytes / 2**20:.0f} MiB, Megatron torch_dist "
        f"{megatron_bytes / 2**20:.0f} MiB; round trip bit-exact: {exact}"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "conversion.json"
    out.write_text(
        json.dumps(
            {
                "machine": machine(),
                "model": "SmolLM2-135M-Instruct (fp32)",
                "hf_checkpoint_bytes": ckpt_bytes,
                "megatron_checkpoint_bytes": megatron_bytes,
                "budget_rss_over_ckpt": BUDGET,
                "bit_exact": exact,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    worst = max(r["rss_over_ckpt"] for r in rows)
    if not exact or worst >= BUDGET:
        raise SystemExit(f"FAILED: bit_exact={exact}, worst peak RSS {worst:.2f} x >= {BUDGET} x")


if __name__ == "__main__":
    main()
