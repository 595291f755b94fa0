"""Render an ``EvalRun``: a JSON file (everything), a Markdown table in the layout of the RPT
paper's Table 1 (rows = mode x model, columns = Easy / Medium / Hard / mean), and a bar chart.

Written atomically into one output directory::

    <out>/eval.json     results per model / mode / metric / bucket (value, n, Wilson 95 % CI),
                        the positions, the settings, library versions and the date
    <out>/table.md      the table (values in %, 95 % interval in brackets) + how to read it
    <out>/accuracy.png  grouped bars per bucket with the 95 % intervals

``flat_metrics`` gives the same numbers as ``eval/<series>/<bucket>`` keys (fractions in
[0, 1]): the names the trainer logs to ``metrics.jsonl`` and ``scaling.read_metrics_jsonl``
reads back. ``<series>`` is ``standard``, ``reasoning`` (Random@1) or ``reasoning_pass@k``.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from megatron_rpt.config_utils import to_dict
from megatron_rpt.data.types import BUCKETS
from megatron_rpt.eval.metrics import bucket_masks
from megatron_rpt.eval.runner import EvalRun, ModelResult
from megatron_rpt.fileio import atomic_output_dir

FORMAT = "megatron_rpt.eval_results"
FORMAT_VERSION = 1
JSON_FILE, TABLE_FILE, CHART_FILE = "eval.json", "table.md", "accuracy.png"

_MODE_LABEL = {"accuracy": "standard NTP", "random@1": "next-token reasoning, Random@1"}


def series_name(result: ModelResult) -> str:
    """``standard``, ``reasoning`` or ``reasoning_pass@k`` (the metrics.jsonl key part)."""
    if result.mode == "standard":
        return "standard"
    return "reasoning" if result.metric == "random@1" else f"reasoning_{result.metric}"


def row_label(result: ModelResult) -> str:
    """Mode column of the table, e.g. 'next-token reasoning, Pass@8'."""
    if result.metric in _MODE_LABEL:
        return _MODE_LABEL[result.metric]
    return f"next-token reasoning, {result.metric.replace('pass', 'Pass')}"


def flat_metrics(run: EvalRun, prefix: str = "eval") -> dict[str, float]:
    """``{"eval/<series>/<bucket>": fraction}`` for every model's rows (single-model runs).

    With several models the key gets the model name: ``eval/<model>/<series>/<bucket>``.
    """
    several = len({r.model for r in run.results}) > 1
    out: dict[str, float] = {}
    for r in run.results:
        head = f"{prefix}/{r.model}" if several else prefix
        for bucket in (*BUCKETS, "all"):
            value = r.buckets[bucket].value
            if not math.isnan(value):
                out[f"{head}/{series_name(r)}/{bucket}"] = value
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "megatron-core", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        root = Path(__file__).resolve().parents[2]
        out["megatron_rpt_commit"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except Exception:  # noqa: BLE001 - not a checkout, or no git: the version is unknown
        out["megatron_rpt_commit"] = "unknown"
    return out


def _positions(s: Any, thresholds: tuple[float, ...]) -> dict[str, int]:
    return {k: int(v.sum()) for k, v in bucket_masks(s.entropy_P, thresholds).items()}


def run_to_json(run: EvalRun, *, models: list[Any], extra: dict | None = None) -> dict[str, Any]:
    """Everything about ``run`` as a JSON-ready dict (see the module docstring)."""
    t = tuple(run.config.difficulty_thresholds)
    s = run.standard_set
    data = {
        "source": s.source,
        "tokenizer": s.tokenizer_name,
        "tokenizer_digest": s.tokenizer_digest,
        "entropy_source": s.entropy_source,
        "difficulty_thresholds": list(t),
        "buckets": "nested: a position is in every bucket whose threshold its entropy exceeds",
        "documents": int(len(set(s.doc_P.tolist()))),
        "positions_standard": _positions(s, t) if run.has_standard else None,
        "positions_reasoning": _positions(run.reasoning_set, t) if run.reasoning_set else None,
        "context_tokens": s.context_tokens,
        "continuation_tokens": s.continuation_tokens,
    }
    results = [
        {
            "model": r.model,
            "path": r.path,
            "mode": r.mode,
            "metric": r.metric,
            "mean": None if math.isnan(r.mean) else r.mean,
            "buckets": {k: v.to_dict() for k, v in r.buckets.items()},
            "extra": r.extra,
        }
        for r in run.results
    ]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "device": run.device,
        "engine": run.engine,
        "seconds": round(run.seconds, 2),
        "data": data,
        "models": [{"name": m.name, "path": m.path, "kind": m.kind} for m in models],
        "settings": {"eval": to_dict(run.config), "prompt": to_dict(run.prompt), **(extra or {})},
        "ci_method": "Wilson score 95% over positions (p = mean per-position score)",
        "results": results,
        "metrics": flat_metrics(run),
    }


def _cell(r: ModelResult, bucket: str) -> str:
    b = r.buckets[bucket]
    if math.isnan(b.value):
        return "–"
    return f"{100 * b.value:.2f} [{100 * b.ci95[0]:.1f}, {100 * b.ci95[1]:.1f}]"


def markdown_table(run: EvalRun) -> str:
    """The paper's Table 1 layout, values in %, Wilson 95 % intervals in brackets."""
    t = run.config.difficulty_thresholds
    lines = [
        "| mode | model | Easy | Medium | Hard | mean |",
        "|---|---|---|---|---|---|",
    ]
    completion = run.prompt.mode == "completion"
    for r in run.results:
        mean = "–" if math.isnan(r.mean) else f"{100 * r.mean:.2f}"
        cells = " | ".join(_cell(r, b) for b in BUCKETS)
        label = row_label(r)
        if completion and r.mode == "reasoning":  # no reasoning: the sampled next token
            label = label.replace("next-token reasoning", "sampled next token (completion)")
        lines.append(f"| {label} | {r.model} | {cells} | {mean} |")
    lines += [
        "",
        f"Accuracy in %, [95 % Wilson interval over positions]. Buckets are nested: entropy > "
        f"{t[0]:g} / {t[1]:g} / {t[2]:g} nats under {run.standard_set.entropy_source}. "
        "mean = unweighted mean of Easy, Medium, Hard.",
    ]
    if run.has_standard:
        std = _positions(run.standard_set, t)
        lines.append(
            f"Positions, standard: easy {std['easy']}, medium {std['medium']}, hard {std['hard']} "
            f"(all {std['all']}) from {run.standard_set.source}."
        )
    if run.reasoning_set is not None:
        rs = _positions(run.reasoning_set, t)
        c = run.config
        lines.append(
            f"Positions, reasoning: easy {rs['easy']}, medium {rs['medium']}, hard {rs['hard']} "
            f"(all {rs['all']}) from {run.standard_set.source}; "
            f"{'completion prompt' if completion else 'template ' + (c.template or run.prompt.template)}, {c.n_samples} samples at temperature {c.temperature:g}, max {c.max_new_tokens} new tokens, "
            f"judge {c.judge}, {run.engine} engine, seed {c.seed}."
        )
    return "\n".join(lines) + "\n"


