"""Run a function on N local CPU processes joined by a gloo process group, with a hard timeout.

Distributed tests call ``run_distributed(fn, world_size=2, ...)`` from an ordinary pytest test.
Each rank runs ``fn(rank, world_size, *args)`` after ``torch.distributed.init_process_group``
(gloo, loopback) and sends its return value back; the parent returns the list of per-rank
results. A rank that raises makes the call raise with every failed rank's traceback; a rank
that hangs (e.g. its peer died inside a collective) is killed at ``timeout`` and the call
raises ``TimeoutError``. Nothing is left running.

``fn`` must be a module-level function. It is found in the child by the file it was defined in,
so it works for test files collected with pytest's importlib mode.
"""

from __future__ import annotations

import importlib.util
import inspect
import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

_DEFAULT_TIMEOUT_S = 300.0


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_function(file: str, qualname: str, module_name: str) -> Callable[..., Any]:
    if module_name in sys.modules and getattr(sys.modules[module_name], "__file__", None) == file:
        mod = sys.modules[module_name]
    else:
        try:
            mod = importlib.import_module(module_name)
            if os.path.abspath(getattr(mod, "__file__", "")) != os.path.abspath(file):
                raise ImportError
        except Exception:  # noqa: BLE001 - fall back to loading by path
            spec = importlib.util.spec_from_file_location(f"_rpt_dist_{abs(hash(file))}", file)
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _child(
    rank: int,
    world_size: int,
    port: int,
    target: tuple[str, str, str],
    args: tuple,
    env: dict[str, str],
    pg_timeout_s: float,
    results: Any,
    backend: str = "gloo",
) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s)
        )
        fn = _load_function(*target)
        value = fn(rank, world_size, *args)
        # Plain pickle, by value: the queue's torch reductions would pass tensors as shared
        # memory handles that die with this process before the parent reads them.
        results.put((rank, "ok", pickle.dumps(value)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        results.put((rank, "error", traceback.format_exc()))
        sys.exit(1)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    args: Sequence[Any] = (),
    timeout: float = _DEFAULT_TIMEOUT_S,
    env: dict[str, str] | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    Args:
        fn: a module-level function; its return value must be picklable (tensors are fine).
        world_size: number of processes (2-4 on a 2-core machine is fine).
        args: extra positional arguments, pickled to every rank.
        timeout: seconds for the whole run; on expiry every rank is killed and TimeoutError
            names the ranks that had not finished.
        env: extra environment variables for the ranks (OMP_NUM_THREADS defaults to 1 and
            CUDA_VISIBLE_DEVICES to empty, so CPU tests never touch a GPU).
        backend: 'gloo', or 'nccl' for GPU tests (rank r uses GPU r; set CUDA_VISIBLE_DEVICES
            in ``env``).
    """
    file = inspect.getsourcefile(fn)
    assert file is not None, f"cannot locate the source file of {fn!r}"
    target = (os.path.abspath(file), fn.__qualname__, fn.__module__)
    child_env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    child_env.update(env or {})
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # The process group times out a little before the outer deadline, so a rank stuck in a
    # collective usually raises (with a traceback) before we have to kill it.
    pg_timeout = max(10.0, timeout * 0.8)
    procs = [
        ctx.Process(
            target=_child,
            args=(
                r, world_size, port, target, tuple(args), child_env, pg_timeout, results, backend
            ),
            # Not daemonic: ranks may start processes themselves (Megatron's dist_checkpointing
            # save does); stragglers are killed in the `finally` below.
            daemon=False,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    outcome: dict[int, tuple[str, Any]] = {}
    try:
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcome))
                raise TimeoutError(
                    f"distributed run of {fn.__qualname__} timed out after {timeout:.0f}s; "
                    f"ranks {missing} did not finish"
                    + _format_errors(outcome)
                )
            try:
                rank, status, value = results.get(timeout=min(1.0, remaining))
                outcome[rank] = (status, _unpickle(status, value))
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs)
                    if r not in outcome and not p.is_alive() and p.exitcode not in (0, None)
                ]
                if dead:
                    # Give a moment for a queued traceback to arrive before declaring a crash.
                    time.sleep(0.5)
                    while True:
                        try:
                            rank, status, value = results.get_nowait()
                            outcome[rank] = (status, _unpickle(status, value))
                        except queue.Empty:
                            break
                    for r in dead:
                        outcome.setdefault(
                            r, ("error", f"rank {r} died with exit code {procs[r].exitcode}")
                        )
            if any(s == "error" for s, _ in outcome.values()):
                # One failure is enough: peers may be stuck waiting for the failed rank.
                grace = time.monotonic() + 5.0
                while len(outcome) < world_size and time.monotonic() < grace:
                    try:
                        rank, status, value = results.get(timeout=0.5)
                        outcome[rank] = (status, _unpickle(status, value))
                    except queue.Empty:
                        pass
                failed = sorted(r for r, (s, _) in outcome.items() if s == "error")
                missing = sorted(set(range(world_size)) - set(outcome))
                raise RuntimeError(
                    f"distributed run of {fn.__qualname__} failed on ranks {failed}"
                    + (f"; ranks {missing} did not finish" if missing else "")
                    + _format_errors(outcome)
                )
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        return [outcome[r][1] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def _unpickle(status: str, value: Any) -> Any:
    return pickle.loads(value) if status == "ok" else value


def _format_errors(outcome: dict[int, tuple[str, Any]]) -> str:
    parts = [
        f"\n--- rank {r} ---\n{value}"
        for r, (status, value) in sorted(outcome.items())
        if status == "error"
    ]
    return "".join(parts)
