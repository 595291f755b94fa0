r"""Recipe ``smollm2_cpu``: the embedded default, RPT on SmolLM2-135M-Instruct + CHAMP.

    bash examples/pretrain_rpt.sh          # what `make demo` runs (this recipe is the default)

Everything is shipped with the package (no download): the policy, its tokenizer and the
entropy proxy are SmolLM2-135M-Instruct, the corpus is the CHAMP competition-math problems
with their solutions. On a 2-core CPU it prepares 20 documents, trains 4 steps of 2 contexts
x 8 samples with the HF engine, and leaves a checkpoint, metrics (JSONL + wandb offline), the
reward/accuracy plot and an HF export in runs/smollm2_cpu (measured: `make demo` from a
fresh clone 3.7 min including the venv install; the run itself about 2.5 min). On a machine with
a GPU and SGLang it uses SGLang (colocated) and Transformer Engine layers in bf16 instead.

The paper's recipe where it matters: template v0 in the chat template, G = 8, temperature 0.8,
lr 1e-6 constant, no KL, no entropy bonus, the prefix-match reward after ``</think>``, GRPO,
dynamic sampling from step 500 (never reached here). Scaled down or changed for a 135M model
on one CPU:

* 2 contexts per step (paper 256), 4 steps (paper 1000), 20 documents, contexts of at most
  256 tokens (paper ~4k), fp32;
* **no reasoning**: SmolLM2-135M practically never closes ``</think>`` and boxes a token by
  itself (measured on 8-12 CHAMP contexts x 4-8 samples: 0 % format with a free 64-token
  reasoning budget under v0, v6 or without the ``</think>`` requirement, 0-1 % with a
  prefilled "The next token is"). So the assistant turn is prefilled with an empty reasoning
  block and the answer lead-in, ``<think>\n</think>\nThe next token is \boxed{``, and the model
  writes only the token and the closing brace (max 8 new tokens). Measured: 79-85 % of
  responses then parse (closed box), but their reward is still ~0 (0/96 on train and held-out
  positions; also 0/128 over all positions with data.entropy_threshold=0, and 0/96 with the
  lead-in ending in ``\boxed{ `` so that a leading space is given: the model then answers the
  math problem with a number): a 135M model does not predict the next token of competition
  math in this format, the advantages are all 0 and the weights do not move, so this run
  shows the pipeline, not learning (the tiny recipe and
  tests/e2e/test_rpt_learns.py show learning).
"""

from __future__ import annotations

from megatron_rpt import capabilities
from megatron_rpt.config import RPTConfig


def smollm2_cpu() -> RPTConfig:
    """The embedded default scaled for one 2-core CPU (SGLang + TE in bf16 when present)."""
    cfg = RPTConfig()
    cfg.run.run_dir, cfg.run.name = "runs/smollm2_cpu", "smollm2_cpu"
    gpu = capabilities.have_cuda()
    cfg.model.hf_path = "embedded:smollm2"
    cfg.model.dtype = "bf16" if gpu else "fp32"
    cfg.model.spec = "auto"  # Transformer Engine layers when TE imports on a GPU
    d = cfg.data
    d.corpus, d.max_documents, d.validation_fraction = "embedded:champ", 20, 0.1
    d.prepared_dir = "runs/data/champ-20"
    d.entropy_batch_tokens = 8192 if gpu else 2048  # smaller batches are faster on CPU
    d.context_tokens = 256
    cfg.prompt.think_opener = "<think>\n</think>\nThe next token is \\boxed{"
    r = cfg.rollout
    r.engine = "sglang" if capabilities.have_sglang_runtime() else "hf"
    r.dtype = "bfloat16" if gpu else "float32"
    r.max_new_tokens = 8
    cfg.train.steps, cfg.train.contexts_per_step = 4, 2
    cfg.train.max_tokens_per_microbatch = 4096
    cfg.checkpoint.interval, cfg.checkpoint.keep_last = 2, 2
    cfg.checkpoint.export_hf_at_end = True
    if not gpu:
        cfg.weight_sync.probe_tolerance = 1e-3  # fp32 trainer and fp32 HF engine
    return cfg
