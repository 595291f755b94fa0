"""Peak memory and time of the log-prob (+ entropy) forward/backward: naive vs chunked fused.

Variants, each in a fresh subprocess so that its peak resident memory is its own:

* ``naive``: full logits ``[T, V]`` fp32 from the output GEMM, log_softmax, gather, entropy
  (no grad), backward through all of it (what slime/verl do before slicing);
* ``logits_chunked``: the same full logits, then ``logprobs_from_logits`` (chunked softmax);
* ``fused_C``: ``logprobs_from_hidden`` with chunk size C (output layer inside, logits
  recomputed per chunk in backward; never more than ``[C, V]`` at a time).

Peak memory is ``ru_maxrss`` of the subprocess minus its resident memory right before the
first forward (inputs, weight and imports excluded; the weight gradient, ``[V, H]`` fp32, is
included in every variant); on a GPU (``--device cuda``, the default when one is present) it
is ``torch.cuda.max_memory_allocated`` above the allocation before the first forward. Large tensors are mmapped by glibc and
torch's CPU allocator does not cache, so RSS follows live tensor memory. Time is the median
forward+backward over ``--reps`` runs after one warm-up. All variants must agree: the script
checks log-probs, entropy and the hidden/weight gradients against the naive ones.

Usage: ``python bench/bench_logprobs.py [--tokens 2048 --vocab 151936 --hidden 128]``
(on a GPU e.g. ``--tokens 8192 --hidden 5120``). Writes ``bench/results/logprobs_<device>.json``
and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_rpt.cli import FlagParser  # noqa: E402


def _child(args: argparse.Namespace) -> None:
    import psutil
    import torch

    sys.path.insert(0, str(ROOT))
    from megatron_rpt.loss.logprobs import (
        logprobs_from_hidden,
        logprobs_from_logits,
        naive_logprobs_entropy,
    )

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(args.tokens, args.hidden, generator=g) / args.hidden**0.5).to(args.device)
    weight = torch.randn(args.vocab, args.hidden, generator=g).to(args.device)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(args.device)
    g_lp = torch.randn(args.tokens, generator=g).to(args.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run(h, w, labels, g_lp):
        h.grad = w.grad = None
        if args.variant == "naive":
            lp, ent = naive_logprobs_entropy(h, w, labels)
            ent = ent.detach()
        elif args.variant == "logits_chunked":
            lp, ent = logprobs_from_logits(h @ w.t(), labels, chunk_size=args.chunk)
        else:
            lp, ent = logprobs_from_hidden(h, w, labels, chunk_size=args.chunk)
        (lp * g_lp).sum().backward()
        return lp.detach(), ent.detach(), h.grad, w.grad

    # A tiny call first, so lazily loaded kernels and thread pools are not counted as peak.
    run(hidden[:8].clone().requires_grad_(), weight[:64].clone().requires_grad_(),
        labels[:8] % 64, g_lp[:8])
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    base_rss = psutil.Process().memory_info().rss
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base_rss = torch.cuda.memory_allocated()
    times, out = [], None
    for _ in range(args.reps + 1):  # the first run is a warm-up
        out = None
        sync()
        start = time.perf_counter()
        out = run(hidden, weight, labels, g_lp)
        sync()
        times.append(time.perf_counter() - start)
    times = times[1:]
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out = tuple(t.cpu() for t in out)
    torch.save(dict(zip(("lp", "ent", "gh", "gw"), out, strict=True)), args.dump)
    json.dump(
        {"peak_extra_bytes": peak - base_rss, "base_rss_bytes": base_rss,
         "seconds_median": statistics.median(times), "seconds_all": times},
        sys.stdout,
    )


def _run_variant(args: argparse.Namespace, variant: str, chunk: int, dump: Path) -> dict:
    cmd = [
        sys.executable, __file__, "--child", "--variant", variant, "--chunk", str(chunk),
        "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
        "--reps", str(args.reps), "--threads", str(args.threads), "--dump", str(dump),
        "--device", args.device,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise SystemExit(f"{variant} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _max_diffs(ref_path: Path, path: Path) -> dict[str, float]:
    import torch

    ref = torch.load(ref_path, weights_only=True)
    got = torch.load(path, weights_only=True)
    return {k: float((got[k] - ref[k]).abs().max()) for k in ref}


def main() -> None:
    p = FlagParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--chunks", default="256,1024", help="chunk sizes of the fused variant")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--out", default=None, help="default: bench/results/logprobs_<device>.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="naive", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--dump", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        return _child(args)
    sys.path.insert(0, str(ROOT))
    from bench.common import RESULTS

    args.out = args.out or str(RESULTS / f"logprobs_{args.device}.json")

    chunks = [int(c) for c in args.chunks.split(",")]
    plan = [("naive", 0), ("logits_chunked", chunks[-1])] + [("fused", c) for c in chunks]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, chunk in plan:
            name = variant if variant == "naive" else f"{variant}_{chunk}"
            dump = Path(tmp) / f"{name}.pt"
            r = _run_variant(args, variant, chunk, dump)
            r.update(name=name, chunk=chunk or None)
            r["max_abs_diff_vs_naive"] = _max_diffs(Path(tmp) / "naive.pt", dump)
            rows.append(r)
    naive = rows[0]
    for r in rows:
        r["memory_ratio_naive_over_this"] = naive["peak_extra_bytes"] / r["peak_extra_bytes"]
        r["time_ratio_this_over_naive"] = r["seconds_median"] / naive["seconds_median"]
    result = {
        "benchmark": "log-prob + entropy forward/backward, fp32, single rank (tp=1)",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
                   f"{args.threads}",
        "device": args.device if args.device == "cpu" else __import__("torch").cuda.get_device_name(0),
        "torch": __import__("torch").__version__,
        "shape": {"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden},
        "full_logits_fp32_bytes": args.tokens * args.vocab * 4,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    gib = 2**30
    print(f"T={args.tokens} V={args.vocab} H={args.hidden} fp32; full [T,V] logits = "
          f"{result['full_logits_fp32_bytes'] / gib:.2f} GiB")
    print(f"{'variant':<22}{'peak extra GiB':>15}{'mem ratio':>11}{'time s':>9}"
          f"{'time ratio':>12}{'max|dlogp|':>12}{'max|dgW|':>11}")
    for r in rows:
        d = r["max_abs_diff_vs_naive"]
        print(f"{r['name']:<22}{r['peak_extra_bytes'] / gib:>15.2f}"
              f"{r['memory_ratio_naive_over_this']:>11.2f}{r['seconds_median']:>9.2f}"
              f"{r['time_ratio_this_over_naive']:>12.2f}{d['lp']:>12.1e}{d['gw']:>11.1e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
