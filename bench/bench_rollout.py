"""Rollout throughput (generated tokens/s): the rollout engines vs ``transformers`` generate.

RPT-shaped requests: P prompts (the first ``--prompt-tokens`` tokens of CHAMP documents, real
SmolLM2 tokenizer), G samples each, temperature 0.8, up to ``--new-tokens`` tokens (EOS may end a
sample earlier; throughput counts the tokens actually generated). Rows, all in one run:

* ``hf_generate`` (the reference): ``model.generate(do_sample=True, num_return_sequences=G)``
  on the same model object, which prefills every prompt G times;
* ``hf_engine``: ``megatron_rpt.rollout.HFEngine.generate`` (prefill once per prompt, KV cache
  repeated for the G samples, finished rows pruned, exact log-probs);
* ``sglang`` when the SGLang runtime and a GPU are present (a server launched on the embedded
  model; radix cache, continuous batching), otherwise listed as not measured.

Each row reports wall seconds and CPU seconds of this process (medians of ``--repeats`` after
one warm-up each), generated tokens per wall second and per CPU second, and the ratio to the
reference. The engines run interleaved (reference, engine, reference, engine, ...) and the ratio
is the median of the per-round ratios, so load that drifts on a shared machine affects both
sides of a ratio alike; CPU seconds are less sensitive to other jobs than wall time.
SmolLM2-135M-Instruct (the embedded model) in fp32 on CPU, bf16 on GPU.

    python bench/bench_rollout.py                       # CPU: 2 prompts x 8 samples x 32 tokens
    python bench/bench_rollout.py --prompts 64 --new-tokens 512   # GPU sizes
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_result  # noqa: E402
from megatron_rpt.cli import FlagParser  # noqa: E402


def _prompts(n: int, length: int, tokenizer) -> list[list[int]]:  # noqa: ANN001
    from megatron_rpt.assets import champ_documents

    out = []
    for doc in champ_documents():
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise SystemExit(f"fewer than {n} CHAMP documents have {length} tokens")


def _interleaved(fns: dict, repeats: int, sync) -> dict[str, list[tuple[float, float, int]]]:  # noqa: ANN001
    """Warm each fn up, then run them round-robin; per fn: [(wall s, cpu s, tokens)]."""
    for fn in fns.values():
        fn()
    out: dict[str, list[tuple[float, float, int]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            tokens = fn()
            sync()
            out[name].append((time.perf_counter() - t0, time.process_time() - c0, tokens))
    return out


def _hf_generate(engine, prompts, args):  # noqa: ANN001, ANN202
    import torch

    ids_BT, mask_BT = engine._left_pad(prompts)  # the engine's own padding, same inputs
    pad = engine.tokenizer.pad_token_id or 0

    def run():
        with torch.no_grad():
            out = engine.model.generate(
                input_ids=ids_BT, attention_mask=mask_BT, do_sample=True, temperature=0.8,
                top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                num_return_sequences=args.samples, pad_token_id=pad,
            )  # fmt: skip
        new = out[:, ids_BT.shape[1] :]
        eos = engine._eos_ids
        count = 0
        for row in new.tolist():
            for t in row:
                count += 1
                if t in eos:
                    break
        return count

    return run


def main() -> None:
    import torch

    from megatron_rpt import capabilities
    from megatron_rpt.rollout.hf_engine import HFEngine
    from megatron_rpt.rollout.types import SamplingParams

    p = FlagParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--samples", type=int, default=8, help="G")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cuda = capabilities.have_cuda()
    dtype = "bfloat16" if cuda else "float32"
    engine = HFEngine.from_pretrained(
        "embedded:smollm2", dtype=dtype, device="auto", max_batch_rows=256
    )
    prompts = _prompts(args.prompts, args.prompt_tokens, engine.tokenizer)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    params = SamplingParams(temperature=0.8, n=args.samples, max_new_tokens=args.new_tokens, seed=0)
    runs = _interleaved(
        {
            "hf_generate": _hf_generate(engine, prompts, args),
            "hf_engine": lambda: sum(
                len(c.token_ids) for group in engine.generate(prompts, params) for c in group
            ),
        },
        args.repeats,
        sync,
    )
    rows = []
    for name, samples in runs.items():
        wall = statistics.median(w for w, _, _ in samples)
        cpu = statistics.median(c for _, c, _ in samples)
        tokens = samples[-1][2]
        rows.append({"engine": name, "seconds": wall, "cpu_seconds": cpu, "generated_tokens": tokens,
                     "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu})  # fmt: skip
    ratios = [
        (e[2] / e[0]) / (r[2] / r[0])
        for r, e in zip(runs["hf_generate"], runs["hf_engine"], strict=True)
    ]
    if capabilities.have_sglang_runtime():
        rows.append(_sglang_row(prompts, params, args))
    else:
        rows.append({"engine": "sglang", "seconds": None, "generated_tokens": None,
                     "tokens_per_s": None, "status": "not measured: needs a GPU and the SGLang runtime"})  # fmt: skip
    for r in rows:
        r.setdefault("status", "measured")
        r["ratio_vs_hf_generate"] = (
            r["tokens_per_s"] / rows[0]["tokens_per_s"] if r["tokens_per_s"] else None
        )
    rows[1]["ratio_vs_hf_generate"] = statistics.median(ratios)  # paired rounds (docstring)
    rows[1]["ratio_per_round"] = ratios
    keys = ("engine", "status", "seconds", "cpu_seconds", "generated_tokens", "tokens_per_s",
            "tokens_per_cpu_s", "ratio_vs_hf_generate")  # fmt: skip
    print_table([{k: r.get(k) for k in keys} for r in rows])
    write_result(
        "rollout_" + ("gpu" if cuda else "cpu"), rows, model=f"SmolLM2-135M-Instruct ({dtype})",
        prompts=args.prompts, samples=args.samples, prompt_tokens=args.prompt_tokens,
        max_new_tokens=args.new_tokens, repeats=args.repeats,
    )  # fmt: skip


def _sglang_row(prompts, params, args) -> dict:  # noqa: ANN001
    from megatron_rpt.rollout.config import RolloutConfig
    from megatron_rpt.rollout.sglang_engine import SGLangEngine

    cfg = RolloutConfig(engine="sglang")
    cfg.sglang.port = 0
    engine = SGLangEngine.launch(cfg, "embedded:smollm2")
    try:
        engine.generate(prompts, params)  # warm-up
        times, tokens = [], 0
        for _ in range(args.repeats):
            engine.flush_cache()  # no reuse across repeats: the same work each time
            t0 = time.perf_counter()
            out = engine.generate(prompts, params)
            times.append(time.perf_counter() - t0)
            tokens = sum(len(c.token_ids) for group in out for c in group)
        s = statistics.median(times)
        return {
            "engine": "sglang",
            "seconds": s,
            "generated_tokens": tokens,
            "tokens_per_s": tokens / s,
        }
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
