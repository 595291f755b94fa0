#!/usr/bin/env python
"""Entropy-scoring throughput (tokens/s): SmolLM2-135M scoring the first N CHAMP documents.

Measures ``EntropyScorer.score_documents`` alone (model already loaded, one warm-up call), for
a few ``entropy_batch_tokens`` budgets, against the reference measured in the same run: the
same scorer called once per document (one forward per document, no packing; the scores must
agree, ``max_abs_diff_vs_per_document``). Also reports the top-16 entropy distribution of the
scored positions. Prints a table and writes ``bench/results/bench_entropy.json``.

    python bench/bench_entropy.py                      # CPU, 32 documents, 2 threads
    python bench/bench_entropy.py --documents 270      # the whole corpus (quantiles)
    python bench/bench_entropy.py --device cuda --threads 0

``--device auto`` (the default) scores on the GPU when one is present, writing
``bench/results/bench_entropy_cuda.json`` there.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import RESULTS  # noqa: E402
from megatron_rpt.cli import FlagParser  # noqa: E402


def machine() -> dict:
    """Short description of where the numbers came from."""
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "memory_gib": mem,
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1min": round(os.getloadavg()[0], 2),  # shared hosts: context for the numbers
    }


def main() -> int:
    """Run the benchmark and write the JSON result."""
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: leave as is)")
    parser.add_argument(
        "--out", default=None, help="default: bench/results/bench_entropy[_cuda].json"
    )
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    suffix = "" if args.device == "cpu" else "_cuda"
    args.out = args.out or str(RESULTS / f"bench_entropy{suffix}.json")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from megatron_rpt.assets import champ_documents, smollm2_dir
    from megatron_rpt.data.entropy import EntropyScorer

    load_start = round(os.getloadavg()[0], 2)
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    texts = [d.text for d in champ_documents()[: args.documents]]
    docs = [np.asarray(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    n_tokens = sum(len(d) for d in docs)
    rows, scores, ref_scores = [], None, None
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    # The reference (first row): one forward per document, no packing; same scorer code.
    for budget in ["per_document", *args.batch_tokens]:
        scorer = EntropyScorer.from_pretrained(
            smollm2_dir(), vocab_size=len(tok), device=args.device,
            batch_tokens=2048 if budget == "per_document" else budget,
        )  # fmt: skip
        scorer.score_documents(docs[:1])  # warm-up
        sync()
        start = time.perf_counter()
        if budget == "per_document":
            scores = [s for d in docs for s in scorer.score_documents([d])]
        else:
            scores = scorer.score_documents(docs)
        sync()
        seconds = time.perf_counter() - start
        ref_scores = ref_scores or scores
        rows.append(
            {
                "batch_tokens": budget,
                "documents": len(docs),
                "tokens": n_tokens,
                "seconds": round(seconds, 2),
                "tokens_per_second": round(n_tokens / seconds, 1),
                "forward_calls": scorer.forward_calls - 1,
                "vs_per_document": round(rows[0]["seconds"] / seconds, 3) if rows else 1.0,
                "max_abs_diff_vs_per_document": float(
                    max(
                        np.nanmax(np.abs(a - b), initial=0.0)
                        for a, b in zip(scores, ref_scores, strict=True)
                    )
                ),
            }
        )
    values = np.concatenate([s[np.isfinite(s)] for s in scores])
    qs = [0.05, 0.1, 0.25, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95]
    dist = {
        "positions": int(values.size),
        "mean": round(float(values.mean()), 4),
        "quantiles": {
            f"p{round(q * 100)}": round(float(v), 4)
            for q, v in zip(qs, np.quantile(values, qs), strict=True)
        },
        "fraction_at_least": {
            str(t): round(float((values >= t).mean()), 4) for t in (0.5, 1.0, 1.5, 2.0)
        },
    }
    result = {
        "benchmark": "entropy_scoring",
        "model": "SmolLM2-135M-Instruct (fp32)",
        "top_k": 16,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": {**machine(), "load_average_1min_start": load_start},
        "date": time.strftime("%Y-%m-%d"),
        "runs": rows,
        "entropy_distribution": dist,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"entropy scoring, SmolLM2-135M fp32, top-16, device {args.device}, "
        f"{torch.get_num_threads()} threads, {len(docs)} CHAMP documents ({n_tokens} tokens)"
    )
    print(f"{'batch_tokens':>12} {'seconds':>8} {'tokens/s':>9} {'forwards':>8} {'vs per-doc':>10}")
    for r in rows:
        print(
            f"{r['batch_tokens']:>12} {r['seconds']:>8.2f} {r['tokens_per_second']:>9.1f} "
            f"{r['forward_calls']:>8} {r['vs_per_document']:>10.2f}"
        )
    print(
        "entropy quantiles (nats): "
        + "  ".join(f"{k} {v:.2f}" for k, v in dist["quantiles"].items())
    )
    print(
        "fraction >= threshold   : "
        + "  ".join(f"{k}: {v:.1%}" for k, v in dist["fraction_at_least"].items())
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
