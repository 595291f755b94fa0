"""Training checkpoints: model, optimizer, LR schedule, RNG states, step and loop state.

Layout (checkpoint/discovery.py's checkpoint plus the trainer's entries)::

    <run>/checkpoints/
      latest                   name of the newest complete checkpoint (written atomically, last)
      step_0000100/
        model/                 dist_checkpointing (torch_dist) of the model: any TP/PP/DP
        hf/                    config.json + tokenizer of the source model (HF export works)
        optimizer/             dist_checkpointing of the Megatron optimizer's sharded state
        rng/rank_00000.pt      per-rank python/numpy/torch/CUDA + Megatron tracker RNG states
        trainer_state.json     step, LR-scheduler state, layout, optimizer format, ``extra``
        metadata.json          a directory without it is not a checkpoint
        manifest.json          written last: size + CRC-32 of every file, verified on load

**Atomicity.** Everything is written into a hidden ``.step_0000100.tmp-<pid>`` directory that
rank 0 renames into place only after every rank reported success; ``latest`` is replaced
atomically afterwards; older checkpoints beyond ``keep_last`` are deleted last. A crash at any
point leaves the previous checkpoint complete and ``latest`` naming it (or naming the new one
once the rename happened); hidden temporary directories are never taken for checkpoints and
are removed by the next save.

**Resume** (``load_training_checkpoint``): model weights at any TP/PP/DP (dist_checkpointing
reshards them); then the optimizer's main params are refreshed from the model; optimizer state
with ``dp_reshardable`` at the same TP/PP and any DP size, with ``fully_reshardable`` at any
TP/PP/DP; the LR scheduler; the step; RNG states when the world size is unchanged (they are
per rank; otherwise a warning and the current seeds stay). On CPU / torch-Adam the
DistributedOptimizer needs the 'optckpt' patch (megatron_rpt/patches) for an exact resume.

``extra`` is an opaque JSON-serialisable dict the loop passes (data-sampler position, ...),
returned unchanged by ``load_training_checkpoint``. ``writers`` add the loop's own files to the
checkpoint before it is published (RLP's EMA teacher); ``TrainerState.root`` says where a
resumed checkpoint lies, for their readers.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_rpt import patches
from megatron_rpt.checkpoint.discovery import (
    LATEST_FILE,
    STATE_FILE,
    find_checkpoint,
    is_checkpoint,
)
from megatron_rpt.checkpoint.io import (
    load_checkpoint,
    metadata_for,
    model_sharded_state_dict,
    save_checkpoint,
)
from megatron_rpt.errors import CheckpointError
from megatron_rpt.fileio import atomic_write_json, atomic_write_text
from megatron_rpt.model.manifest import verify_checkpoint
from megatron_rpt.model.safe_load import (
    LOAD_ERRORS,
    check_dcp_metadata,
    failure_message,
    load_tensor_file,
    safe_byte_entries,
)
from megatron_rpt.trainer.config import CheckpointConfig
from megatron_rpt.trainer.step import PolicyTrainer

logger = logging.getLogger(__name__)

OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"
STATE_FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """What a training checkpoint restores besides tensors."""

    step: int
    extra: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None
    """The checkpoint directory it was loaded from (None: a fresh run)."""


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimizer steps.

    >>> checkpoint_name(42)
    'step_0000042'
    """
    return f"step_{step:07d}"


def is_save_step(step: int, cfg: CheckpointConfig, total_steps: int) -> bool:
    """Save after this step? Every ``interval`` steps and at the end of the run.

    >>> cfg = CheckpointConfig(interval=10)
    >>> [s for s in range(1, 26) if is_save_step(s, cfg, 25)]
    [10, 20, 25]
    """
    return step == total_steps or (cfg.interval > 0 and step % cfg.interval == 0)


# ----------------------------------------------------------------------------- save


