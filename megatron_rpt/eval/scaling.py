r"""Scaling curves: fit next-token accuracy against training compute, P(C) = A / C^α + P*.

The RPT paper (Sec. 4.2, Fig. 5) fits this law per difficulty bucket to checkpoints at 100 to
1,200 steps (R² 0.995 / 0.997 / 0.989) without reporting A, α, P*. With accuracy rising with
compute, A < 0 and P* is the accuracy the law approaches at infinite compute.

Fitting (numpy only). Compute is rescaled to x = C / C_ref with C_ref the geometric mean of the
points, so the numbers stay O(1) (C ~ 1e20 would make C^-α underflow-prone and A astronomically
large); then P = a·x^-α + P* with A = a·C_ref^α. For a fixed α the model is linear in (a, P*),
so the fit is a 1-D problem (variable projection):

1. profile SSE(α) = min over (a, P*) of the squared error (a 2-column least squares) on a
   log-spaced grid of α in ``alpha_range``;
2. golden-section search on log α between the best grid point's neighbours;
3. a few Levenberg-Marquardt steps on (a, α, P*) jointly (kept only if they lower the SSE),
   whose Jacobian also gives standard errors (s² (JᵀJ)⁻¹, s² = SSE / (n - 3)).

At least 4 points with distinct compute are required (3 parameters; 4 leave one degree of
freedom for R²). R² = 1 - SSE / SST.

Inputs (``tools/fit_scaling.py``):

* the trainer's ``metrics.jsonl``: one JSON object per line; lines that carry the accuracy keys
  are points. Default keys: compute = ``flops/train_cumulative`` + ``flops/rollout_cumulative``
  (``--compute train|rollout|total``; key names configurable), accuracy =
  ``eval/reasoning/{bucket}`` for bucket in easy / medium / hard (fractions in [0, 1]; the
  names ``report.flat_metrics`` produces: ``eval/standard/...``, ``eval/reasoning/...``
  (Random@1), ``eval/reasoning_pass@8/...``);
* or several ``eval.json`` files from ``tools/eval_next_token.py``, each with its compute.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_rpt.data.types import BUCKETS
from megatron_rpt.errors import InputError
from megatron_rpt.fileio import atomic_output_dir

logger = logging.getLogger(__name__)

MIN_POINTS = 4
TRAIN_KEY = "flops/train_cumulative"
ROLLOUT_KEY = "flops/rollout_cumulative"
Points = dict[str, tuple[np.ndarray, np.ndarray]]
"""bucket -> (compute C [n], accuracy P [n])."""


@dataclass(frozen=True)
class ScalingFit:
    """P(C) = A / C^alpha + P* fitted to the points of one bucket."""

    A: float
    alpha: float
    p_star: float
    r2: float
    n_points: int
    c_ref: float
    """Reference compute (geometric mean of the points); A = a_ref * c_ref^alpha."""
    a_ref: float
    """A / c_ref^alpha: the curve's offset from P* at C = c_ref."""
    stderr: dict[str, float]
    """Standard errors of A_at_C_ref, alpha, P_star from the final Jacobian, s² (JᵀJ)⁻¹."""

    def predict(self, compute: np.ndarray | float) -> np.ndarray:
        """P(C) at the given compute values."""
        x = np.asarray(compute, dtype=np.float64) / self.c_ref
        return self.a_ref * x ** (-self.alpha) + self.p_star

    def to_dict(self) -> dict[str, float | int | dict]:
        """JSON-ready dict."""
        return {
            "A": self.A, "alpha": self.alpha, "P_star": self.p_star, "R2": self.r2,
            "n_points": self.n_points, "C_ref": self.c_ref, "A_at_C_ref": self.a_ref,
            "stderr": self.stderr,
        }  # fmt: skip


