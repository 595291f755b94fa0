"""Checkpoint manifest cost: writing and verifying CRC-32 blocks vs loading the checkpoint.

Builds a synthetic torch_dist checkpoint of ``--mb`` MiB (fp32 tensors, saved with
dist_checkpointing in one process), writes its manifest, then times in one run: the
manifest write, a verification (block checksums on a thread pool), and a full
``dist_checkpointing.load`` of the same tensors. Prints verify/load and write/save ratios.
The page cache is warm for every read (the same for all timings). Run:
``python bench/bench_checkpoint_verify.py --mb 512``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import print_table, write_result  # noqa: E402
from megatron_rpt.cli import FlagParser  # noqa: E402
from megatron_rpt.model.manifest import verify_manifest, write_manifest  # noqa: E402


def _state(mb: int):
    from megatron.core.dist_checkpointing import ShardedTensor

    n = max(1, mb // 16)
    return {
        f"t{i}": ShardedTensor.from_rank_offsets(f"t{i}", torch.randn(2048, 2048))  # 16 MiB
        for i in range(n)
    }


def main() -> None:
    parser = FlagParser()
    parser.add_argument("--mb", type=int, default=512)
    args = parser.parse_args()
    from megatron.core import dist_checkpointing

    from megatron_rpt.distributed import initialize_model_parallel, single_process_group

    root = Path(tempfile.mkdtemp(prefix="bench-manifest-"))
    try:
        with single_process_group():
            initialize_model_parallel(1, 1)  # also applies the CPU patches (no CUDA sync)
            state = _state(args.mb)
            (root / "model").mkdir()
            t = time.perf_counter()
            dist_checkpointing.save(state, str(root / "model"))
            save_s = time.perf_counter() - t
            t = time.perf_counter()
            write_manifest(root)
            write_s = time.perf_counter() - t
            t = time.perf_counter()
            assert verify_manifest(root)
            verify_s = time.perf_counter() - t
            t = time.perf_counter()
            dist_checkpointing.load(_state(args.mb), str(root / "model"))
            load_s = time.perf_counter() - t
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
        rows = [{
            "MiB": size, "save_s": save_s, "manifest_write_s": write_s, "load_s": load_s,
            "verify_s": verify_s, "verify/load": verify_s / load_s, "write/save": write_s / save_s,
            "verify_MiB_per_s": size / verify_s,
        }]  # fmt: skip
        print_table(rows)
        print(f"wrote {write_result('checkpoint_verify', rows)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
