"""Prefix-cache reuse of the document-grouped request order vs a random order (CPU, no engine).

Requests are built the way RPT builds them, from the embedded CHAMP corpus and the real SmolLM2
tokenizer: ``instruction + document[:t] + suffix`` for ``POSITIONS`` target positions t spread
over each document (left-truncated to ``CONTEXT_TOKENS``), G = 8 samples each. Each order is
replayed through ``megatron_rpt.rollout.scheduling.prefix_reuse`` (a radix cache with LRU
eviction that also stores every sample's generated tokens) at several cache capacities; the
random order is averaged over 3 shuffles. Run: ``python bench/bench_prefix_schedule.py``.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_result  # noqa: E402
from megatron_rpt.assets import champ_documents, smollm2_dir  # noqa: E402
from megatron_rpt.rollout.scheduling import RolloutRequest, document_order, prefix_reuse  # noqa: E402

G = 8
POSITIONS = 4
CONTEXT_TOKENS = 3840
RESPONSE_TOKENS = 512
CAPACITIES = [None, 262_144, 65_536, 16_384]
INSTRUCTION = (
    "Complete the given text under <text> by predicting the next token. Think step by step "
    "inside <think> and </think>, then put the next token in \\boxed{}.\n<text>\n"
)
SUFFIX = "\n</text>\n<think>\n"


def build_requests() -> list[RolloutRequest]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    head, tail = tok.encode(INSTRUCTION), tok.encode(SUFFIX)
    reqs = []
    for doc in champ_documents():
        ids = tok.encode(doc.text)
        if len(ids) < 16:
            continue
        for k in range(1, POSITIONS + 1):
            t = 8 + (len(ids) - 8) * k // (POSITIONS + 1)
            ctx = ids[max(0, t - CONTEXT_TOKENS) : t]
            reqs.append(RolloutRequest(doc.doc_id, t, tuple(head + ctx + tail)))
    random.Random(0).shuffle(reqs)  # the order the data loader might produce
    return reqs


def main() -> None:
    reqs = build_requests()
    doc_order = [reqs[i].prompt_ids for i in document_order(reqs)]
    shuffles = []
    for seed in range(3):
        order = list(range(len(reqs)))
        random.Random(seed + 1).shuffle(order)
        shuffles.append([reqs[i].prompt_ids for i in order])
    rows = []
    for n in (1, G):
        for cap in CAPACITIES:
            t0 = time.perf_counter()
            kw = dict(n=n, capacity_tokens=cap, response_tokens=RESPONSE_TOKENS)
            grouped = prefix_reuse(doc_order, **kw)
            rand = [prefix_reuse(p, **kw) for p in shuffles]
            rand_prefill = statistics.mean(r.prompt_tokens - r.reused_tokens for r in rand)
            doc_prefill = grouped.prompt_tokens - grouped.reused_tokens
            rows.append({
                "G": n,
                "cache_tokens": "unbounded" if cap is None else cap,
                "hit_document": round(grouped.hit_rate, 4),
                "hit_random": round(statistics.mean(r.hit_rate for r in rand), 4),
                "hit_random_range": f"{min(r.hit_rate for r in rand):.4f}-{max(r.hit_rate for r in rand):.4f}",
                "prefill_document": doc_prefill,
                "prefill_random": round(rand_prefill),
                "prefill_ratio": round(rand_prefill / doc_prefill, 2),
                "seconds": round(time.perf_counter() - t0, 1),
            })  # fmt: skip
    total = sum(len(r.prompt_ids) for r in reqs) * G
    print(f"{len(reqs)} contexts x G={G}, {total:,} prompt tokens, {RESPONSE_TOKENS} response tokens/sample")
    print_table(rows)
    write_result(
        "prefix_schedule", rows, contexts=len(reqs), samples_per_context=G,
        prompt_tokens=total, response_tokens=RESPONSE_TOKENS, positions_per_document=POSITIONS,
    )  # fmt: skip


if __name__ == "__main__":
    main()