def _linear(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """(a, p, sse) of the least-squares fit y = a x^-alpha + p at a fixed alpha."""
    basis = np.stack([x ** (-alpha), np.ones_like(x)], axis=1)
    (a, p), *_ = np.linalg.lstsq(basis, y, rcond=None)
    r = basis @ np.array([a, p]) - y
    return float(a), float(p), float(r @ r)


def _golden(f, lo: float, hi: float, tol: float = 1e-12, max_iter: int = 200) -> float:  # noqa: ANN001
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(max_iter):
        if abs(hi - lo) < tol * (1 + abs(lo) + abs(hi)):
            break
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = f(d)
    return (lo + hi) / 2


def _lm(
    x: np.ndarray, y: np.ndarray, theta: np.ndarray, steps: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg-Marquardt on (a, alpha, p); returns (theta, Jacobian at theta)."""

    def resid_jac(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, alpha, p = t
        xa = x ** (-alpha)
        jac = np.stack([xa, -a * np.log(x) * xa, np.ones_like(x)], axis=1)
        return a * xa + p - y, jac

    r, jac = resid_jac(theta)
    sse, lam = float(r @ r), 1e-3
    for _ in range(steps):
        jtj, g = jac.T @ jac, jac.T @ r
        try:
            step = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-30), -g)
        except np.linalg.LinAlgError:
            break
        cand = theta + step
        if cand[1] <= 0:
            lam *= 10
            continue
        r2, jac2 = resid_jac(cand)
        if float(r2 @ r2) < sse:
            theta, r, jac, sse, lam = cand, r2, jac2, float(r2 @ r2), lam / 10
            if np.linalg.norm(step) < 1e-14 * (1 + np.linalg.norm(theta)):
                break
        else:
            lam *= 10
    return theta, jac


def fit_power_law(
    compute: Sequence[float] | np.ndarray,
    accuracy: Sequence[float] | np.ndarray,
    *,
    label: str = "points",
    alpha_range: tuple[float, float] = (1e-4, 5.0),
    grid: int = 400,
) -> ScalingFit:
    """Fit P(C) = A / C^alpha + P* (module docstring); InputError for unusable points."""
    c = np.asarray(compute, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    if c.shape != y.shape or c.ndim != 1:
        raise InputError(f"{label}: compute and accuracy must be 1-D and equally long")
    if not (np.isfinite(c).all() and np.isfinite(y).all()) or (c <= 0).any():
        raise InputError(f"{label}: compute must be finite and > 0, accuracy finite")
    if len(np.unique(c)) < MIN_POINTS:
        raise InputError(
            f"{label}: a scaling fit needs at least {MIN_POINTS} points with distinct compute "
            f"(3 parameters + 1 degree of freedom), got {len(np.unique(c))}"
        )
    c_ref = float(np.exp(np.log(c).mean()))
    x = c / c_ref
    alphas = np.geomspace(*alpha_range, grid)
    sses = np.array([_linear(x, y, a)[2] for a in alphas])
    i = int(np.argmin(sses))
    if i in (0, grid - 1):
        logger.warning(
            "%s: the best alpha %.3g is at the search bound %s", label, alphas[i], alpha_range
        )
    lo, hi = np.log(alphas[max(i - 1, 0)]), np.log(alphas[min(i + 1, grid - 1)])
    log_alpha = _golden(lambda la: _linear(x, y, math.exp(la))[2], lo, hi)
    alpha = math.exp(log_alpha)
    a, p, sse = _linear(x, y, alpha)
    theta, jac = _lm(x, y, np.array([a, alpha, p]))
    a, alpha, p = (float(v) for v in theta)
    resid = a * x ** (-alpha) + p - y
    sse = float(resid @ resid)
    sst = float(((y - y.mean()) ** 2).sum())
    n = len(y)
    cov = (sse / (n - 3)) * np.linalg.pinv(jac.T @ jac)
    err = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    return ScalingFit(
        A=a * c_ref**alpha,
        alpha=alpha,
        p_star=p,
        r2=1.0 - sse / sst if sst > 0 else math.nan,
        n_points=n,
        c_ref=c_ref,
        a_ref=a,
        stderr={"A_at_C_ref": float(err[0]), "alpha": float(err[1]), "P_star": float(err[2])},
    )


# ----------------------------------------------------------------------------- readers


def read_metrics_jsonl(
    path: str | Path,
    *,
    compute: str = "total",
    accuracy_key: str = "eval/reasoning/{bucket}",
    train_key: str = TRAIN_KEY,
    rollout_key: str = ROLLOUT_KEY,
    buckets: Sequence[str] = BUCKETS,
) -> Points:
    """Points per bucket from a trainer ``metrics.jsonl`` (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: metrics file not found")
    keys = {"train": [train_key], "rollout": [rollout_key], "total": [train_key, rollout_key]}
    if compute not in keys:
        raise InputError(f"--compute {compute!r}: expected train, rollout or total")
    pts: dict[str, tuple[list[float], list[float]]] = {b: ([], []) for b in buckets}
    seen_eval: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            seen_eval.update(k for k in rec if k.startswith("eval/"))
            for b in buckets:
                key = accuracy_key.format(bucket=b)
                if key not in rec:
                    continue
                missing = [k for k in keys[compute] if k not in rec]
                if missing:
                    raise InputError(f"{path}:{lineno}: has {key} but not {missing[0]}")
                pts[b][0].append(sum(float(rec[k]) for k in keys[compute]))
                pts[b][1].append(float(rec[key]))
    if not any(pts[b][0] for b in buckets):
        found = ", ".join(sorted(seen_eval)[:8]) or "none"
        raise InputError(
            f"{path}: no line has {accuracy_key.format(bucket=buckets[0])!r} (eval keys found: "
            f"{found}); choose them with --accuracy-key"
        )
    return {b: (np.array(c), np.array(p)) for b, (c, p) in pts.items() if c}


def read_eval_points(
    points: Sequence[tuple[float, str | Path]],
    *,
    model: str | None = None,
    series: str = "reasoning",
    buckets: Sequence[str] = BUCKETS,
) -> Points:
    """Points from ``(compute, eval.json)`` pairs: the ``series`` row of ``model`` in each."""
    from megatron_rpt.eval.report import FORMAT

    pts: dict[str, tuple[list[float], list[float]]] = {b: ([], []) for b in buckets}
    for flops, file in points:
        file = Path(file)
        if not file.is_file():
            raise InputError(f"{file}: eval result not found")
        doc = json.loads(file.read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT:
            raise InputError(f"{file}: not an eval result of tools/eval_next_token.py")
        row = _pick_row(doc["results"], file, model, series)
        for b in buckets:
            value = row["buckets"][b]["value"]
            if value is not None:
                pts[b][0].append(float(flops))
                pts[b][1].append(float(value))
    return {b: (np.array(c), np.array(p)) for b, (c, p) in pts.items() if c}


def _pick_row(results: list[dict], file: Path, model: str | None, series: str) -> dict:
    from megatron_rpt.eval.report import series_name
    from megatron_rpt.eval.runner import ModelResult

    def series_of(r: dict) -> str:
        return series_name(ModelResult(r["model"], r["path"], r["mode"], r["metric"], {}))

    names = sorted({r["model"] for r in results})
    if model is None and len(names) > 1:
        raise InputError(f"{file}: holds models {names}; pick one with --model")
    rows = [r for r in results if (model is None or r["model"] == model) and series_of(r) == series]
    if not rows:
        have = sorted({f"{r['model']}:{series_of(r)}" for r in results})
        raise InputError(
            f"{file}: no {series!r} result for model {model or names[0]!r} (has {have})"
        )
    return rows[0]


# ----------------------------------------------------------------------------- plot


def plot_fits(points: Points, fits: dict[str, ScalingFit], path: str | Path, *, title: str) -> None:
    """Points and fitted curves per bucket, log-scale compute axis, accuracy in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=130)
    colors = {"easy": "tab:green", "medium": "tab:orange", "hard": "tab:red"}
    lo = min(float(c.min()) for c, _ in points.values())
    hi = max(float(c.max()) for c, _ in points.values())
    grid = np.geomspace(lo / 1.5, hi * 1.5, 200)
    for b, (c, p) in points.items():
        color = colors.get(b, None)
        ax.scatter(c, 100 * p, color=color, zorder=3, s=22)
        if b in fits:
            f = fits[b]
            label = f"{b.capitalize()}: α={f.alpha:.3g}, P*={100 * f.p_star:.1f}%, R²={f.r2:.3f}"
            ax.plot(grid, 100 * f.predict(grid), color=color, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("next-token accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(True, which="major", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fits_table(fits: dict[str, ScalingFit]) -> str:
    """Markdown table of the fitted parameters."""
    lines = ["| bucket | A | α | P* (%) | R² | points |", "|---|---|---|---|---|---|"]
    for b, f in fits.items():
        lines.append(
            f"| {b} | {f.A:.4g} | {f.alpha:.4g} ± {f.stderr['alpha']:.2g} | "
            f"{100 * f.p_star:.2f} ± {100 * f.stderr['P_star']:.2g} | {f.r2:.4f} | {f.n_points} |"
        )
    return "\n".join(lines) + "\n"


def fit_all(points: Points) -> dict[str, ScalingFit]:
    """Fit every bucket of ``points``; errors name the bucket."""
    return {b: fit_power_law(c, p, label=f"bucket {b}") for b, (c, p) in points.items()}


def write_scaling_report(
    points: Points,
    fits: dict[str, ScalingFit],
    out_dir: str | Path,
    *,
    title: str,
    source: dict,
    overwrite: bool = False,
) -> dict[str, Path]:
    """``scaling.json`` (fits + points + source), ``scaling.md`` and ``scaling.png``."""
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        doc = {
            "law": "P(C) = A / C^alpha + P_star",
            "source": source,
            "fits": {b: f.to_dict() for b, f in fits.items()},
            "points": {
                b: {"compute": c.tolist(), "accuracy": p.tolist()} for b, (c, p) in points.items()
            },
        }
        (tmp / "scaling.json").write_text(json.dumps(doc, indent=2) + "\n")
        (tmp / "scaling.md").write_text(fits_table(fits))
        plot_fits(points, fits, tmp / "scaling.png", title=title)
    return {n: out_dir / n for n in ("scaling.json", "scaling.md", "scaling.png")}


__all__ = [
    "MIN_POINTS",
    "Points",
    "ScalingFit",
    "fit_all",
    "fit_power_law",
    "fits_table",
    "plot_fits",
    "read_eval_points",
    "read_metrics_jsonl",
    "write_scaling_report",
]
