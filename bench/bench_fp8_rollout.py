"""FP8 rollout weights: the log-prob gap they cause, and the cost of quantizing at each sync.

SmolLM2-135M-Instruct (the embedded fp32 model) scores CHAMP text teacher-forced (``--docs``
documents, the first ``--tokens`` tokens each). The fp32 model is the reference ("trainer");
each variant changes only the *weights* the same fp32 forward uses:

* ``bf16``: every weight rounded to bf16 (what a bf16 rollout engine holds);
* ``fp8_block128``: decoder linear weights quantized to 128x128 blockwise e4m3 and dequantized
  (``weight_sync/fp8.py``; embeddings, lm_head and norms unchanged), i.e. exactly what
  ``DequantizingEngine`` serves; ``fp8_block128_pow2``: the same with power-of-two scales;
* ``fp8_block128+bf16``: FP8 linear weights and everything else in bf16 (closest to an
  FP8-served model with bf16 activations, minus SGLang's activation quantization).

Per variant: mean |logp - logp_ref| over all scored tokens (``train_rollout_logprob_abs_diff``),
mean exp(|d|) (``token_mult_prob_error``), the largest |d|, the fraction of tokens whose
probability ratio leaves [1/2, 2] (what TIS with cap 2 truncates), and the gap relative to
the bf16 gap of the same run. Also timed: quantizing every linear weight of the model
(``BlockFP8.quantize``, the sync's extra work) against a copy of the same bytes.

    python bench/bench_fp8_rollout.py          # CPU, ~1 min
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_result  # noqa: E402
from megatron_rpt.cli import FlagParser  # noqa: E402


def _logprobs(model, tokens_BS):  # noqa: ANN001, ANN202
    import torch

    with torch.no_grad():
        logits = model(tokens_BS).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    return logp.gather(-1, tokens_BS[:, 1:, None])[..., 0]


def _variant_state(state, name):  # noqa: ANN001, ANN202
    import torch

    from megatron_rpt.weight_sync.fp8 import BlockFP8, dequantize_stream

    if name == "bf16":
        return {n: t.bfloat16().float() for n, t in state.items()}
    spec = BlockFP8(128, pow2_scales=name.endswith("pow2"))
    pairs = [p for n, t in state.items() for p in spec.quantize(n, t)]
    out = dict(dequantize_stream(pairs, 128, torch.float32))
    if name.endswith("+bf16"):
        out = {
            n: (t if spec.quantizes(n, t.shape) else t.bfloat16().float()) for n, t in out.items()
        }
    return out


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rpt.assets import champ_documents, smollm2_dir
    from megatron_rpt.weight_sync.fp8 import BlockFP8

    p = FlagParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    ids = [tok(d.text, add_special_tokens=False)["input_ids"] for d in champ_documents()]
    rows_ids = [x[: args.tokens] for x in ids if len(x) >= args.tokens][: args.docs]
    tokens = torch.tensor(rows_ids)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    state = {n: t.detach().clone() for n, t in model.named_parameters()}
    ref = _logprobs(model, tokens)
    rows = []
    for name in ("bf16", "fp8_block128", "fp8_block128_pow2", "fp8_block128+bf16"):
        with torch.no_grad():
            for n, t in _variant_state(state, name).items():
                dict(model.named_parameters())[n].copy_(t)
        d = (_logprobs(model, tokens) - ref).abs()
        rows.append({
            "weights": name,
            "logprob_abs_diff": float(d.mean()),
            "token_mult_prob_error": float(d.exp().mean()),
            "max_abs_diff": float(d.max()),
            "frac_ratio_outside_2x": float((d > math.log(2)).float().mean()),
        })  # fmt: skip
    for r in rows:
        r["gap_vs_bf16"] = r["logprob_abs_diff"] / rows[0]["logprob_abs_diff"]
    spec = BlockFP8()
    linear = [(n, t) for n, t in state.items() if spec.quantizes(n, t.shape)]
    nbytes = sum(t.numel() * t.element_size() for _, t in linear)
    flat = torch.cat([t.reshape(-1) for _, t in linear])
    copy = torch.empty_like(flat)

    def timed(fn, reps=3):  # noqa: ANN001, ANN202
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    quant_s = timed(lambda: [spec.quantize(n, t) for n, t in linear])
    copy_s = timed(lambda: copy.copy_(flat))
    timing = {
        "linear_weights": len(linear), "mib_fp32": nbytes / 2**20, "quantize_s": quant_s,
        "copy_s": copy_s, "quantize_over_copy": quant_s / copy_s,
    }  # fmt: skip
    print(f"SmolLM2-135M fp32 reference, {tokens.numel()} tokens ({len(rows_ids)} CHAMP docs)")
    print_table(rows)
    print()
    print_table([timing])
    write_result(
        "fp8_rollout_cpu", rows, timing=timing, tokens=tokens.numel(), docs=len(rows_ids),
        model="SmolLM2-135M-Instruct (fp32 reference)",
    )  # fmt: skip


if __name__ == "__main__":
    main()
