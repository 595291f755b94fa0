"""Recipe ``r1_distill_qwen_14b``: the paper's RPT-14B run (docs/METHOD.md §7) on a cluster.

    NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 MASTER_PORT=29500 GPUS_PER_NODE=8 \\
        bash examples/pretrain_rpt.sh --recipe examples/r1_distill_qwen_14b/config.py:r1_distill_qwen_14b \\
        --set model.hf_path=/models/DeepSeek-R1-Distill-Qwen-14B --set data.corpus=/data/omnimath.jsonl

Base DeepSeek-R1-Distill-Qwen-14B (Qwen2: 48 layers, 40 query / 8 KV heads), OmniMATH
(problem + solution joined into one ``text`` field per JSONL line; the paper does not say how),
positions filtered by the top-16 entropy of DeepSeek-R1-Distill-Qwen-1.5B (same tokenizer).
Paper hyperparameters: 256 contexts x G = 8 per step, temperature 0.8, Adam lr 1e-6 constant,
betas (0.9, 0.999), weight decay 0.01, no KL, entropy coefficient 0, exactly on-policy (one
optimizer step per rollout batch), prompts up to 4,096 tokens (contexts of 3,840 + template),
responses up to 8,192 tokens, dynamic sampling from step 500, 1,000 steps.

Layout: TP 4 x PP 2 = one 8-GPU node per model replica, the rest data-parallel (DP 4 on 32
GPUs).

Rollout engines (docs/ROLLOUT.md): SGLang colocated with the trainer, memory released to the
trainer during the update. ``rollout.gpus_per_engine`` (default: TP = 4) sets the fleet:
32 / 4 = 8 engines of engine TP 4, one per 4 GPUs, each driven by its first rank, contexts
routed to them by document and balanced by expected tokens. Engines of several GPUs take their
weights per engine rank: each engine TP rank receives its payload from the trainer rank on its
own GPU. With PP = 2, though, a model-parallel group spans both pipeline stages (two nodes) and
would hold two engine leads, whose verification probes would share that group; until that is
lifted the default falls back to a single engine (``rollout.sglang.tp_size`` = 4, on GPUs 0-3
of the first node; a warning says so) and rollout throughput, not training, bounds the step
time. At PP = 1 the fleet is used as is.

Memory plan per GPU (H100 80 GB; ``tools/plan_run.py`` estimates, not measured; docs/SCALING.md):
trainer parameters 3.4 GB (bf16), gradients 6.9 GB, distributed optimizer 5.2 GB, activations
about 45 GB at the first pipeline stage; an engine GPU adds a 6.9 GB weight shard and a KV pool
of ``rollout.sglang.mem_fraction_static = 0.5``. Trainer and engine do not fit side by side
(about 102 GB), so the colocated hand-off is on: ``rollout.offload_trainer = "optimizer"`` moves
the optimizer state and gradients to pinned host memory during rollout, and the engine releases
its weights, KV cache and CUDA graphs during training (peak about 62 GB, the training phase).

Precision: Transformer Engine layers with FP8 tensorwise (current) scaling on Hopper
(``precision.fp8=tensorwise``, first and last layer kept in bf16; master weights, optimizer
state, checkpoints and the HF export stay bf16/fp32), the SGLang engine in bf16. Rollout and
training precisions then differ, so ``loss.tis`` resolves to on (token-level truncated
importance sampling, logged at start). ``--set precision.fp8=none`` trains in plain bf16.
Unverified: no GPU was available to this repository's development (docs/FP8.md).
"""

from __future__ import annotations

from megatron_rpt.config import RPTConfig

MODEL = "/models/DeepSeek-R1-Distill-Qwen-14B"
PROXY = "/models/DeepSeek-R1-Distill-Qwen-1.5B"
CORPUS = "/data/omnimath.jsonl"


def r1_distill_qwen_14b() -> RPTConfig:
    """The paper's recipe; paths are placeholders (override with --set / --init-from)."""
    cfg = RPTConfig()  # the defaults already are the paper's loss, optimizer and sampling
    cfg.run.run_dir, cfg.run.name = "runs/rpt_r1_distill_qwen_14b", "rpt-r1-distill-qwen-14b"
    cfg.model.hf_path, cfg.model.dtype, cfg.model.spec = MODEL, "bf16", "te"
    cfg.precision.fp8, cfg.precision.first_last_layers_bf16 = "tensorwise", True
    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = 4, 2
    d = cfg.data
    d.corpus, d.prepared_dir, d.entropy_model = CORPUS, "runs/data/omnimath", PROXY
    d.validation_fraction = 0.045  # about the paper's 200 of 4,428 problems held out
    d.context_tokens = 3840  # + the v0 instruction and chat template <= 4,096 prompt tokens
    r = cfg.rollout
    r.engine, r.mode, r.dtype = "sglang", "colocated", "bfloat16"
    r.n_samples, r.temperature, r.max_new_tokens = 8, 0.8, 8192
    r.stop_at_final_box = True
    cfg.eval.stop_at_final_box = True  # evaluation reads the same (first closed) box
    r.sglang.tp_size, r.sglang.mem_fraction_static = 4, 0.5
    r.offload_trainer = "optimizer"  # the colocated hand-off (memory plan above)
    cfg.loss.dynamic_sampling, cfg.loss.dynamic_sampling_start_step = True, 500
    cfg.optimizer.lr, cfg.optimizer.lr_schedule = 1e-6, "constant"
    t = cfg.train
    t.steps, t.contexts_per_step = 1000, 256
    t.max_tokens_per_microbatch = 16384  # one 4k-prompt + 8k-response sequence fits
    cfg.checkpoint.interval, cfg.checkpoint.keep_last = 50, 3
    cfg.checkpoint.export_hf_at_end = True
    return cfg
