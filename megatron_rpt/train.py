"""``python -m megatron_rpt.train``: RPT pretraining (or the NTP control) from a recipe.

    python -m megatron_rpt.train --recipe examples/smollm2_cpu/config.py:smollm2_cpu \\
        --set train.steps=2 [--config run.yaml] [--resume auto|none|PATH] [--init-from DIR]
    torchrun --nproc-per-node 8 -m megatron_rpt.train --recipe ...   (or examples/pretrain_rpt.sh)

Order of work: build the config (``config.build_config``: defaults -> recipe -> YAML -> --set
-> --init-from -> validate) and settle its derived values (``config.resolve``, logged), check
the model, parallel layout, batch, engine and corpus (``preflight``; a mistake fails
here with one line naming the setting, before anything heavy), on GPUs check
that the trainer and the colocated engine fit in memory (``preflight.check_memory``), start
torch.distributed (torchrun's environment, NCCL on GPUs, gloo on CPU; a single process
without torchrun), prepare the data on rank 0 if ``data.prepared_dir`` is missing or was made
with other settings, train (``trainer.loop``; the resolved config is written to ``<run_dir>/config.yaml`` once a
resume's checks passed), and export the final checkpoint as HF with ``checkpoint.export_hf_at_end``.

``--resume auto`` (the default) continues from the newest complete checkpoint in
``<run_dir>/checkpoints`` when there is one (else from ``checkpoint.load`` if set), so running
the same command again after a crash resumes it. ``--resume none`` refuses a run directory
that already has checkpoints. ``--init-from`` starts from an HF directory (converted on the
fly) or a Megatron checkpoint (a megatron_rpt checkpoint, a run's checkpoints dir, or a
Megatron-LM torch_dist directory; its architecture then comes from ``model.hf_path``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_rpt import preflight
from megatron_rpt.checkpoint import discovery
from megatron_rpt.cli import FlagParser
from megatron_rpt.config_utils import format_description
from megatron_rpt.dir_lock import run_dir_lock

if TYPE_CHECKING:
    from megatron_rpt.config import RPTConfig
    from megatron_rpt.distributed import ParallelGroups
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.trainer.engine_guard import EngineFactory
    from megatron_rpt.trainer.loop import PhaseHook

logger = logging.getLogger("megatron_rpt.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The entry point's command line."""
    parser = FlagParser(prog="python -m megatron_rpt.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", help="recipe function: module:function or file.py:function")
    parser.add_argument("--config", help="YAML file with config values (after the recipe)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="dotted config override, e.g. train.steps=2 (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--resume", default="auto", metavar="auto|none|PATH",
        help="continue from the run's latest checkpoint (auto, default), never (none), or PATH",
    )  # fmt: skip
    parser.add_argument(
        "--init-from", metavar="HF_DIR|MEGATRON_CKPT",
        help="initial weights: an HF model directory or a Megatron checkpoint",
    )  # fmt: skip
    parser.add_argument(
        "--help-config", action="store_true", help="list every config key with its value and doc"
    )
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace, *, check: bool = True) -> RPTConfig:
    """``config.build_config`` over the command line (recipe, --config, --set, --init-from)."""
    from megatron_rpt.config import build_config

    return build_config(args.recipe, args.set, args.config, init_from=args.init_from, check=check)


def process_group_timeout(r: RolloutConfig) -> timedelta:
    """Ranks wait in a collective while rank 0 generates (and restarts a failed engine)."""
    return timedelta(seconds=max(1800.0, (r.timeout_s + 600.0) * (r.max_restarts + 1)))


@contextlib.contextmanager
def model_parallel(cfg: RPTConfig) -> Iterator[ParallelGroups]:
    """The world process group (``distributed.world_process_group``) + Megatron's groups."""
    from megatron_rpt.distributed import (
        destroy_model_parallel,
        initialize_model_parallel,
        seed_model_parallel,
        world_process_group,
    )

    with world_process_group(process_group_timeout(cfg.rollout)):
        try:
            p = cfg.parallel
            cp = (
                {"context_parallel_size": p.context_parallel_size}
                if p.context_parallel_size > 1
                else {}
            )
            groups = initialize_model_parallel(
                p.tensor_model_parallel_size,
                p.pipeline_model_parallel_size,
                p.virtual_pipeline_model_parallel_size,
                **cp,
            )
            seed_model_parallel(cfg.run.seed, groups)
            yield groups
        finally:
            with contextlib.suppress(Exception):
                destroy_model_parallel()


