"""Peak resident memory of one colocated RPT step with and without the memory hand-off (CPU).

Trainer and HF engine share one process (the CPU stand-in for a colocated GPU), both
SmolLM2-135M in fp32. A colocated step, as the training loop runs it::

    engine.release_memory()   train_step()   weight sync (engine resumes, loads)
    trainer.offload()         engine.generate()          trainer.reload()

* without the hand-off: ``rollout.offload_trainer='none'`` and an engine whose release keeps
  its weights (the CPU default), so trainer state and engine weights are resident together;
* with it: ``'optimizer'`` (Adam moments and gradients move to a spill file during rollout)
  and ``HFEngine(spill_dir=...)`` (the engine's weights move out during training).

Each variant runs in its own spawned process (glibc's mmap threshold lowered to 64 KiB so
freed tensors leave the resident set), does one warm-up step (Adam's state exists from then
on) and measures the peak RSS of the next step with a sampling thread. Both variants train on
the same batch; their losses must agree bitwise (checked), so the hand-off costs no accuracy.

Run: ``python bench/bench_colocated_memory.py`` (writes bench/results/colocated_memory.json);
``--quick``: 4 generated tokens instead of 16.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_weight_sync import _PeakRSS, _track_large_allocations  # noqa: E402
from bench.common import print_table, write_result  # noqa: E402
from megatron_rpt.cli import FlagParser  # noqa: E402

MIB = 2**20


def _variant(rank, world_size, handoff, spill, new_tokens):  # noqa: ANN001, ANN202 - run_distributed
    import gc

    import torch

    from megatron_rpt.assets import smollm2_dir
    from megatron_rpt.rollout.hf_engine import HFEngine
    from megatron_rpt.rollout.types import SamplingParams
    from megatron_rpt.trainer.offload import TrainerOffload
    from megatron_rpt.weight_sync import WeightSync, WeightSyncConfig
    from tests.helpers.training import build_policy_trainer, random_rollout_batch

    _track_large_allocations()
    torch.set_num_threads(2)
    path = str(smollm2_dir())
    step = build_policy_trainer(path)
    engine = HFEngine.from_pretrained(path, dtype="float32", device="cpu", spill_dir=spill if handoff else None)
    sync = WeightSync(step.built, step.groups, engine, WeightSyncConfig(verify="none"))
    offload = TrainerOffload.for_step(step, "optimizer" if handoff else "none", spill_dir=spill)
    vocab = step.built.arch.vocab_size
    batch = random_rollout_batch(vocab, shapes=((64, 32),) * 4)
    prompts = [list(range(100, 164)), list(range(200, 248))]

    def colocated_step(i: int) -> float:
        engine.release_memory()
        loss = step.train_step(batch).loss
        sync(version=i)
        offload.offload()
        engine.generate(prompts, SamplingParams(n=4, max_new_tokens=new_tokens, seed=i))
        offload.reload()
        return loss

    colocated_step(1)
    gc.collect()
    t0 = time.perf_counter()
    with _PeakRSS() as mem:
        loss = colocated_step(2)
    return {"peak_rss_MiB": mem.peak / MIB, "base_rss_MiB": mem.base / MIB,
            "step_s": time.perf_counter() - t0, "loss": loss}  # fmt: skip


def main() -> None:

    from megatron_rpt.testing.distributed import run_distributed

    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 generated tokens per sample")
    new_tokens = 4 if parser.parse_args().quick else 16

    rows = []
    with tempfile.TemporaryDirectory() as spill:
        for handoff in (False, True):
            result = run_distributed(_variant, 1, args=(handoff, spill, new_tokens), timeout=3600)[0]
            rows.append({"hand_off": handoff, **result})
    assert rows[0]["loss"] == rows[1]["loss"], rows  # the hand-off is bit-exact
    ratio = rows[1]["peak_rss_MiB"] / rows[0]["peak_rss_MiB"]
    print_table(rows)
    print(f"peak RSS of a colocated step, with / without the hand-off: {ratio:.2f}x")
    write_result("colocated_memory", rows, ratio_with_over_without=ratio)


if __name__ == "__main__":
    main()