def save_training_checkpoint(
    trainer: PolicyTrainer,
    checkpoints_dir: str | Path,
    cfg: CheckpointConfig,
    *,
    extra: dict[str, Any] | None = None,
    writers: Sequence[Callable[[Path], None]] = (),
) -> Path:
    """Write ``<checkpoints_dir>/step_NNNNNNN`` atomically, update ``latest``, prune (collective).

    ``writers`` are called on every rank with the (temporary) checkpoint directory.
    """
    checkpoints_dir = Path(checkpoints_dir)
    extra = dict(extra or {})
    json.dumps(extra)  # fail before any I/O if the loop's state is not serialisable
    trainer.finish_param_sync()
    path = checkpoints_dir / checkpoint_name(trainer.step)
    rank = dist.get_rank()
    if rank == 0:
        _remove_stale_temporaries(checkpoints_dir)
    built, groups = trainer.built, trainer.groups
    metadata = metadata_for(built, groups, source=str(built.hf_dir or "trainer"))

    def write_trainer_entries(tmp: Path) -> None:
        if cfg.save_optimizer:
            _save_optimizer(trainer, tmp / OPTIMIZER_DIR, cfg.optimizer_sharding)
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / RNG_DIR / f"rank_{rank:05d}.pt")
        if rank == 0:
            atomic_write_json(tmp / STATE_FILE, _trainer_state(trainer, cfg, extra))
        for write in writers:
            write(tmp)

    save_checkpoint(
        trainer.model_modules,
        path,
        metadata,
        hf_source=built.hf_dir,
        overwrite=True,
        extra_writer=write_trainer_entries,
    )
    if rank == 0:
        atomic_write_text(checkpoints_dir / LATEST_FILE, path.name + "\n")
        prune_checkpoints(checkpoints_dir, cfg.keep_last, keep=path)
    dist.barrier()
    logger.info("saved training checkpoint %s (step %d)", path, trainer.step)
    return path


def _save_optimizer(trainer: PolicyTrainer, out: Path, sharding: str) -> None:
    from megatron.core import dist_checkpointing

    model_sd = model_sharded_state_dict(trainer.model_modules)
    out.mkdir(exist_ok=True)
    with patches.optimizer_mode():
        optim_sd = trainer.optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata={"distrib_optim_sharding_type": sharding}
        )
        dist_checkpointing.save(optim_sd, str(out))


def _trainer_state(trainer: PolicyTrainer, cfg: CheckpointConfig, extra: dict) -> dict[str, Any]:
    g = trainer.groups
    return {
        "format_version": STATE_FORMAT_VERSION,
        "step": trainer.step,
        "scheduler": trainer.scheduler.state_dict(),
        "optimizer": {
            "saved": cfg.save_optimizer,
            "sharding": cfg.optimizer_sharding,
            "distributed": trainer.opt_cfg.use_distributed_optimizer,
            "name": trainer.opt_cfg.optimizer,
        },
        "layout": {
            "world_size": dist.get_world_size(),
            "tp": g.tp_size,
            "pp": g.pp_size,
            "vpp": g.vpp_size,
            "dp": g.dp_size,
        },
        "extra": extra,
    }


def prune_checkpoints(
    checkpoints_dir: Path, keep_last: int, *, keep: Path | None = None
) -> list[Path]:
    """Delete complete ``step_*`` checkpoints beyond the newest ``keep_last`` (0: keep all)."""
    if keep_last <= 0:
        return []
    found = sorted(
        (int(m.group(1)), p)
        for p in checkpoints_dir.iterdir()
        if (m := _NAME.match(p.name)) and is_checkpoint(p)
    )
    doomed = [p for _, p in found[:-keep_last] if p != keep]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
        logger.info("removed old checkpoint %s (checkpoint.keep_last=%d)", p, keep_last)
    return doomed


def _remove_stale_temporaries(checkpoints_dir: Path) -> None:
    """Hidden leftovers of saves that crashed (never complete checkpoints)."""
    if not checkpoints_dir.is_dir():
        return
    for p in checkpoints_dir.glob(".step_*.tmp-*"):
        if _pid_alive(p.name.rpartition("-")[2]):
            continue  # a save in progress (the run-dir lock keeps other runs out)
        logger.warning("removing %s, left by an interrupted checkpoint save", p)
        shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid_text: str) -> bool:
    """Is the process named in a temporary directory's suffix alive (and not us)?"""
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


# ----------------------------------------------------------------------------- load


def load_training_checkpoint(
    trainer: PolicyTrainer, path: str | Path, *, load_optimizer: bool = True
) -> TrainerState:
    """Restore weights, optimizer, scheduler, RNG and step from a training checkpoint.

    ``path``: a checkpoint or a run's checkpoints dir (its ``latest``). Collective.
    """
    ckpt = find_checkpoint(path)
    verify_checkpoint(ckpt.root)
    state = _read_state(ckpt.root)
    load_checkpoint(trainer.model_modules, ckpt, verify=False)
    # Float16/Distributed optimizers keep fp32 main params: refresh them from the new weights
    # (overwritten again below when the optimizer state is loaded).
    trainer.optimizer.reload_model_params()
    if load_optimizer:
        _load_optimizer(trainer, ckpt.root, state)
    _load_scheduler(trainer, state["scheduler"], ckpt.root)
    trainer.step = int(state["step"])
    _load_rng(ckpt.root, state)
    logger.info("resumed from %s at step %d", ckpt.root, trainer.step)
    return TrainerState(step=trainer.step, extra=dict(state.get("extra", {})), root=ckpt.root)


