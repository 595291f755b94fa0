r"""Recipe ``smollm2_cpu``: the embedded default, completion-style RPT on SmolLM2-135M + CHAMP.

    make demo                               # trains, then prints the before/after table
    bash examples/pretrain_rpt.sh           # the training part (this recipe is the default)

Everything is shipped with the package (no download): the policy, its tokenizer and the
entropy proxy are SmolLM2-135M-Instruct, the corpus is the CHAMP competition-math problems
with their solutions (20 documents; 17 train, 3 held out). On a machine with a GPU and SGLang
it uses SGLang (colocated) and Transformer Engine layers in bf16 instead of the HF engine.

**Completion mode** (``prompt.mode=completion``, docs/PROMPT_MODES.md): the prompt is the
context's own token ids, the response is one sampled token, and the reward is the paper's
prefix match on that token's bytes. This is RPT with an empty chain of thought: a 135M model
cannot follow the paper's reasoning template (inside the chat template with the v0
instruction it copies the instruction's example ``\boxed{ para}`` and earns reward 0 on every
sample, so GRPO has nothing to learn from), while on the raw context about a fifth of its
samples are rewarded and most groups of 8 have unequal rewards. The reasoning template stays
the default of RPTConfig and of the GPU recipes.

The paper's recipe where it applies: G = 8, no KL, no entropy bonus, GRPO, one optimizer step
per rollout batch, the prefix-match reward. Changed so that the training reward rises within a
few minutes on 2 CPU cores (measured numbers: README.md and docs/BENCHMARKS.md):

* temperature 1.0 (paper 0.8). On 135M-parameter completions RL in a few steps mostly
  sharpens the sampled distribution, so the room the reward has to rise is the gap between the
  model's greedy and sampled accuracy: about 0.12 at T 1.0 on these contexts, 0.09 at T 0.8;
* lr 1.5e-4 constant (paper 1e-6: at that rate a few steps do not move the weights; 2e-4
  already made the greedy token worse);
* 24 contexts per step (paper 256), 12 steps (paper 1000), contexts of at most 32 tokens
  (paper ~4k; the context is the whole prompt here and its forward/backward is most of the
  step's compute), one new token (no reasoning), fp32.

Without a GPU ``make demo`` runs the training as 2 data-parallel processes with one thread
each (``NPROC_PER_NODE=2``): about 1.6x sooner than one process with 2 threads, with the same
rewards step by step (measured).

``make demo`` then evaluates the base model and the trained export on the held-out split
(``tools/eval_next_token.py`` with this recipe): greedy next-token accuracy ("standard") and
the sampled accuracy the reward measures (the "reasoning" rows, Random@1 over 8 samples), by
difficulty bucket with 95 % Wilson intervals. README.md shows the numbers to expect.
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
    d.context_tokens = 32
    cfg.prompt.mode = "completion"  # the context's own ids; the response is the next token
    r = cfg.rollout
    r.engine = "sglang" if capabilities.have_sglang_runtime() else "hf"
    r.dtype = "bfloat16" if gpu else "float32"
    r.n_samples, r.temperature, r.max_new_tokens = 8, 1.0, 1
    cfg.optimizer.lr, cfg.optimizer.lr_schedule = 1.5e-4, "constant"
    cfg.train.steps, cfg.train.contexts_per_step = 12, 24
    e = cfg.eval  # `make demo`'s before/after table (tools/eval_next_token.py --recipe ...)
    e.max_new_tokens, e.n_samples, e.pass_k, e.temperature = 1, 8, 8, 1.0
    e.context_tokens, e.reasoning_max_positions = 32, 200  # 200 stratified held-out positions
    e.dtype = "float32"
    cfg.train.max_tokens_per_microbatch = 4096
    cfg.checkpoint.interval, cfg.checkpoint.keep_last = 0, 1  # the final step only
    cfg.checkpoint.export_hf_at_end = True
    if not gpu:
        cfg.weight_sync.probe_tolerance = 1e-3  # fp32 trainer and fp32 HF engine
    return cfg