def bar_chart(run: EvalRun, path: str | Path) -> None:
    """Grouped bars: x = Easy / Medium / Hard / mean, one bar per table row, 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = ["Easy", "Medium", "Hard", "mean"]
    rows = run.results
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 1.4 * len(rows)), 4.2), dpi=130)
    colors = plt.get_cmap("tab10")
    top = 0.0
    for j, r in enumerate(rows):
        vals = [r.buckets[b].value for b in BUCKETS] + [r.mean]
        vals = [100 * v if not math.isnan(v) else 0.0 for v in vals]
        lo = [100 * (r.buckets[b].value - r.buckets[b].ci95[0]) for b in BUCKETS] + [0.0]
        hi = [100 * (r.buckets[b].ci95[1] - r.buckets[b].value) for b in BUCKETS] + [0.0]
        err = np.nan_to_num(np.array([lo, hi]))
        x = np.arange(len(groups)) + (j - (len(rows) - 1) / 2) * width
        ax.bar(x, vals, width, color=colors(j % 10), label=f"{r.model}: {row_label(r)}")
        ax.errorbar(x[:3], vals[:3], yerr=err[:, :3], fmt="none", ecolor="0.35", capsize=3, lw=0.8)
        for xi, v in zip(x, vals, strict=True):  # the value sits on its bar, over the whisker
            ax.text(xi, v + 0.4, f"{v:.1f}", ha="center", va="bottom", fontsize=7,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})  # fmt: skip
        top = max(top, max(v + e for v, e in zip(vals, err[1], strict=True)))
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("next-token accuracy (%)")
    ax.set_ylim(0, max(5.0, top * 1.25))
    t = run.config.difficulty_thresholds
    ax.set_title(f"Next-token accuracy by difficulty (entropy > {t[0]:g} / {t[1]:g} / {t[2]:g})",
                 fontsize=10)  # fmt: skip
    ax.legend(fontsize=7, loc="upper right", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    run: EvalRun,
    out_dir: str | Path,
    *,
    models: list[Any],
    overwrite: bool = False,
    extra: dict | None = None,
) -> dict[str, Path]:
    """Write eval.json, table.md and accuracy.png into ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        doc = run_to_json(run, models=models, extra=extra)
        (tmp / JSON_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        (tmp / TABLE_FILE).write_text(markdown_table(run))
        bar_chart(run, tmp / CHART_FILE)
    return {name: out_dir / name for name in (JSON_FILE, TABLE_FILE, CHART_FILE)}


__all__ = [
    "FORMAT",
    "bar_chart",
    "flat_metrics",
    "markdown_table",
    "row_label",
    "run_to_json",
    "series_name",
    "write_report",
]
