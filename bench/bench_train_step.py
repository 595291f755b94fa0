"""Train-step throughput (tokens/s) and MFU of ``PolicyTrainer``: bf16 vs each FP8 recipe.

One process, TP = PP = DP = 1. For each precision a fresh model (same random weights, written
once as an HF folder) is built with the TE spec on a GPU (the local spec on CPU) and wrapped in
``PolicyTrainer``; after one warm-up step, ``--steps`` optimizer steps on the same rollout batch are
timed (CUDA synchronised). Reported per row: tokens/s (prompt + response tokens trained),
achieved model TFLOP/s from ``megatron_rpt.model.flops`` (forward + backward over every token,
output layer on response tokens only, causal attention), MFU against the device's dense peak
for the row's precision (bf16 peak for bf16 rows, FP8 peak for FP8 rows; only TE's linear
layers run in FP8, so FP8 MFU understates the GEMM utilisation), the speed-up over the first
row of the same run (the reference), peak device memory on GPU, and the PPO loss and gradient
norm of the last step (a sanity check that FP8 trains the same thing: the loss of these
on-policy steps is -mean(advantage) whatever the weights, the gradient norm is not).

FP8 needs Transformer Engine and a capable GPU: recipes TE does not support here are listed as
skipped with TE's reason. On CPU the rows are fp32 (reference) and bf16 at a tiny size.

Peak dense FLOP/s (no structured sparsity), from NVIDIA's datasheets: H100 SXM5 and H200 SXM
989.4 TFLOP/s bf16, 1978.9 fp8; H100 PCIe 756 / 1513; H100 NVL and H200 NVL 835.5 / 1670.5
(the datasheets list twice these numbers "with sparsity"); A100 312 bf16, no fp8.
https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet and
https://www.nvidia.com/en-us/data-center/h200/

    python bench/bench_train_step.py                 # auto: GPU preset with TE, else CPU tiny
    python bench/bench_train_step.py --size 1b --recipes delayed tensorwise blockwise
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_result  # noqa: E402
from megatron_rpt.cli import FlagParser  # noqa: E402

# (name substring, dense bf16 TFLOP/s, dense fp8 TFLOP/s); first match wins.
PEAK_TFLOPS = [
    ("H200 NVL", 835.5, 1670.5),
    ("H200", 989.4, 1978.9),
    ("H100 NVL", 835.5, 1670.5),
    ("H100 PCIe", 756.0, 1513.0),
    ("H100", 989.4, 1978.9),
    ("A100", 312.0, None),
]
SIZES = {  # HF config overrides of the random Llama
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=2048),
    "350m": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=8, vocab_size=32768),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=16, num_key_value_heads=8, vocab_size=32768),
}  # fmt: skip
RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


def peak_tflops(device_name: str, fp8: bool) -> float | None:
    """Dense peak of a known GPU for bf16 (or fp8) GEMMs; None when unknown."""
    for key, bf16, fp8_peak in PEAK_TFLOPS:
        if key in device_name:
            return fp8_peak if fp8 else bf16
    return None


def _write_model(root: Path, size: str) -> Path:
    from megatron_rpt.testing.tiny_models import save_tiny_model

    cfg = dict(SIZES[size], max_position_embeddings=8192)
    return save_tiny_model(
        "llama", root / size, config_overrides=cfg, num_layers=cfg["num_hidden_layers"]
    )


def _variants(cuda: bool, recipes: list[str]) -> list[tuple[str, str | None, str | None]]:
    """(name, dtype, fp8 recipe) rows, plus skip reasons in place of the dtype."""
    if not cuda:
        return [("fp32", "fp32", None), ("bf16", "bf16", None)] + [
            (f"fp8-{r}", None, "needs Transformer Engine and a CUDA GPU") for r in recipes
        ]
    from megatron_rpt import capabilities

    rows = [("bf16", "bf16", None)]
    for r in recipes:
        if not capabilities.have_te():
            rows.append((f"fp8-{r}", None, "needs Transformer Engine"))
            continue
        from megatron_rpt.model.fp8 import recipe_support

        ok, reason = recipe_support(r)
        rows.append((f"fp8-{r}", "bf16", None) if ok else (f"fp8-{r}", None, reason))
    return rows


def _measure(hf_dir: Path, dtype: str, recipe: str | None, args, batch) -> dict:  # noqa: ANN001
    import torch

    from megatron_rpt import capabilities
    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.distributed import initialize_model_parallel, seed_model_parallel
    from megatron_rpt.loss.config import LossConfig
    from megatron_rpt.model.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megatron_rpt.model.flops import training_flops
    from megatron_rpt.trainer.config import OptimizerConfig, TrainConfig
    from megatron_rpt.trainer.step import PolicyTrainer

    cuda = capabilities.have_cuda()
    groups = initialize_model_parallel(1, 1)
    seed_model_parallel(0, groups)
    spec = "te" if cuda and capabilities.have_te() else "local"
    precision = PrecisionConfig(fp8=recipe) if recipe else None
    built = build_pretrained(
        ModelConfig(hf_path=str(hf_dir), dtype=dtype, spec=spec), ParallelConfig(), groups,
        output="hidden", precision=precision,
    )  # fmt: skip
    step = PolicyTrainer(
        built, groups, optimizer=OptimizerConfig(lr=1e-5),
        train=TrainConfig(max_tokens_per_microbatch=args.microbatch_tokens),
        loss=LossConfig(tis=False), temperature=1.0,
    )  # fmt: skip
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step.train_step(batch)  # warm-up: kernels, allocator, FP8 scales
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        metrics = step.train_step(batch)
    sync()
    seconds = (time.perf_counter() - t0) / args.steps
    prompts = [s.prompt_ids.numel() for s in batch.sequences]
    responses = [s.response_ids.numel() for s in batch.sequences]
    flops = training_flops(built.arch, prompts, responses)
    row = {
        "spec": spec,
        "step_s": seconds,
        "tokens_per_s": (sum(prompts) + sum(responses)) / seconds,
        "tflops": flops / seconds / 1e12,
        "loss": metrics.loss,
        "grad_norm": metrics.grad_norm,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    del step, built
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    import torch

    from megatron_rpt import capabilities

    p = FlagParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--size", choices=sorted(SIZES), default=None, help="default: 1b on GPU, tiny on CPU"
    )
    p.add_argument("--recipes", nargs="*", default=list(RECIPES))
    p.add_argument("--seqs", type=int, default=None, help="sequences per step")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens per sequence")
    p.add_argument("--response", type=int, default=None, help="response tokens per sequence")
    p.add_argument("--microbatch-tokens", type=int, default=8192)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU torch threads")
    args = p.parse_args()
    cuda = capabilities.have_cuda()
    torch.set_num_threads(args.threads)
    size = args.size or ("1b" if cuda else "tiny")
    seqs = args.seqs or (32 if cuda else 8)
    prompt = args.prompt or (1536 if cuda else 96)
    response = args.response or (512 if cuda else 32)

    from megatron_rpt.distributed import single_process_group
    from tests.helpers.training import random_rollout_batch

    if cuda:
        torch.cuda.set_device(0)
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    batch = random_rollout_batch(SIZES[size]["vocab_size"], shapes=((prompt, response),) * seqs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, single_process_group():
        hf_dir = _write_model(Path(tmp), size)
        for name, dtype, recipe_or_reason in _variants(cuda, args.recipes):
            row = {"precision": name}
            if dtype is None:
                rows.append(row | {"status": f"skipped: {recipe_or_reason}"})
                print(f"{name}: skipped ({recipe_or_reason})")
                continue
            recipe = name.removeprefix("fp8-") if name.startswith("fp8-") else None
            row |= _measure(hf_dir, dtype, recipe, args, batch) | {"status": "measured"}
            peak = peak_tflops(device, fp8=recipe is not None) if cuda else None
            row["mfu"] = row["tflops"] / peak if peak else None
            rows.append(row)
            print_table([row])
    ref = next(r for r in rows if r["status"] == "measured")
    for r in rows:
        if r["status"] == "measured":
            r["speedup_vs_" + ref["precision"]] = r["tokens_per_s"] / ref["tokens_per_s"]
    print()
    print_table([{k: r.get(k) for k in ("precision", "status", "tokens_per_s", "tflops", "mfu",
                                        "speedup_vs_" + ref["precision"], "loss", "grad_norm",
                                        "peak_mem_gib")}
                 for r in rows])  # fmt: skip
    if not cuda:
        print("FP8 rows need Transformer Engine and a CUDA GPU: not measured on this machine.")
    write_result(
        "train_step_" + ("gpu" if cuda else "cpu"), rows, size=size, model=SIZES[size],
        batch={"sequences": seqs, "prompt": prompt, "response": response}, steps=args.steps,
        reference=ref["precision"],
    )  # fmt: skip


if __name__ == "__main__":
    main()
