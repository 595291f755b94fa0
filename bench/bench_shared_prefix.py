"""Shared-prefix vs separate layout: tokens processed and training-step time, one run.

One RPT group per step (a context of P tokens and G responses of R tokens each) is trained
with ``PolicyTrainer.train_step`` (Megatron schedules, DDP, SGD) in both layouts:
``micro_batch_layout=packed`` (G separate sequences ``[ctx; r_i]``, what slime / verl /
NeMo-RL do) and ``shared_prefix`` (``[ctx; r_1; ...; r_G]``, the context once). The model
has SmolLM2-135M's shape (hidden 576, 9 query / 3 KV heads of 64, MLP 1536, vocabulary
49,152, tied embeddings; read from the embedded model's config.json) with ``--layers`` of its
30 layers and random weights. Time: median over ``--reps`` steps after one warm-up step, in
one process, both layouts alternating per repetition so that machine load hits both alike;
both the wall time and the process CPU time (all threads; less sensitive to other jobs on a
shared machine) are reported, and the fixed per-step cost that does not scale with tokens
(SGD update, gradient buffers, the dense embedding gradient) is measured with a 9-token step
so that the token-proportional part can be compared with the FLOP model. Both layouts must agree: the log-probs of a probe group and
every parameter gradient of the last step are compared (relative to each tensor's largest
entry).

Expected FLOP ratio (forward + backward = 3 x forward), per layer and token: ``2 x`` the
layer's linear parameters; per visible (query, key) pair: ``4 x heads x head_dim`` (QK^T and
PV); plus the output layer on response positions (``2 V H`` per response token, the same in
both layouts). Separate: G sequences of P + R tokens, ``(P + R)(P + R + 1) / 2`` pairs each.
Shared: ``P + G R`` tokens; ``[ctx; r_1]`` is one causal piece and every other response adds
``R P + R (R + 1) / 2`` pairs (the context rows are queries once, their keys are read G
times).

Usage: ``python bench/bench_shared_prefix.py [--shapes 1024x128 2048x256 --group 8
--layers 4 --reps 2]``; on a GPU e.g. ``--shapes 4096x1024 --layers 30 --dtype bf16``.
Writes ``bench/results/shared_prefix_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_result  # noqa: E402
from megatron_rpt.cli import FlagParser  # noqa: E402

SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
)


def smollm2_shape() -> dict:
    """SmolLM2-135M-Instruct's config.json fields that define the compute shape."""
    from megatron_rpt.assets import smollm2_dir

    cfg = json.loads((Path(smollm2_dir()) / "config.json").read_text())
    return {k: cfg[k] for k in SHAPE_KEYS if k in cfg}


def tri(n: int) -> int:
    """Visible (query, key) pairs of causal attention over n tokens."""
    return n * (n + 1) // 2


def step_flops(shape: dict, layers: int, prompt: int, responses: list[int], shared: bool) -> float:
    """Forward + backward FLOPs of one group (see the module docstring)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = shape.get("head_dim", h // heads)
    linear_params = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * i
    if shared:
        tokens = prompt + sum(responses)
        pairs = tri(prompt + responses[0]) + sum(r * prompt + tri(r) for r in responses[1:])
    else:
        tokens = sum(prompt + r for r in responses)
        pairs = sum(tri(prompt + r) for r in responses)
    forward = layers * (2 * linear_params * tokens + 4 * heads * d * pairs)
    forward += 2 * shape["vocab_size"] * h * sum(responses)
    return 3.0 * forward


def group_batch(prompt: int, group: int, response: int, vocab: int, seed: int):
    import torch

    from megatron_rpt.trainer.batch import RolloutBatch, TrainSequence

    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, vocab, (prompt,), generator=gen)
    return RolloutBatch(
        [
            TrainSequence(
                ctx,
                torch.randint(0, vocab, (response,), generator=gen),
                torch.full((response,), -1.0),
                advantage=float(torch.randn((), generator=gen)),
                group_id=0,
            )
            for _ in range(group)
        ]
    )


def _timed_steps(steps: dict, batches: dict, reps: int) -> tuple[dict, dict, dict]:
    """Wall and CPU seconds per step for each variant, alternating variants per repetition."""
    import torch

    wall: dict[str, list[float]] = {name: [] for name in batches}
    cpu: dict[str, list[float]] = {name: [] for name in batches}
    metrics = {}
    for rep in range(reps + 1):  # rep 0 is the warm-up
        for name, make_batch in batches.items():
            batch = make_batch(rep)
            start, start_cpu = time.perf_counter(), time.process_time()
            metrics[name] = steps[name].train_step(batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if rep:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu, metrics


def _agreement(steps: dict, probe) -> dict[str, float]:
    """Max log-prob difference on a probe group, and the largest gradient difference of the
    last step relative to each tensor's largest entry (shared vs separate)."""
    from tests.helpers.training import gather_full_gradients

    lps = [steps[name].compute_logprobs(probe) for name in ("packed", "shared_prefix")]
    grads = [
        gather_full_gradients(steps[name].model_modules, steps[name].groups)
        for name in ("packed", "shared_prefix")
    ]
    return {
        "max_logprob_diff": max((a - b).abs().max().item() for a, b in zip(*lps, strict=True)),
        "max_grad_rel_diff": max(
            (grads[1][k] - ref).abs().max().item() / ref.abs().max().item()
            for k, ref in grads[0].items()
        ),
    }


