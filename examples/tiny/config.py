"""Recipe ``tiny``: a few-second RPT run on a synthetic task (tests, smoke checks, laptops).

    bash examples/pretrain_rpt.sh --recipe examples/tiny/config.py:tiny

The task (task.py, beside this file): six words that always follow each other in a
fixed cycle, a byte-level BPE tokenizer trained on them, and a 2-layer, 64-wide Llama warmed
up on the plain text and on answering in the RPT format with a *random* word. Its reward
starts at chance (about 1/6) and rises as RPT learns to box the word that comes next (0.5-0.7
after the 30 steps with run.seed=1 or 2, slower with the default seed 1234; about 30 s on 2
CPU cores). The task is built on first use into
``$MEGATRON_RPT_TINY_ASSETS`` (default ``runs/tiny/assets``, about 10 s).

Not the paper's settings where a tiny model needs otherwise: lr 3e-3 with a 5-step warm-up
(paper: 1e-6 constant), 16 contexts per step (paper: 256), no weight decay.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from megatron_rpt.config import RPTConfig


def _task_module():  # noqa: ANN202 - the module object of task.py
    """task.py next to this file, loaded by path (a recipe file is not inside a package)."""
    name = "_rpt_tiny_task"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("task.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # registered first: its dataclass looks its module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def tiny() -> RPTConfig:
    """The synthetic task, HF engine on CPU, fp32, 16 contexts x 8 samples, 30 steps."""
    assets = os.environ.get("MEGATRON_RPT_TINY_ASSETS", "runs/tiny/assets")
    task = _task_module().build_synthetic_task(assets)
    cfg = RPTConfig()
    cfg.run.run_dir, cfg.run.name = "runs/tiny", "tiny"
    cfg.model.hf_path, cfg.model.dtype, cfg.model.spec = str(task.model_dir), "fp32", "local"
    d = cfg.data
    d.corpus, d.prepared_dir = str(task.corpus), "runs/tiny/data"
    d.entropy_threshold = 0.0  # every position: the successor map is what is learned
    d.min_context_tokens, d.context_tokens, d.continuation_tokens = 4, 8, 4
    d.validation_fraction = 0.1
    d.entropy_window_tokens, d.entropy_window_overlap, d.entropy_batch_tokens = 256, 32, 2048
    d.entropy_device = "cpu"
    cfg.prompt.chat_template = False  # the tiny tokenizer has no chat template
    r = cfg.rollout
    r.device, r.max_new_tokens, r.stop_at_final_box = "cpu", 12, True
    cfg.train.steps, cfg.train.contexts_per_step = 30, 16
    cfg.train.max_tokens_per_microbatch = 8192
    o = cfg.optimizer
    o.lr, o.lr_warmup_steps, o.weight_decay = 3e-3, 5, 0.0
    cfg.checkpoint.interval, cfg.checkpoint.keep_last = 10, 2
    cfg.checkpoint.export_hf_at_end = True
    cfg.weight_sync.probe_tolerance = 1e-3  # fp32 on both sides
    return cfg
