r"""Recipes for ``train.objective=rlp``: RLP's information-gain reward (arXiv 2510.01265).

    bash examples/pretrain_rpt.sh --recipe examples/rlp/config.py:smollm2_cpu_rlp   # CPU
    bash examples/pretrain_rpt.sh --recipe examples/rlp/config.py:tiny_rlp          # seconds
    bash examples/pretrain_rpt.sh --recipe examples/rlp/config.py:rlp \
        --set model.hf_path=/path/to/base-model                                     # RLP's recipe

``rlp``: RLP's published recipe on the default config (``apply_rlp_recipe``): G = 16 thoughts
at temperature 0.7, thoughts of up to 2,048 tokens, constant lr 1e-6, KL 0, contexts of up to
2,048 tokens, one random target position per document, RLP's continuation-and-reasoning
prompt, the thought-length-normalised clipped surrogate, EMA teacher tau = 0.999.

``smollm2_cpu_rlp``: that recipe scaled down the way ``smollm2_cpu`` scales RPT's: the embedded
SmolLM2-135M-Instruct on 20 CHAMP documents, 16 contexts x 4 thoughts of at most 32 tokens,
12 steps, contexts of at most 256 tokens, fp32, HF engine.

``tiny_rlp``: the synthetic task of ``examples/tiny`` (a 2-layer model that knows which word
follows which). Changed for it: 20 steps, lr 1e-3 with a 5-step warm-up, tau 0.9 (the teacher
must follow a policy that moves in 20 steps, not thousands), G = 8, thoughts of at most 6
tokens, and the whole response is the thought (``rlp.thought_close=""``: the model has never
seen RLP's prompt and does not close ``</think>``). What it shows, measured: the warmed-up
model predicts the next word from the context almost surely (teacher log-prob -0.02), so no
thought can add much; its first thoughts are noise that hides the context (information gain
about -6.3 nats), and RLP teaches it thoughts that hurt less: the mean reward rises to about
-3 in 20 steps while the teacher's log-prob stays near -0.03 (the policy's next-token ability
is kept).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from megatron_rpt.config import RPTConfig
from megatron_rpt.trainer.rlp_config import apply_rlp_recipe

_EXAMPLES = Path(__file__).resolve().parents[1]


def _recipe(name: str) -> RPTConfig:
    """``examples/<name>/config.py:<name>()``."""
    spec = importlib.util.spec_from_file_location(f"_rlp_base_{name}", _EXAMPLES / name / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)()


def rlp() -> RPTConfig:
    """RLP's recipe on the default config (set model.hf_path and data.corpus)."""
    cfg = apply_rlp_recipe(RPTConfig())
    cfg.run.run_dir, cfg.run.name = "runs/rlp", "rlp"
    return cfg


def smollm2_cpu_rlp() -> RPTConfig:
    """The embedded default with RLP, scaled for one 2-core CPU."""
    cfg = apply_rlp_recipe(_recipe("smollm2_cpu"))
    cfg.run.run_dir, cfg.run.name = "runs/smollm2_cpu_rlp", "smollm2_cpu_rlp"
    cfg.data.prepared_dir = "runs/data/champ-20-rlp"  # one random position per document
    cfg.data.context_tokens = 256
    cfg.rollout.n_samples, cfg.rollout.max_new_tokens = 4, 32
    # Pinned here, not inherited: the RPT demo's batch and evaluation settings are tuned for
    # completion-mode RPT and move with it.
    cfg.train.steps, cfg.train.contexts_per_step = 12, 16
    cfg.eval.temperature, cfg.eval.context_tokens = 0.8, 64
    return cfg


def tiny_rlp() -> RPTConfig:
    """The synthetic task with RLP (see the module docstring for what differs)."""
    cfg = apply_rlp_recipe(_recipe("tiny"))
    cfg.run.run_dir, cfg.run.name = "runs/tiny_rlp", "tiny_rlp"
    cfg.data.prepared_dir, cfg.data.context_tokens = "runs/tiny/data-rlp", 8
    cfg.prompt.chat_template = False  # the tiny tokenizer has no chat template
    cfg.train.steps = 20
    cfg.rollout.n_samples, cfg.rollout.max_new_tokens = 8, 6
    cfg.rlp.ema_decay, cfg.rlp.thought_close = 0.9, ""
    o = cfg.optimizer
    o.lr, o.lr_warmup_steps, o.weight_decay = 1e-3, 5, 0.0
    return cfg
