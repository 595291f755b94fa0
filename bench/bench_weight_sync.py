"""Weight-sync time of SmolLM2-135M (fp32) into the HF engine vs a plain copy of the same bytes.

For each layout (TP=1; PP=2 and TP=3 over gloo, 2 and 3 processes) and bucket size, one spawned
run (``run_distributed``; the engine on rank 0, 1 torch thread per rank):

1. builds the Megatron model from the embedded HF folder and the HF engine from the same folder;
2. perturbs every weight (``tests.helpers.updates``) and syncs once with ``verify='full'`` (every
   tensor's fingerprint compared, and the log-prob probe) - a correctness gate for the numbers;
3. times ``REPEATS`` syncs with ``verify='none'`` (median), split into the executor (gather +
   convert) and the engine's copy-in, plus one sync each with ``verify='probe'`` and 'full';
4. measures in the same processes the floors: one ``copy_`` of a flat buffer of the same
   bytes (memcpy); ``HFEngine.update_weights`` from ready-made HF tensors (the engine alone);
   with several ranks, an all-gather of the same bytes as flat buffers (the transport alone);
5. records each rank's peak resident memory above its level before one more sync (a sampling
   thread; see ``_PeakRSS``): the sync's extra memory.

On a GPU machine (CUDA available) the same script runs the TP=1 layouts on the GPU (one
process; the model, the HF engine and the floors on ``cuda:0``): the floor is then a device
copy of a flat buffer of the same bytes, timings are CUDA-synchronised, and the extra memory is
``torch.cuda.max_memory_allocated`` above the level before the sync. TP/PP > 1 need one GPU
per rank and NCCL, which ``run_distributed`` (gloo) does not set up.

Run: ``python bench/bench_weight_sync.py`` (writes bench/results/weight_sync[_gpu].json);
``--quick`` runs the first layout only.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_result  # noqa: E402
from megatron_rpt.cli import FlagParser  # noqa: E402

REPEATS = 3
MIB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")
SETUPS = [  # (tp, pp, bucket MiB)
    (1, 1, 512),
    (1, 1, 64),
    (1, 2, 512),
    (1, 2, 64),
    (3, 1, 512),
]
GPU_SETUPS = [(1, 1, 512), (1, 1, 64)]


class _PeakRSS:
    """Peak resident memory above the level at entry, sampled every 0.2 ms by a thread.

    Each rank first sets glibc's mmap threshold to 64 KiB (``mallopt``; the environment
    variable would come too late in a spawned rank): every allocation that size or larger is
    then mapped separately and unmapped on free, so RSS follows live tensor memory. The
    thread only runs when the interpreter hands it the GIL, so the pushing rank also samples
    at every tensor the engine receives (``_SampledEngine``), when a whole bucket is alive.
    """

    def __enter__(self) -> _PeakRSS:
        self.base = self.peak = _rss()
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def sample(self) -> None:
        """Read RSS now."""
        self.peak = max(self.peak, _rss())

    def _sample(self) -> None:
        while not self._stop.wait(0.0002):
            self.sample()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        sys.setswitchinterval(self._switch)
        self.sample()

    @property
    def extra(self) -> int:
        """Bytes above the entry level at the peak."""
        return self.peak - self.base


class _SampledEngine:
    """Engine wrapper that samples RSS as each streamed tensor arrives."""

    def __init__(self, engine, mem: _PeakRSS) -> None:
        self.engine, self.mem = engine, mem

    def update_weights(self, named_tensors, *, version, flush_cache=True):
        def sampled():
            for item in named_tensors:
                self.mem.sample()
                yield item

        return self.engine.update_weights(sampled(), version=version, flush_cache=flush_cache)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def _track_large_allocations() -> None:
    import ctypes

    m_mmap_threshold = -3
    assert ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 65536) == 1


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def _device_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _device_sync()
        t0 = time.perf_counter()
        fn()
        _device_sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _CudaPeak:
    """GPU counterpart of ``_PeakRSS``: peak allocated device memory above the entry level."""

    def __enter__(self) -> _CudaPeak:
        import torch

        _device_sync()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def sample(self) -> None:
        """Nothing to sample: the allocator tracks the peak."""

    def __exit__(self, *exc: object) -> None:
        import torch

        _device_sync()
        self.peak = torch.cuda.max_memory_allocated()

    @property
    def extra(self) -> int:
        """Bytes above the entry level at the peak."""
        return self.peak - self.base


def _run(rank, world_size, tp, pp, bucket_mib, model="embedded:smollm2"):
    import torch

    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.distributed import initialize_model_parallel, seed_model_parallel
    from megatron_rpt.model.config import ModelConfig, ParallelConfig
    from megatron_rpt.rollout.hf_engine import HFEngine
    from megatron_rpt.weight_sync import WeightSyncConfig, build_plan, sync_weights
    from tests.helpers.updates import perturb_parameters

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    else:
        _track_large_allocations()
    groups = initialize_model_parallel(tp, pp)
    seed_model_parallel(0, groups)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    built = build_pretrained(ModelConfig(hf_path=model, dtype="fp32"), parallel, groups)
    device = "cuda" if cuda else "cpu"
    engine = HFEngine.from_pretrained(model, device=device) if rank == 0 else None
    perturb_parameters(built.chunks, built.arch, built.vocab.padded, groups.tp_rank, tp)

    def cfg(verify):
        return WeightSyncConfig(bucket_bytes=bucket_mib * MIB, verify=verify, probe_tolerance=1e-3)

    t0 = time.perf_counter()
    plan = build_plan(built, groups, cfg("none"))
    plan_s = time.perf_counter() - t0

    def sync(version, verify, target=engine):
        return sync_weights(built, groups, target, plan, version=version, cfg=cfg(verify))

    checked = sync(1, "full")  # correctness gate (raises WeightSyncError on a mismatch)
    runs = [_synced(lambda i=i: sync(2 + i, "none")) for i in range(REPEATS)]
    probed = sync(10, "probe")
    with _CudaPeak() if cuda else _PeakRSS() as mem:
        sync(11, "none", None if engine is None else _SampledEngine(engine, mem))
    nbytes = plan.hf_bytes
    bcast, allgather = _transport_floors(nbytes, world_size) if world_size > 1 else (None, None)
    if engine is None:
        return {"peak_extra_mib": mem.extra / MIB}
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    memcpy = _time(lambda: dst.copy_(src), REPEATS)
    ready = [(n, t.clone()) for n, t in engine.model.state_dict().items() if n != "lm_head.weight"]
    copy_in = _time(lambda: engine.update_weights(iter(ready), version=99), REPEATS)
    median = statistics.median(wall for _, wall in runs)
    runs = [r for r, _ in runs]
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "layout": f"TP={tp} PP={pp}",
        "bucket_mib": bucket_mib,
        "buckets": checked.buckets,
        "plan_s": plan_s,
        "hf_mib": nbytes / MIB,
        "sync_s": median,
        "gather_s": statistics.median(r.gather_seconds for r in runs),
        "engine_s": statistics.median(r.push_seconds for r in runs),
        "memcpy_s": memcpy,
        "sync_over_memcpy": median / memcpy,
        "broadcast_floor_s": bcast,
        "allgather_floor_s": allgather,
        "engine_copy_in_s": copy_in,
        "probe_s": probed.verify_seconds,
        "full_verify_s": checked.verify_seconds,
        "probe_max_abs_dlogp": checked.probe_max_abs_diff,
        "peak_extra_mib": mem.extra / MIB,
    }


def _synced(fn):  # noqa: ANN001, ANN202
    """(result, wall seconds until the device finished): CUDA copies into the engine are
    asynchronous, so the sync's own clock can stop before they are done."""
    _device_sync()
    t0 = time.perf_counter()
    result = fn()
    _device_sync()
    return result, time.perf_counter() - t0


