"""Reduce the loss metrics over micro-batches and ranks, then turn sums into means.

The loss functions return dicts of scalar tensors named by how they combine:

* ``*_max`` / ``*_min``: extrema (identity -inf / +inf for an empty micro-batch);
* ``loss``: already globally normalised, so the global loss is the plain sum;
* everything else (``*_sum``, ``*_count``, ``num_tokens``): additive.

``accumulate_metrics`` folds micro-batches together on one rank, ``all_reduce_metrics`` does
the same across a process group (DP, or the last pipeline stage's DP group) with two
collectives (in fp64: a few scalars, and sums over millions of tokens stay accurate), and
``finalize_metrics`` divides sums and counts by ``num_tokens``:

>>> m = {"num_tokens": torch.tensor(4.0), "ratio_sum": torch.tensor(4.5),
...      "pg_clipped_count": torch.tensor(1.0), "ratio_max": torch.tensor(1.5),
...      "loss": torch.tensor(-0.25)}
>>> finalize_metrics(m)
{'num_tokens': 4.0, 'ratio': 1.125, 'pg_clipped_frac': 0.25, 'ratio_max': 1.5, 'loss': -0.25}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist


def _kind(name: str) -> str:
    if name.endswith("_max"):
        return "max"
    if name.endswith("_min"):
        return "min"
    return "sum"


def accumulate_metrics(
    per_micro_batch: Iterable[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Combine the metric dicts of several micro-batches (sum, max or min per key)."""
    out: dict[str, torch.Tensor] = {}
    for metrics in per_micro_batch:
        for name, value in metrics.items():
            value = value.detach().double()
            if name not in out:
                out[name] = value.clone()
            elif _kind(name) == "max":
                out[name] = torch.maximum(out[name], value)
            elif _kind(name) == "min":
                out[name] = torch.minimum(out[name], value)
            else:
                out[name] = out[name] + value
    return out


def all_reduce_metrics(
    metrics: Mapping[str, torch.Tensor], group: dist.ProcessGroup | None
) -> dict[str, torch.Tensor]:
    """All-reduce a metric dict over ``group`` (None: no-op). Every rank must pass the same keys."""
    if group is None or dist.get_world_size(group) == 1:
        return {k: v.detach().double() for k, v in metrics.items()}
    names = sorted(metrics)
    sum_names = [n for n in names if _kind(n) == "sum"]
    # max and min share one MAX all-reduce: min(x) = -max(-x).
    ext_names = [n for n in names if _kind(n) != "sum"]
    sums = torch.stack(
        [metrics[n].detach().double().reshape(()) for n in sum_names] or [torch.zeros(())]
    )
    ext = torch.stack(
        [
            metrics[n].detach().double().reshape(()) * (1.0 if _kind(n) == "max" else -1.0)
            for n in ext_names
        ]
        or [torch.zeros(())]
    )
    sums, ext = sums.contiguous(), ext.contiguous()  # gloo silently corrupts views
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(ext, op=dist.ReduceOp.MAX, group=group)
    out = {n: sums[i] for i, n in enumerate(sum_names)}
    out.update({n: ext[i] * (1.0 if _kind(n) == "max" else -1.0) for i, n in enumerate(ext_names)})
    return out


def finalize_metrics(metrics: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Python floats for logging: ``x_sum`` -> mean ``x``, ``x_count`` -> fraction ``x_frac``."""
    num_tokens = float(metrics.get("num_tokens", torch.tensor(0.0)))
    denom = max(num_tokens, 1.0)
    out: dict[str, float] = {}
    for name, value in metrics.items():
        v = float(value)
        if name.endswith("_sum"):
            out[name[: -len("_sum")]] = v / denom
        elif name.endswith("_count"):
            out[name[: -len("_count")] + "_frac"] = v / denom
        else:
            out[name] = v
    return out
