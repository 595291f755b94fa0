"""Per-engine weight-sync time as data-parallel replicas are added (gloo, CPU), as a ratio.

Two spawned runs in one invocation, the same model and the same engine size:

The trainer is bf16 (the training dtype; the fp32 HF engine upcasts what it receives).

* 1 replica: 2 ranks, trainer TP=2, one HF engine of TP 2 on ranks {0, 1};
* 2 replicas: 4 ranks, trainer TP=2 x DP=2, two engines of TP 2 ({0, 1} and {2, 3}).

Each run perturbs every weight, syncs once with ``verify='full'`` on every engine (a
correctness gate: every tensor's fingerprint must match, and the log-prob probe must pass at
the default tolerance), then times ``REPEATS`` syncs
with ``verify='none'`` (median of the slowest rank). The per-engine design gathers inside each
replica and feeds each engine from its own ranks, so the work per replica is the same and the
ratio should stay near 1; on a machine with fewer cores than ranks the ranks also compete for
CPU, which the reported core count lets the reader judge. Each rank runs 1 torch thread.

Run: ``python bench/bench_sync_replicas.py`` (writes bench/results/sync_replicas.json);
``--quick``: a 2-layer model and one timed sync.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_result  # noqa: E402
from megatron_rpt.cli import FlagParser  # noqa: E402

REPEATS = 3
MODEL = {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
         "num_key_value_heads": 4}  # fmt: skip
LAYERS = 4


def _run(rank, world_size, hf_dir, repeats):  # noqa: ANN001, ANN202 - spawned by run_distributed
    import torch
    import torch.distributed as dist

    from megatron_rpt.checkpoint.loading import build_pretrained
    from megatron_rpt.distributed import initialize_model_parallel, seed_model_parallel
    from megatron_rpt.model.config import ModelConfig, ParallelConfig
    from megatron_rpt.rollout.hf_engine import HFEngine
    from megatron_rpt.weight_sync import WeightSync, WeightSyncConfig
    from tests.helpers.updates import perturb_parameters

    torch.set_num_threads(1)
    groups = initialize_model_parallel(2, 1)
    seed_model_parallel(0, groups)
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    built = build_pretrained(ModelConfig(hf_path=hf_dir, dtype="bf16"), parallel, groups)
    perturb_parameters(built.chunks, built.arch, built.vocab.padded, groups.tp_rank, 2)
    engine_rank, group = rank % 2, None
    for first in range(0, world_size, 2):
        g = dist.new_group([first, first + 1], backend="gloo")
        group = g if rank in (first, first + 1) else group
    engine = None
    if engine_rank == 0:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from megatron_rpt.assets import smollm2_dir

        model = AutoModelForCausalLM.from_pretrained(hf_dir)  # ids < 250: any tokenizer decodes them
        engine = HFEngine(model, AutoTokenizer.from_pretrained(smollm2_dir()))

    def sync(verify):  # noqa: ANN001, ANN202
        cfg = WeightSyncConfig(verify=verify)
        return WeightSync(built, groups, engine, cfg, engine_rank=engine_rank, engine_tp=2, engine_group=group)

    gate = sync("full")(version=1)
    timed = sync("none")
    times = []
    for v in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        timed(version=2 + v)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "probe": gate.probe_max_abs_diff,
            "rank_bytes": gate.bytes, "checked": gate.checked_tensors, "hf_bytes": timed.plan.hf_bytes}  # fmt: skip


def main() -> None:
    import tempfile

    from megatron_rpt.testing.distributed import run_distributed
    from megatron_rpt.testing.tiny_models import save_tiny_model

    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, one timed sync")
    args = parser.parse_args()
    layers, repeats = (2, 1) if args.quick else (LAYERS, REPEATS)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = str(save_tiny_model("llama", Path(tmp) / "m", num_layers=layers, config_overrides=MODEL))
        rows = []
        for world in (2, 4):
            results = run_distributed(_run, world, args=(hf_dir, repeats), timeout=1800)
            leads = [results[r] for r in range(0, world, 2)]
            assert all(x["probe"] is not None and x["checked"] for x in leads), leads
            rows.append({
                "replicas": world // 2, "ranks": world, "engines": world // 2,
                "sync_s": max(r["seconds"] for r in results),
                "hf_MiB": results[0]["hf_bytes"] / 2**20,
                "rank1_payload_MiB": results[1]["rank_bytes"] / 2**20,
            })  # fmt: skip
    ratio = rows[1]["sync_s"] / rows[0]["sync_s"]
    print_table(rows)
    print(f"sync time, 2 replicas / 1 replica: {ratio:.2f}x")
    write_result("sync_replicas", rows, ratio_2_over_1=ratio)


if __name__ == "__main__":
    main()