def bench_shape(hf_dir: str, args: argparse.Namespace, prompt: int, response: int) -> list[dict]:
    from megatron_rpt.trainer.config import OptimizerConfig, TrainConfig
    from tests.helpers.training import build_policy_trainer

    # lr 0: the update is computed (and timed) but the weights stay the same, so that both
    # layouts (and the "fixed" steps, run on the packed model) see identical weights.
    sgd = OptimizerConfig(
        optimizer="sgd", lr=0.0, weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=False
    )
    layouts = ("packed", "shared_prefix")
    steps = {
        layout: build_policy_trainer(
            hf_dir,
            dtype=args.dtype,
            spec=args.spec,
            optimizer=sgd,
            train=TrainConfig(micro_batch_layout=layout, max_tokens_per_microbatch=args.budget),
        )
        for layout in layouts
    }
    steps["fixed"] = steps["packed"]
    vocab = args.shape["vocab_size"]
    # "fixed" first: the gradients compared afterwards are those of the last group steps.
    # It is the per-step cost that does not scale with tokens (optimizer, gradient buffers,
    # the dense embedding gradient): a 9-token step.
    batches = {"fixed": lambda rep: group_batch(8, 1, 1, vocab, seed=rep)}
    for layout in layouts:
        batches[layout] = lambda rep: group_batch(prompt, args.group, response, vocab, seed=rep)
    wall, cpu, metrics = _timed_steps(steps, batches, args.reps)
    check = _agreement(steps, group_batch(prompt, args.group, response, vocab, seed=999))
    responses = [response] * args.group
    rows = []
    for name in (*layouts, "fixed"):
        flops = step_flops(
            args.shape, args.layers, *((8, [1]) if name == "fixed" else (prompt, responses)),
            name == "shared_prefix",
        )  # fmt: skip
        rows.append(
            {
                "P": prompt,
                "G": args.group,
                "R": response,
                "layout": name,
                "tokens": int(metrics[name].batch["layout_tokens"]),
                "wall_s": statistics.median(wall[name]),
                "cpu_s": statistics.median(cpu[name]),
                "cpu_s_min": min(cpu[name]),
                "tflop": flops / 1e12,
                "wall_s_all": [round(t, 3) for t in wall[name]],
                "cpu_s_all": [round(t, 3) for t in cpu[name]],
            }
        )
    sep, shared, fixed = rows
    ratio = {
        "P": prompt,
        "G": args.group,
        "R": response,
        "layout": "separate / shared",
        "tokens": sep["tokens"] / shared["tokens"],
        "wall_s": sep["wall_s"] / shared["wall_s"],
        "cpu_s": sep["cpu_s"] / shared["cpu_s"],
        "cpu_s_min": sep["cpu_s_min"] / shared["cpu_s_min"],
        "tflop": sep["tflop"] / shared["tflop"],
        "cpu_s_minus_fixed": (sep["cpu_s"] - fixed["cpu_s"]) / (shared["cpu_s"] - fixed["cpu_s"]),
        **check,
    }
    return [*rows, ratio]


def main() -> None:
    parser = FlagParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["1024x128", "2048x256"],
        help="PxR: context tokens x tokens per response",
    )
    parser.add_argument("--group", type=int, default=8, help="responses per context (G)")
    parser.add_argument("--layers", type=int, default=4, help="of SmolLM2-135M's 30 layers")
    parser.add_argument("--reps", type=int, default=2, help="timed steps per layout")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--spec", default="local", choices=["local", "te"])
    parser.add_argument(
        "--budget",
        type=int,
        default=16384,
        help="train.max_tokens_per_microbatch (the default config's)",
    )
    args = parser.parse_args()

    import torch

    from megatron_rpt.distributed import single_process_group
    from megatron_rpt.testing.tiny_models import save_tiny_model

    torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    args.shape = smollm2_shape()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, single_process_group():
        hf_dir = str(
            save_tiny_model(
                "llama_tied", Path(tmp) / "model", num_layers=args.layers,
                config_overrides=args.shape,
            )
        )  # fmt: skip
        for spec in args.shapes:
            prompt, response = (int(x) for x in spec.split("x"))
            rows += bench_shape(hf_dir, args, prompt, response)
            shown = [k for k in rows[-1] if k in rows[-2] and not k.endswith("_all")]
            print_table([{k: r[k] for k in shown} for r in rows[-4:]])
            print({k: v for k, v in rows[-1].items() if k not in shown})
    device = "gpu" if torch.cuda.is_available() else "cpu"
    write_result(
        f"shared_prefix_{device}",
        rows,
        model={"shape": "SmolLM2-135M", "layers": args.layers, **args.shape},
        args={k: v for k, v in vars(args).items() if k != "shape"},
    )


if __name__ == "__main__":
    main()