def main(
    argv: list[str] | None = None,
    *,
    engine_factory: EngineFactory | None = None,
    on_phase: PhaseHook | None = None,
) -> int:
    """Entry point (see the module docstring).

    ``engine_factory`` and ``on_phase`` go to ``trainer.loop.run_training`` (embedding the
    entry point: a custom engine, a callback at fixed points of every step).
    """
    args = parse_args(argv)
    if args.help_config:
        sys.stdout.write(format_description(config_from_args(args, check=False)) + "\n")
        return 0
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    from megatron_rpt.config import resolve

    cfg = resolve(config_from_args(args))  # derived values settled once, logged
    hf_dir = preflight.check_run(cfg, world)
    preflight.check_memory(cfg, hf_dir, world)  # GPU only: before any model is built
    with _run_dir_lock(cfg, rank):
        resume = discovery.resolve_resume(args.resume, cfg.run.run_dir, cfg.checkpoint.load)
        cfg.checkpoint.load = None if resume is None else str(resume)
        done = resume is not None and discovery.checkpoint_step(resume) >= cfg.train.steps
        final = resume if done else None
        with model_parallel(cfg) as groups:
            if not done:
                final = _train(cfg, groups, hf_dir, resume, engine_factory, on_phase)
        if rank == 0:
            if done:
                logger.info("%s already completed train.steps=%d", resume, cfg.train.steps)
            _finish(cfg, final)
    return 0


def _run_dir_lock(cfg: RPTConfig, rank: int) -> contextlib.AbstractContextManager:
    """Rank 0 holds ``<run_dir>/.lock`` for the whole run: one writer per run directory."""
    return run_dir_lock(cfg.run.run_dir) if rank == 0 else contextlib.nullcontext()


def _train(
    cfg: RPTConfig,
    groups: ParallelGroups,
    hf_dir: Path,
    resume: Path | None,
    engine_factory: EngineFactory | None,
    on_phase: PhaseHook | None,
) -> Path | None:
    import torch.distributed as dist

    from megatron_rpt.trainer.loop import run_training

    if dist.get_rank() == 0:
        Path(cfg.run.run_dir).mkdir(parents=True, exist_ok=True)
        # config.yaml is written by the run logger once a resume's checks passed.
        preflight.ensure_prepared(cfg.data, hf_dir)
        logger.info(
            "run %s: %s",
            cfg.run.run_dir,
            "resuming from " + str(resume) if resume else "fresh start",
        )
    dist.barrier()
    result = run_training(
        cfg, groups, resume=resume, engine_factory=engine_factory, on_phase=on_phase
    )
    dist.barrier()
    return result.checkpoint or resume


def _finish(cfg: RPTConfig, checkpoint: Path | None) -> None:
    """HF export (when configured) and a summary of what the run left (rank 0)."""
    import torch.distributed as dist

    run_dir = Path(cfg.run.run_dir)
    if cfg.checkpoint.export_hf_at_end and checkpoint is not None:
        if dist.is_initialized() and dist.get_world_size() > 1:  # a caller's group is still up
            logger.warning(
                "not exporting inside a %d-process group; run: python "
                "tools/convert_megatron_to_hf.py --megatron-dir %s --out-dir %s",
                dist.get_world_size(), checkpoint, run_dir / "hf",
            )  # fmt: skip
        else:
            from megatron_rpt.checkpoint.megatron_to_hf import convert_megatron_to_hf

            out = convert_megatron_to_hf(checkpoint, run_dir / "hf", overwrite=True)
            logger.info("exported %s as an HF model: %s", checkpoint.name, out)
    plot = "loss.png" if cfg.train.objective == "ntp" else "reward_accuracy.png"
    left = [
        ("checkpoint", checkpoint),
        ("metrics", run_dir / "metrics.jsonl"),
        ("plot", run_dir / "plots" / plot),
        ("wandb", run_dir / "wandb"),
        ("HF export", run_dir / "hf"),
    ]
    lines = [
        f"  {name:<10} {path}" for name, path in left if path is not None and Path(path).exists()
    ]
    logger.info("run finished; %s holds:\n%s", run_dir, "\n".join(lines))
    if cfg.train.objective != "ntp":
        from megatron_rpt.trainer.run_logger import read_metrics, reward_trend

        trend = reward_trend(read_metrics(run_dir))
        if trend is not None:
            logger.info("%s", trend)


if __name__ == "__main__":
    from megatron_rpt.cli import run_cli

    run_cli(main)
