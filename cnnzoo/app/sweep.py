"""The end of a sweep: one summary of all trials, and a verdict on how many failed.

``SweepSummary`` is a Hydra callback (``hydra.callbacks`` in conf/config.yaml). When a multirun
ends it reads every trial's ``.hydra/overrides.yaml`` and ``results.json`` and writes
``sweep_summary.csv``, ``sweep_summary.md`` and ``sweep_objective.png`` into the sweep directory,
prints the table, and exits with code 1 when more than ``sweep.max_failure_rate`` of the trials
failed. Heavy imports (matplotlib, rich) happen only then.
"""
from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..core.errors import CheckpointError
from ..core.rundir import read_json

COLUMNS = ("trial", "status", "epochs", "objective", "val_acc", "val_loss", "train_loss",
           "time_s", "overrides", "error")


@dataclass
class Trial:
    number: int
    overrides: list[str]
    # ok, pruned (an Optuna pruner stopped it), failed, verification_failed, or incomplete
    # (no results.json: killed)
    status: str
    metrics: dict
    time_s: float | None
    error: str

    def objective(self, metric: str) -> float | None:
        value = self.metrics.get(metric) if self.status == "ok" else None
        return value if value is not None and math.isfinite(value) else None


def varying(trials: list[Trial]) -> list[Trial]:
    """The trials with only the overrides that differ between them (the swept values)."""
    common = set.intersection(*(set(t.overrides) for t in trials)) if len(trials) > 1 else set()
    return [Trial(t.number, [o for o in t.overrides if o not in common], t.status, t.metrics,
                  t.time_s, t.error) for t in trials]


def failed(trials: list[Trial]) -> list[Trial]:
    """The trials that count against sweep.max_failure_rate (a pruned one did its job)."""
    return [t for t in trials if t.status not in ("ok", "pruned")]


def read_trials(sweep_dir: Path) -> list[Trial]:
    trials = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        results_file = job / "results.json"
        try:
            results = read_json(results_file, "restore it") if results_file.exists() else {}
        except CheckpointError as err:  # one damaged trial must not hide the others
            results = {"status": "failed", "error": str(err)}
        trials.append(Trial(int(job.name), overrides or [], results.get("status", "incomplete"),
                            results.get("metrics", {}), results.get("timings", {}).get("total_s"),
                            results.get("error") or results.get("stopped", "")))
    return trials


def maximize(metric: str) -> bool:
    return not metric.endswith("loss")


def best_trial(trials: list[Trial], metric: str) -> Trial | None:
    scored = [t for t in trials if t.objective(metric) is not None]
    if not scored:
        return None
    key = lambda t: t.objective(metric)  # noqa: E731
    return max(scored, key=key) if maximize(metric) else min(scored, key=key)


def write_summary(sweep_dir: Path, trials: list[Trial], metric: str) -> Trial | None:
    best = best_trial(trials, metric)
    rows = [_row(t, metric) for t in trials]
    with (sweep_dir / "sweep_summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Sweep summary: {len(trials)} trials, objective `{metric}` "
             f"({'max' if maximize(metric) else 'min'})", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "/") for c in COLUMNS) + " |" for r in rows]
    lines += ["", f"Best trial: {best.number} ({metric} = {best.objective(metric):.4f}) "
                  f"with {' '.join(best.overrides)}" if best else "No trial succeeded."]
    (sweep_dir / "sweep_summary.md").write_text("\n".join(lines) + "\n")
    _plot(sweep_dir / "sweep_objective.png", trials, metric, best)
    return best


def _row(t: Trial, metric: str) -> dict:
    fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    epochs = t.metrics.get("epoch")
    return {"trial": t.number, "status": t.status, "epochs": "" if epochs is None else epochs,
            "objective": fmt(t.objective(metric)),
            "val_acc": fmt(t.metrics.get("val_acc")), "val_loss": fmt(t.metrics.get("val_loss")),
            "train_loss": fmt(t.metrics.get("train_loss")), "time_s": fmt(t.time_s),
            "overrides": " ".join(t.overrides), "error": t.error.splitlines()[0] if t.error else ""}


def _plot(path: Path, trials: list[Trial], metric: str, best: Trial | None) -> None:
    from .report import integer_ticks, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ok = [(t.number, t.objective(metric)) for t in trials if t.objective(metric) is not None]
    if ok:
        ax.plot(*zip(*ok), "o-", label=metric)
    missing = [t.number for t in trials if t.objective(metric) is None]
    if missing:
        low = min((v for _, v in ok), default=0.0)
        ax.plot(missing, [low] * len(missing), "rx", markersize=10, label="failed or pruned")
    if best:
        ax.plot([best.number], [best.objective(metric)], "*", markersize=16, label="best")
    integer_ticks(ax)
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} across {len(trials)} trials")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(trials: list[Trial], metric: str, best: Trial | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep: {len(trials)} trials", title_justify="left")
    for col in ("trial", "status", "epochs", metric, "time_s", "overrides"):
        table.add_column(col)
    for t in trials:
        value = t.objective(metric)
        table.add_row(str(t.number), t.status, str(t.metrics.get("epoch", "")),
                      "" if value is None else f"{value:.4f}",
                      "" if t.time_s is None else f"{t.time_s:.1f}", " ".join(t.overrides),
                      style="bold" if t is best else ("red" if value is None else None))
    Console().print(table)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        metric = config.optimized_metric
        trials = varying(read_trials(sweep_dir))
        best = write_summary(sweep_dir, trials, metric)
        print_table(trials, metric, best)
        print(f"sweep summary: {sweep_dir / 'sweep_summary.md'}")
        bad = failed(trials)
        limit = config.sweep.max_failure_rate
        if trials and len(bad) / len(trials) > limit:
            print(f"error: {len(bad)} of {len(trials)} trials failed, more than "
                  f"sweep.max_failure_rate={limit}; see {sweep_dir / 'sweep_summary.md'}",
                  file=sys.stderr)
            sys.exit(1)