def _transport_floors(nbytes: int, world: int) -> tuple[float, float]:
    """The data movement of a sync (every rank ends with all the bytes) on flat buffers, 1/world
    of the bytes per rank: (each rank broadcasts its part, one all-gather of the parts)."""
    import torch
    import torch.distributed as dist

    part = torch.randn(nbytes // 4 // world)
    parts = [torch.empty_like(part) for _ in range(world)]

    def broadcasts():
        for src, buf in enumerate(parts):
            if src == dist.get_rank():
                buf.copy_(part)
            dist.broadcast(buf, src=src)

    return _time(broadcasts, REPEATS), _time(lambda: dist.all_gather(parts, part), REPEATS)


_ENV = {"OMP_NUM_THREADS": "1"}


def main() -> None:

    import torch

    from megatron_rpt.assets import smollm2_dir
    from megatron_rpt.testing.distributed import run_distributed

    p = FlagParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the first layout (TP=1 PP=1)")
    p.add_argument("--model", default="embedded:smollm2",
                   help="HF folder to sync (e.g. a random-init SmolLM2 where the asset is absent)")
    args = p.parse_args()
    if args.model == "embedded:smollm2":
        smollm2_dir()  # materialise the embedded model once, before the ranks start
    cuda = torch.cuda.is_available()
    setups = GPU_SETUPS if cuda else SETUPS
    rows = []
    for tp, pp, bucket_mib in setups[:1] if args.quick else setups:
        t0 = time.perf_counter()
        world = tp * pp
        ranks = run_distributed(_run, world, args=(tp, pp, bucket_mib, args.model), timeout=900, env=_ENV)
        row = ranks[0]
        row["peak_extra_mib_max_rank"] = max(r["peak_extra_mib"] for r in ranks)
        row["run_wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print_table([row])
    print()
    print_table(rows)
    write_result(
        "weight_sync_gpu" if cuda else "weight_sync",
        rows,
        model="SmolLM2-135M-Instruct (fp32)" if args.model == "embedded:smollm2" else args.model,
        engine="HFEngine on rank 0 (" + ("cuda:0" if cuda else "CPU") + ")",
        repeats=REPEATS,
    )


if __name__ == "__main__":
    main()