def _read_state(root: Path) -> dict[str, Any]:
    path = root / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a training checkpoint ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training checkpoint (not a JSON object)")
    if state.get("format_version", 0) > STATE_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {state['format_version']} is too new")
    step, named = state.get("step"), _NAME.match(root.name)
    if not isinstance(step, int) or step < 0 or (named and int(named.group(1)) != step):
        raise CheckpointError(
            f"{path}: step {step!r} is not a non-negative integer matching the directory name"
        )
    return state


def _load_optimizer(trainer: PolicyTrainer, root: Path, state: dict[str, Any]) -> None:
    from megatron.core import dist_checkpointing

    saved = state["optimizer"]
    if not saved["saved"]:
        raise CheckpointError(
            f"{root}: saved without optimizer state (checkpoint.save_optimizer=false); "
            "load it with load_optimizer=False"
        )
    if saved["distributed"] != trainer.opt_cfg.use_distributed_optimizer or (
        saved["name"] != trainer.opt_cfg.optimizer
    ):
        raise CheckpointError(
            f"{root}: optimizer state is {saved['name']} (distributed={saved['distributed']}); "
            f"optimizer.optimizer / optimizer.use_distributed_optimizer must match"
        )
    _check_optimizer_layout(trainer, root, state)
    check_dcp_metadata(root / OPTIMIZER_DIR)
    model_sd = model_sharded_state_dict(trainer.model_modules)
    with patches.optimizer_mode():
        sharded = trainer.optimizer.sharded_state_dict(
            model_sd,
            is_loading=True,
            metadata={"distrib_optim_sharding_type": saved["sharding"]},
        )
        try:
            with safe_byte_entries():
                loaded = dist_checkpointing.load(sharded, str(root / OPTIMIZER_DIR))
        except LOAD_ERRORS as exc:
            raise CheckpointError(
                f"{root / OPTIMIZER_DIR}: cannot load optimizer: {failure_message(exc)}"
            ) from None
        # fp32 main params can be views of parameters that require grad.
        with torch.no_grad():
            trainer.optimizer.load_state_dict(loaded)


def _check_optimizer_layout(trainer: PolicyTrainer, root: Path, state: dict[str, Any]) -> None:
    layout, g = state["layout"], trainer.groups
    same_mp = (layout["tp"], layout["pp"], layout["vpp"]) == (g.tp_size, g.pp_size, g.vpp_size)
    needs_same_mp = not trainer.opt_cfg.use_distributed_optimizer or (
        state["optimizer"]["sharding"] == "dp_reshardable"
    )
    if needs_same_mp and not same_mp:
        raise CheckpointError(
            f"{root}: optimizer state saved at TP={layout['tp']} PP={layout['pp']} "
            f"VPP={layout['vpp']} loads only at the same model-parallel layout (now TP="
            f"{g.tp_size} PP={g.pp_size} VPP={g.vpp_size}); use "
            "checkpoint.optimizer_sharding=fully_reshardable when saving, or load the "
            "weights only"
        )


def _load_scheduler(trainer: PolicyTrainer, saved: dict[str, Any], root: Path) -> None:
    current = trainer.scheduler.state_dict()
    keys = ["max_lr", "min_lr", "lr_warmup_steps", "lr_decay_style", "start_wd", "end_wd"]
    if current["lr_decay_style"] != "constant":
        keys.append("lr_decay_steps")  # the decay length (train.steps) shapes the schedule
    changed = [k for k in keys if saved.get(k) != current[k]]
    if changed:
        raise CheckpointError(
            f"{root}: the LR schedule differs from the checkpoint's in {changed} "
            f"(saved {[saved[k] for k in changed]}, configured {[current[k] for k in changed]})"
        )
    trainer.scheduler.load_state_dict(saved)


# ----------------------------------------------------------------------------- RNG


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "megatron_tracker": dict(tensor_parallel.get_cuda_rng_tracker().get_states()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _load_rng(root: Path, state: dict[str, Any]) -> None:
    saved_world = state["layout"]["world_size"]
    if saved_world != dist.get_world_size():
        logger.warning(
            "%s: RNG states were saved by %d ranks, now %d: keeping the current seeds",
            root,
            saved_world,
            dist.get_world_size(),
        )
        return
    path = root / RNG_DIR / f"rank_{dist.get_rank():05d}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing RNG state of this rank")
    rng = load_tensor_file(path)
    try:
        _set_rng(rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid RNG state ({exc})") from None


def _set_rng(rng: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    version, keys, gauss = rng["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, keys_np, *rest = rng["numpy"]
    np.random.set_state((kind, keys_np.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rng["megatron_tracker"]:
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["megatron_tracker"])


__all__ = [
    "TrainerState",
    "checkpoint_name",
    "is_save_step",
    "load_training_checkpoint",
    "prune_checkpoints",
    "save_training_checkpoint",
]
