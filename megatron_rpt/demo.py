# ruff: noqa: T201 - the demo talks to the console (tests/unit/test_architecture.py exempts it)
r"""``make demo`` (``python -m megatron_rpt.demo``): the RPT data path end to end, offline.

Until the trainer lands, this is what ``make demo`` runs, on the embedded default (SmolLM2-135M
as tokenizer, entropy proxy and policy; the CHAMP corpus):

1. prepare a small slice of CHAMP (``--documents``, 20 by default) into
   ``<run-dir>/data/champ-demo`` (reused when it already holds data prepared with the same
   settings);
2. pick a few training samples and build their v0 prompts (chat template + ``<think>`` opener);
3. sample completions from SmolLM2 with plain ``transformers`` ``generate`` (temperature 0.8,
   no top-k/top-p), a **temporary stand-in for the rollout engine**, which is not built yet;
4. score each completion with the paper's prefix-match reward and print the context tail, the
   true next tokens (exact bytes), each completion's parsed prediction and reward.

A 135M model rarely closes its reasoning and boxes the right token, so rewards are almost
always 0. For contrast the demo also scores a *reference* response built from the true next
token, ``</think> \boxed{<x_t>}``, which earns 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np

from megatron_rpt.config_utils import to_dict
from megatron_rpt.data.config import DataConfig, PromptConfig
from megatron_rpt.data.tokens import decode_utf8_trimmed

logger = logging.getLogger(__name__)


def demo_data_config(documents: int) -> DataConfig:
    """The small embedded-default DataConfig the demo prepares."""
    return DataConfig(corpus="embedded:champ", max_documents=documents, validation_fraction=0.1)


def ensure_prepared(cfg: DataConfig, out_dir: Path) -> None:
    """Prepare ``cfg`` into ``out_dir`` unless it already holds data made with ``cfg``."""
    from megatron_rpt.data.pipeline import prepare_data

    meta_file = out_dir / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("data_config") == json.loads(json.dumps(to_dict(cfg))):
            print(f"reusing prepared data in {out_dir}")
            return
    print(f"preparing {cfg.max_documents} CHAMP documents into {out_dir} ...")
    summary = prepare_data(cfg, out_dir, overwrite=True)
    print(summary.format_table(tuple(cfg.difficulty_thresholds)))


def reference_response(token_bytes: tuple[bytes, ...]) -> str:
    r"""``</think> \boxed{x}`` with x the shortest run of true tokens that is whole UTF-8 text.

    >>> reference_response((b" 4", b"}"))
    '</think> \\boxed{ 4}'
    >>> reference_response(("é".encode()[:1], "é".encode()[1:], b"!"))
    '</think> \\boxed{é}'
    """
    data = b""
    for tok in token_bytes:
        data += tok
        try:
            return "</think> \\boxed{" + data.decode("utf-8") + "}"
        except UnicodeDecodeError:
            continue
    return "</think> \\boxed{}"


def _generate(model, tokenizer, prompt_ids: list[int], n: int, max_new_tokens: int) -> list[str]:
    import torch

    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=0.8,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=n,
        pad_token_id=tokenizer.eos_token_id,
    )
    texts = []
    for row in out[:, ids.shape[1] :].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=False))
    return texts


def _pick_samples(store, n: int, rng: np.random.Generator) -> list[int]:
    """Up to ``n`` random samples, each from a different document when possible."""
    picks, docs = [], set()
    order = rng.permutation(len(store)).tolist()
    for i in order:
        doc = int(store.samples[i]["doc_index"])
        if doc not in docs:
            picks.append(i)
            docs.add(doc)
        if len(picks) == n:
            break
    return picks or order[:n]


def run(args: argparse.Namespace) -> None:
    """Prepare, sample, generate, score, print."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rpt.assets import smollm2_dir
    from megatron_rpt.data.prompt import build_prompt
    from megatron_rpt.data.store import SampleStore
    from megatron_rpt.reward import RewardTarget, extract_prediction, get_reward

    t0 = time.perf_counter()
    prepared = Path(args.run_dir) / "data" / "champ-demo"
    ensure_prepared(demo_data_config(args.documents), prepared)
    store = SampleStore.open(prepared, "train")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    store.check_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    reward = get_reward("prefix_match")
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    picks = _pick_samples(store, args.samples, rng)
    print(
        f"\n{len(store)} training samples; showing {len(picks)} with {args.completions} "
        f"completions each (SmolLM2 generate, temperature 0.8, {args.max_new_tokens} new tokens).\n"
        "A 135M model rarely closes </think> and boxes the right token, so expect rewards of 0;\n"
        "the 'reference' line scores a response built from the true next token (reward 1)."
    )
    total = []
    for n, i in enumerate(picks, 1):
        sample = store[i]
        prompt = build_prompt(store.context_text(sample), tokenizer, PromptConfig())
        responses = _generate(model, tokenizer, prompt.ids, args.completions, args.max_new_tokens)
        target = RewardTarget(
            continuation_token_bytes=sample.continuation_token_bytes,
            continuation_ids=tuple(sample.continuation_ids.tolist()),
        )
        rewards = reward(responses, target)
        total += rewards
        context = store.context_text(sample)
        print(
            f"\n== sample {n}/{len(picks)}: {sample.doc_id} position {sample.position}, "
            f"entropy {sample.entropy:.2f} nats (bucket: {sample.bucket}), "
            f"prompt {len(prompt.ids)} tokens"
        )
        print(f"context tail : {'...' if len(context) > 160 else ''}{context[-160:]!r}")
        print(
            f"true next    : {list(sample.continuation_token_bytes[:6])} "
            f"-> {decode_utf8_trimmed(b''.join(sample.continuation_token_bytes[:6]))!r}"
        )
        for j, (resp, r) in enumerate(zip(responses, rewards, strict=True), 1):
            pred = extract_prediction(resp)
            shown = "no </think> + \\boxed{}" if pred is None else repr(pred)
            print(
                f"  completion {j}: prediction {shown:<28} reward {r:.0f}   (ends: {resp[-60:]!r})"
            )
        ref = reference_response(sample.continuation_token_bytes)
        print(f"  reference   : {ref!r:<40} reward {reward([ref], target)[0]:.0f}")
    print(
        f"\nmean reward of sampled completions: {np.mean(total):.3f} "
        f"({int(np.sum(total))}/{len(total)}); total time {time.perf_counter() - t0:.0f} s"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m megatron_rpt.demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron_rpt.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--run-dir", default="runs/demo", help="where the prepared data goes")
    parser.add_argument("--documents", type=int, default=20, help="CHAMP documents to prepare")
    parser.add_argument("--samples", type=int, default=3, help="training samples to show")
    parser.add_argument("--completions", type=int, default=4, help="completions per sample")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per completion")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed")
    args = parser.parse_args(argv)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # IndexedDataset chatter
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    run(args)
    return 0


if __name__ == "__main__":
    from megatron_rpt.cli import run_cli

    run_cli(main)
