"""Step metrics of a run: JSON lines, wandb, a console progress bar and the reward plot.

Rank 0 writes; on other ranks ``RunLogger`` does nothing. Per step:

* ``<run_dir>/metrics.jsonl``: one JSON object per optimizer step, flushed at once (everything
  ``StepMetrics.as_dict`` has, the rollout statistics, the time split, ``flops/*`` and the
  contexts consumed: ``data/epoch``, ``data/cursor``, ``data/sample_ids``). A resumed run
  first drops the lines of steps after its checkpoint and any torn line, and restores the
  checkpoint's own step from the copy of its record stored in the checkpoint, so the file
  always holds exactly one line per step the weights went through;
* wandb (``log.wandb``; offline by default: ``<run_dir>/wandb/offline-run-*``, upload later
  with ``wandb sync``), scalars only;
* a tqdm bar with step, reward, accuracy and tokens/s, plus one log line per
  ``train.log_interval`` steps;
* ``<run_dir>/plots/reward_accuracy.png`` (matplotlib, Agg), redrawn at every checkpoint and
  at the end: reward mean and accuracy against step, with the mean over each quarter of the
  steps drawn as a level line (NTP: ``plots/loss.png``). ``reward_trend`` gives the first- and
  last-quarter means that the entry point prints when the run ends.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_rpt.fileio import atomic_write_text

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


@dataclass(kw_only=True)
class LogConfig:
    """Where step metrics go besides metrics.jsonl."""

    wandb: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode: 'offline' (files under <run_dir>/wandb, no network; `wandb sync` uploads
    them), 'online' (needs WANDB_API_KEY or `wandb login`) or 'disabled'."""
    wandb_project: str = "megatron_rpt"
    """wandb project name."""
    progress_bar: bool = True
    """Show a tqdm progress bar (step, reward, accuracy, tokens/s) on rank 0."""
    plot: bool = True
    """Write plots/reward_accuracy.png (plots/loss.png for NTP) at checkpoints and at the end."""


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` (torn or undecodable lines are skipped)."""
    return [r for r in _scan(Path(run_dir) / METRICS_FILE)[0] if r is not None]


@dataclass(frozen=True)
class RewardTrend:
    """Mean reward over the first and the last quarter of a run's steps."""

    first: float
    last: float
    steps_per_quarter: int

    @property
    def change(self) -> float:
        """``last - first``: how much the reward rose (negative: fell)."""
        return self.last - self.first

    def __str__(self) -> str:
        return (
            f"reward mean over the first {self.steps_per_quarter} step(s) {self.first:.3f}, "
            f"over the last {self.steps_per_quarter} {self.last:.3f} ({self.change:+.3f})"
        )


def quarter_bounds(n: int) -> list[int]:
    """Five indices splitting ``range(n)`` into four consecutive quarters whose lengths differ
    by at most one; the first and the last quarter are equally long.

    >>> quarter_bounds(8), quarter_bounds(10)
    ([0, 2, 4, 6, 8], [0, 2, 5, 8, 10])
    """
    if n < 4:
        raise ValueError(f"quarters need at least 4 steps, got {n}")
    return [round(i * n / 4) for i in range(5)]


def quarter_means(values: list[float]) -> list[float]:
    """Means of ``values`` over the four quarters of ``quarter_bounds(len(values))``.

    >>> quarter_means([0, 0, 1, 1, 2, 2, 3, 3])
    [0.0, 1.0, 2.0, 3.0]
    """
    b = quarter_bounds(len(values))
    return [math.fsum(values[lo:hi]) / (hi - lo) for lo, hi in zip(b, b[1:], strict=False)]


def reward_trend(records: list[dict[str, Any]]) -> RewardTrend | None:
    """First- vs last-quarter mean of ``rollout/reward_mean`` (None under 4 steps).

    >>> t = reward_trend([{"rollout/reward_mean": v} for v in (0.1, 0.2, 0.2, 0.3, 0.4)])
    >>> round(t.first, 3), round(t.last, 3), t.steps_per_quarter
    (0.1, 0.4, 1)
    """
    values = [v for _, v in _logged_rewards(records)]
    if len(values) < 4:
        return None
    means = quarter_means(values)
    return RewardTrend(means[0], means[-1], quarter_bounds(len(values))[1])


def _logged_rewards(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(index, reward mean) of each record that logged one: the values behind both the printed
    trend and the plot's quarter levels, so the two always agree."""
    return [
        (i, v) for i, r in enumerate(records) if not math.isnan(v := _get(r, "rollout/reward_mean"))
    ]


def _scan(path: Path) -> tuple[list[dict[str, Any] | None], bool]:
    """Each line's record (None: torn, undecodable or not an object); whether the file ends
    with a newline."""
    if not path.is_file():
        return [], True
    data = path.read_bytes()
    out: list[dict[str, Any] | None] = []
    for raw in data.splitlines():
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None  # a line cut by a crash or a full disk, or foreign bytes
        out.append(record if isinstance(record, dict) and "step" in record else None)
    return out, data.endswith(b"\n") or not data


def jsonable(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as the JSON values metrics.jsonl holds (numpy scalars become floats)."""
    return json.loads(json.dumps(record, default=float))


class RunLogger:
    """Rank 0's metrics sinks (see the module docstring)."""

    def __init__(
        self,
        cfg: LogConfig,
        run_dir: str | Path,
        *,
        run_name: str,
        objective: str,
        start_step: int,
        total_steps: int,
        config: dict[str, Any],
        enabled: bool,
        log_interval: int = 1,
        restored_record: dict[str, Any] | None = None,
    ) -> None:
        """Open the sinks; a resumed run (``start_step`` > 0) keeps lines up to that step.

        ``restored_record``: the checkpoint's copy of step ``start_step``'s record, written
        back when metrics.jsonl lacks it. ``config`` is also written to ``config.yaml``: only
        now, after a resume's checks passed, so a refused resume leaves it describing the
        checkpoints.
        """
        self.cfg, self.run_dir, self.enabled = cfg, Path(run_dir), enabled
        self.objective, self.log_interval = objective, log_interval
        self.total_steps = total_steps
        self._wandb = self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
        if restored_record is not None and objective == "ntp":
            from megatron_rpt.trainer.ntp import ntp_metrics

            restored_record = ntp_metrics(restored_record)
        self._truncate(start_step, restored_record)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        if cfg.wandb != "disabled":
            self._wandb = _start_wandb(cfg, self.run_dir, run_name, config)
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc=f"{objective.upper()} steps",
                unit="step", dynamic_ncols=True,
            )  # fmt: skip

    def _truncate(self, start_step: int, restored: dict[str, Any] | None) -> None:
        """Make metrics.jsonl hold exactly one line per step up to ``start_step``.

        Lines of later steps (trained after the checkpoint), torn or undecodable lines and
        duplicates are dropped; a missing line for ``start_step`` (a crash between the
        checkpoint and the log line) is restored from the checkpoint's copy ``restored``.
        Every repair is logged as a warning naming the file.
        """
        path = self.run_dir / METRICS_FILE
        records, newline_end = _scan(path)
        keep: dict[int, dict[str, Any]] = {}
        dropped = {"torn or unreadable": 0, "after the checkpoint": 0, "duplicate": 0}
        for r in records:
            if r is None:
                dropped["torn or unreadable"] += 1
            elif not isinstance(r["step"], int) or r["step"] > start_step:
                dropped["after the checkpoint"] += 1
            elif r["step"] in keep:
                dropped["duplicate"] += 1
            else:
                keep[r["step"]] = r
        repaired = start_step > 0 and start_step not in keep and restored is not None
        if repaired and restored.get("step") == start_step:
            keep[start_step] = restored
        else:
            repaired = False
        changed = any(dropped.values()) or repaired or not newline_end
        if changed or (path.is_file() and start_step == 0):
            lines = [json.dumps(keep[k]) + "\n" for k in sorted(keep)]
            atomic_write_text(path, "".join(lines))
        if any(dropped.values()) or not newline_end:
            what = ", ".join(f"{n} {k}" for k, n in dropped.items() if n)
            logger.warning("%s: repaired on resume (dropped lines: %s)", path, what or "none")
        if repaired:
            logger.warning(
                "%s: restored the line of step %d from its checkpoint (the run stopped between "
                "the checkpoint and the log line; the checkpoint's time fields are absent)",
                path, start_step,
            )  # fmt: skip
        elif start_step and start_step not in keep:
            logger.warning(
                "metrics.jsonl has no line for step %d (the run stopped between that step's "
                "checkpoint and its log line)",
                start_step,
            )

    def log(self, record: dict[str, Any]) -> None:
        """Write one step's record everywhere."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record, default=float) + "\n")  # the file ends in "\n"
        self._file.flush()
        os.fsync(self._file.fileno())
        step = int(record["step"])
        if self._wandb is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, int | float)}
            self._wandb.log(scalars, step=step)
        if self._bar is not None:
            self._bar.set_postfix_str(_postfix(record, self.objective), refresh=False)
            self._bar.update(1)
        if step % self.log_interval == 0 or step == self.total_steps:
            logger.info("step %d/%d | %s", step, self.total_steps, _summary(record, self.objective))

    def plot(self) -> Path | None:
        """Redraw the run's plot from metrics.jsonl; returns its path."""
        if not (self.enabled and self.cfg.plot):
            return None
        return plot_metrics(self.run_dir, self.objective)

    def close(self) -> None:
        """Final plot; close the file, the bar and wandb."""
        if not self.enabled:
            return
        self.plot()
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(cfg: LogConfig, run_dir: Path, run_name: str, config: dict[str, Any]) -> Any:
    import secrets

    import wandb

    # One wandb run id per run directory, so an online run resumed after a crash continues
    # the same wandb run (an offline one writes a new offline-run-* directory per process).
    id_file = run_dir / "wandb_run_id"
    if not id_file.is_file():
        atomic_write_text(id_file, secrets.token_hex(6) + "\n")
    return wandb.init(
        project=cfg.wandb_project,
        name=run_name,
        id=id_file.read_text().strip(),
        resume="allow",
        dir=str(run_dir),
        mode=cfg.wandb,
        config=config,
    )


def _get(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    return float(value) if isinstance(value, int | float) else math.nan


def _postfix(record: dict[str, Any], objective: str) -> str:
    if objective == "ntp":
        return (
            f"loss={_get(record, 'train/loss'):.3f} tok/s={_get(record, 'time/tokens_per_s'):.0f}"
        )
    return (
        f"reward={_get(record, 'rollout/reward_mean'):.3f} "
        f"acc={_get(record, 'rollout/accuracy'):.3f} "
        f"tok/s={_get(record, 'time/tokens_per_s'):.0f}"
    )


def _summary(record: dict[str, Any], objective: str) -> str:
    parts = [_postfix(record, objective).replace(" ", " | ")]
    if objective == "rpt":
        parts.append(f"format={_get(record, 'rollout/format_rate'):.2f}")
        parts.append(f"kept={_get(record, 'rollout/groups_kept_frac'):.2f}")
        parts.append(f"loss={_get(record, 'train/loss'):.4f}")
    parts.append(f"grad_norm={_get(record, 'train/grad_norm'):.3g}")
    parts.append(f"step_s={_get(record, 'time/step_s'):.1f}")
    return " | ".join(parts)


def plot_metrics(run_dir: str | Path, objective: str = "rpt") -> Path | None:
    """``plots/reward_accuracy.png`` (RPT) or ``plots/loss.png`` (NTP) from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        return None
    steps = [r["step"] for r in records]
    title = f"{Path(run_dir).name}: {objective.upper()} training"
    if objective == "ntp":
        name = "loss.png"
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        _draw_series(ax, steps, records, {"train loss (cross-entropy)": ("train/loss", "-")})
        ax.set_ylabel("loss")
        ax.set_xlabel("optimizer step")
    else:
        name = "reward_accuracy.png"
        fig, (ax, fmt) = plt.subplots(
            2, 1, figsize=(6.4, 5.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
        logged = _logged_rewards(records)
        series = {
            "reward mean": ("rollout/reward_mean", "-"),
            "accuracy (reward = 1)": ("rollout/accuracy", "--"),
        }
        _draw_series(ax, steps, records, series)
        if len(logged) >= 4:
            _draw_quarter_levels(ax, [steps[i] for i, _ in logged], [v for _, v in logged])
        # The reward's own scale, so a rise of a few points is visible (format sits near 1).
        top = max([v for _, v in logged] + [0.05])
        ax.set_ylim(0.0, min(1.02, 1.35 * top))
        ax.set_ylabel("fraction of responses")
        fmt_series = {"format (a prediction could be read)": ("rollout/format_rate", ":")}
        _draw_series(fmt, steps, records, fmt_series)
        fmt.set_ylim(-0.02, 1.02)
        fmt.set_xlabel("optimizer step")
        fmt.grid(alpha=0.3)
        fmt.legend(loc="lower right")
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    out = Path(run_dir) / "plots" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _draw_series(
    ax: Any, steps: list[int], records: list[dict[str, Any]], series: dict[str, tuple[str, str]]
) -> None:
    for label, (key, style) in series.items():
        values = [_get(r, key) for r in records]
        ax.plot(steps, values, style, marker="o", markersize=3, label=label)


def _draw_quarter_levels(ax: Any, steps: list[int], rewards: list[float]) -> None:
    """A level line per quarter of the steps at that quarter's mean reward: the noise of one
    step's contexts hides a trend that the quarter means show."""
    bounds = quarter_bounds(len(steps))
    for i, level in enumerate(quarter_means(rewards)):
        lo, hi = steps[bounds[i]], steps[bounds[i + 1] - 1]
        label = "reward mean per quarter of the steps" if i == 0 else None
        ax.hlines(level, lo - 0.4, hi + 0.4, colors="k", linewidth=2, label=label)


__all__ = [
    "LogConfig",
    "RewardTrend",
    "RunLogger",
    "jsonable",
    "plot_metrics",
    "quarter_bounds",
    "quarter_means",
    "read_metrics",
    "reward_trend",
]
