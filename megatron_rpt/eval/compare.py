"""RPT vs RLP vs the NTP control, side by side: accuracy by difficulty, perplexity, FLOPs.

``compare_runs`` evaluates models (training run directories and, optionally, the base model)
on the same held-out data of one prepared directory and reports per model:

* **next-token accuracy by difficulty**: the standard (argmax) mode of the next-token eval
  (eval/runner.py) on the validation positions, bucketed easy / medium / hard by entropy;
* **held-out perplexity**: exp of the mean cross-entropy over every token (but each document's
  first) of the validation-split documents, in windows of ``window_tokens`` (consecutive
  windows overlap by one token, as the NTP control's training windows);
* **FLOPs spent**: the run's last ``metrics.jsonl`` record (``flops/total_cumulative`` and its
  parts: training, rollout, and RLP's scoring passes), with the objective and step count.

A run directory is evaluated at its latest checkpoint. Output: ``compare.json`` and
``compare.md`` (the table ``markdown`` renders).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from megatron_rpt.errors import DataError
from megatron_rpt.eval.models import ModelRef, materialize
from megatron_rpt.eval.next_token import load_causal_lm
from megatron_rpt.eval.runner import build_eval_set, evaluate, resolve_device
from megatron_rpt.trainer.run_logger import read_metrics

if TYPE_CHECKING:
    from megatron_rpt.data.config import DataConfig, PromptConfig
    from megatron_rpt.eval.config import EvalConfig

FLOP_KEYS = ("total", "train", "rollout", "score")


@dataclass
class Entry:
    """One model's row."""

    name: str
    path: str
    objective: str = "base"
    steps: int = 0
    flops: dict[str, float] = field(default_factory=dict)
    """total / train / rollout / score FLOPs spent by the run (empty for a base model)."""
    accuracy: dict[str, float] = field(default_factory=dict)
    """Standard next-token accuracy per bucket (easy / medium / hard / all), fractions."""
    perplexity: float = math.nan
    heldout_tokens: int = 0


def run_record(run_dir: str | Path) -> tuple[str, int, dict[str, float]]:
    """(objective, steps, FLOPs) of a training run from its config.yaml and metrics.jsonl."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise DataError(f"{run_dir}: no metrics.jsonl records (not a finished training run?)")
    last = records[-1]
    flops = {k: float(last.get(f"flops/{k}_cumulative", 0.0)) for k in FLOP_KEYS}
    objective = "rpt"
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        objective = yaml.safe_load(config.read_text())["train"].get("objective", "rpt")
    return objective, int(last["step"]), flops


@torch.no_grad()
def heldout_perplexity(
    hf_dir: str | Path, prepared_dir: str | Path, *, window_tokens: int = 256,
    device: str = "cpu",
) -> tuple[float, int]:  # fmt: skip
    """(perplexity, predicted tokens) of an HF model on the validation-split documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prepared_dir = Path(prepared_dir)
    tokens = IndexedDataset(str(prepared_dir / "tokens"), mmap=True)
    docs = [
        json.loads(line)["doc_index"]
        for line in open(prepared_dir / "documents.jsonl", encoding="utf-8")
        if json.loads(line)["split"] == "valid"
    ]
    if not docs:
        raise DataError(f"{prepared_dir}: no validation-split document for the perplexity")
    model = load_causal_lm(Path(hf_dir), dtype="float32", device=device)
    nll, count = 0.0, 0
    for doc in docs:
        ids = np.asarray(tokens.get(doc), dtype=np.int64)
        for start in range(0, max(len(ids) - 1, 0), window_tokens - 1):
            window = torch.from_numpy(ids[start : start + window_tokens])[None].to(device)
            if window.shape[1] < 2:
                continue
            logits = model(input_ids=window).logits.float()
            nll += float(
                torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
            )
            count += window.shape[1] - 1
    return math.exp(nll / max(count, 1)), count


def compare_runs(
    models: list[tuple[str, str]], prepared_dir: str | Path, *, eval_cfg: EvalConfig,
    data_cfg: DataConfig, prompt: PromptConfig, window_tokens: int = 256,
) -> list[Entry]:  # fmt: skip
    """Evaluate ``(name, run dir or model path)`` pairs on ``prepared_dir``'s validation data."""
    import dataclasses

    entries, refs = [], []
    for name, path in models:
        entry = Entry(name, path)
        if (Path(path) / "metrics.jsonl").is_file():
            entry.objective, entry.steps, entry.flops = run_record(path)
            path = str(Path(path) / "checkpoints")
        entries.append(entry)
        refs.append(ModelRef(name, path))
    cfg = dataclasses.replace(eval_cfg, mode="standard")
    eval_set = build_eval_set(refs, cfg, data_cfg, prepared_dir=str(prepared_dir))
    with materialize(refs) as resolved:
        run = evaluate(resolved, eval_set, cfg=cfg, prompt=prompt)
        by_name = {r.model: r for r in run.results if r.mode == "standard"}
        for entry, model in zip(entries, resolved, strict=True):
            result = by_name[entry.name]
            entry.accuracy = {b: s.value for b, s in result.buckets.items()}
            entry.perplexity, entry.heldout_tokens = heldout_perplexity(
                model.hf_dir, prepared_dir, window_tokens=window_tokens,
                device=resolve_device(cfg.device),
            )  # fmt: skip
    return entries


def markdown(entries: list[Entry]) -> str:
    """The side-by-side table (accuracy in %, FLOPs in scientific notation)."""
    head = ("| model | objective | steps | FLOPs total | train | rollout | RLP scoring | "
            "easy | medium | hard | all | held-out ppl |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for e in entries:
        flops = [f"{e.flops[k]:.3g}" if e.flops else "-" for k in FLOP_KEYS]
        acc = [f"{100 * e.accuracy.get(b, math.nan):.1f}" for b in ("easy", "medium", "hard", "all")]
        lines.append(
            f"| {e.name} | {e.objective} | {e.steps} | " + " | ".join(flops + acc)
            + f" | {e.perplexity:.3f} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def write_comparison(entries: list[Entry], out: str | Path) -> dict[str, Path]:
    """``compare.json`` and ``compare.md`` under ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"compare.json": out / "compare.json", "compare.md": out / "compare.md"}
    paths["compare.json"].write_text(json.dumps([asdict(e) for e in entries], indent=2) + "\n")
    paths["compare.md"].write_text(markdown(entries))
    return paths


__all__ = ["Entry", "compare_runs", "heldout_perplexity", "markdown", "run_record",
           "write_comparison"]  # fmt: skip
