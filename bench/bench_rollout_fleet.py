"""Rollout throughput of the engine fleet: 1 vs 2 HF engines over 2 ranks, in one run.

Two gloo ranks (one torch thread each, like two GPUs each hosting an engine). The same
round of requests goes to ``EngineFleet.generate`` twice per repeat: with
``rollout.gpus_per_engine = 2`` (one engine, on rank 0; rank 1 only waits in the gather) and
with ``gpus_per_engine = 1`` (two engines, one per rank). P contexts (the first
``--prompt-tokens`` tokens of CHAMP documents, two contexts per document, real SmolLM2
tokenizer), G samples each, up to ``--new-tokens`` tokens, SmolLM2-135M-Instruct (the embedded
model) in fp32. ``rollout.block_contexts = P / 4`` makes four blocks, two per engine.

Reports generated tokens per wall second of each layout and the CPU seconds each rank spent
(medians over ``--repeats`` after a warm-up, run interleaved so that load drifting on a shared
machine hits both alike), and the ratio two engines / one engine, the median of the per-round
ratios. The completions of both
layouts are checked to be identical (routing does not depend on the number of engines).

    python bench/bench_rollout_fleet.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_result  # noqa: E402
from megatron_rpt.cli import FlagParser  # noqa: E402


def _requests(tok, prompts: int, length: int):  # noqa: ANN001, ANN202
    from megatron_rpt.assets import champ_documents
    from megatron_rpt.rollout.scheduling import RolloutRequest

    out = []
    for d, doc in enumerate(champ_documents()):
        ids = tok(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length + 8:
            out += [RolloutRequest(d, p, tuple(ids[: length + 8 * p])) for p in range(2)]
        if len(out) >= prompts:
            return out[:prompts]
    raise SystemExit(f"fewer than {prompts // 2} CHAMP documents have {length + 8} tokens")


def _worker(rank: int, world_size: int, args: argparse.Namespace):  # noqa: ANN201
    import torch

    from megatron_rpt.assets import smollm2_dir
    from megatron_rpt.rollout.hf_engine import HFEngine
    from megatron_rpt.rollout.placement import EnginePlacement
    from megatron_rpt.rollout.types import SamplingParams
    from megatron_rpt.trainer.engine_guard import EngineGuard
    from megatron_rpt.trainer.fleet import EngineFleet

    torch.set_num_threads(1)
    fleets = {}
    for name, per_engine in (("1 engine", 2), ("2 engines", 1)):
        placement = EnginePlacement(world_size, per_engine)
        slot = placement.slot(rank)
        guard = None
        if slot.is_lead:
            guard = EngineGuard(
                lambda: HFEngine.from_pretrained(smollm2_dir(), device="cpu"), timeout_s=3600
            )
        fleets[name] = EngineFleet(
            placement, guard, lambda version, engines: None, rank=rank, max_restarts=0,
            block_contexts=max(1, args.prompts // 4),
        )  # fmt: skip
        fleets[name].start(version=0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    requests = _requests(tok, args.prompts, args.prompt_tokens)
    params = SamplingParams(n=args.samples, max_new_tokens=args.new_tokens, seed=0)
    results: dict[str, list[tuple[float, int, float]]] = {name: [] for name in fleets}
    outputs = {}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name, fleet in fleets.items():
            t0, c0 = time.perf_counter(), time.process_time()
            groups = fleet.generate(requests, params)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            outputs[name] = [c.token_ids for g in groups for c in g]
            if round_:
                results[name].append((seconds, sum(len(t) for t in outputs[name]), cpu))
    for fleet in fleets.values():
        fleet.shutdown()
    return results, outputs["1 engine"] == outputs["2 engines"]


def main() -> None:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from megatron_rpt.testing.distributed import run_distributed

    (results, identical), (results_1, _) = run_distributed(_worker, 2, args=(args,), timeout=3600)
    rows = []
    for name, runs in results.items():
        rows.append({
            "layout": name,
            "wall_s": statistics.median(s for s, _, _ in runs),
            "cpu_s_rank0": statistics.median(c for _, _, c in runs),
            "cpu_s_rank1": statistics.median(c for _, _, c in results_1[name]),
            "tokens": runs[0][1],
            "tokens_per_s": statistics.median(t / s for s, t, _ in runs),
        })  # fmt: skip
    ratios = [
        (t2 / s2) / (t1 / s1)
        for (s1, t1, _), (s2, t2, _) in zip(results["1 engine"], results["2 engines"], strict=True)
    ]
    ratio = statistics.median(ratios)
    for row in rows:
        row["ratio_vs_1_engine"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    print_table(rows)
    print(f"two engines / one engine: {ratio:.2f}x (median of per-round ratios "
          f"{[round(r, 2) for r in ratios]}); completions identical: {identical}")  # fmt: skip
    write_result(
        "rollout_fleet", rows, args=vars(args), ratio=ratio, ratios=ratios, identical=identical
    )


if __name__ == "__main__":
    main()
