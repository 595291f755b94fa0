"""Measured CPU memory of one training step, for checking the planner (planning/memory.py).

Run in a fresh process per rank (``run_distributed``), with glibc told to serve every
allocation over 64 KiB by ``mmap`` (``mallopt``, which also stops glibc from raising that
threshold as it goes): freed tensors then leave the resident set at once. The resident
*anonymous* memory (``RssAnon``: heap and mmap'ed tensors, not the shared libraries' pages,
which the kernel drops and reloads under memory pressure) is sampled every millisecond by a
thread while the step runs (torch releases the GIL inside its kernels); its maximum is the
peak of live memory.

``measure_train_step`` records the resident set before the model is built, builds the
``PolicyTrainer``, runs one step (the optimizer allocates its state in its first ``step()``,
after that step's backward: a first step's peak is not a training run's), runs a second step
while sampling and returns ``peak - baseline``: parameters, gradient buffers, optimizer state,
activations and the loss's buffers of a steady-state step. It also returns what the planner needs to
estimate the same run: the largest micro-batch's tokens and response tokens, and the number of
micro-batches.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def mmap_large_allocations(threshold: int = 65536) -> None:
    """Serve allocations above ``threshold`` bytes by mmap (returned to the OS on free)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD):
        if libc.mallopt(param, threshold) != 1:
            raise RuntimeError(f"mallopt({param}, {threshold}) failed")


def proc_status_bytes(field: str) -> int:
    """``VmRSS`` / ``RssAnon`` / ... of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakSampler:
    """Context manager: the largest ``RssAnon`` seen every ``interval`` seconds inside it."""

    def __init__(self, interval: float = 0.001) -> None:
        import threading

        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status_bytes("RssAnon"))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status_bytes("RssAnon"))


def measure_train_step(
    rank: int,
    world_size: int,
    hf_dir: str,
    layout: dict[str, Any],
    batch: dict[str, Any],
) -> dict[str, int]:
    """Peak memory of one ``train_step`` on this rank (see the module docstring).

    ``layout``: ``build_policy_trainer`` keywords (tp, pp, sequence_parallel, recompute, dtype) plus
    ``distributed_optimizer``, ``budget`` (tokens per micro-batch) and ``micro_batch_layout``;
    ``batch``: ``random_group_batch`` keywords.
    """
    import torch

    from megatron_rpt.trainer.config import OptimizerConfig, TrainConfig
    from tests.helpers.training import build_policy_trainer, random_group_batch

    mmap_large_allocations()
    torch.set_num_threads(1)
    layout = dict(layout)
    opt = OptimizerConfig(lr=1e-4, use_distributed_optimizer=layout.pop("distributed_optimizer"))
    train = TrainConfig(
        max_tokens_per_microbatch=layout.pop("budget"),
        micro_batch_layout=layout.pop("micro_batch_layout"),
    )
    step_batch = random_group_batch(**batch)
    gc.collect()
    baseline = proc_status_bytes("RssAnon")
    ts = build_policy_trainer(hf_dir, optimizer=opt, train=train, **layout)
    _, micro_batches = ts._micro_batches(step_batch)
    ts.train_step(step_batch)
    gc.collect()
    with PeakSampler() as sampler:
        ts.train_step(step_batch)
    peak = sampler.peak
    largest = max(micro_batches, key=lambda mb: mb.tokens.numel())
    return {
        "measured": peak - baseline,
        "microbatch_tokens": int(largest.tokens.numel()),
        "response_tokens": max(int(mb.labels_T.numel()) for mb in micro_batches),
        "microbatches": len(micro_batches),
        "padded_vocab": int(ts.built.vocab.padded),
        "dp": int(ts.groups.dp_size),
        "pp_rank": int(ts.groups.pp_rank),
    }


__all__ = ["PeakSampler", "measure_train_step", "mmap_large_allocations", "proc_status_bytes"]
