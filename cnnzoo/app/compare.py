"""Compare runs: one table and one plot for several run directories or a whole multirun.

    python -m cnnzoo.app.compare outputs/lenet5-torch/<run> outputs/lenet5-keras/<run> [--out DIR]
    python -m cnnzoo.app.compare multirun/<date_time>          # every trial of a sweep

Writes comparison.md, comparison.csv and comparison.png (validation accuracy and training loss
per epoch, one curve per run) into --out (default: the multirun directory when one is given,
else the current directory) and prints the table.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ..core.errors import BAD_INPUT, DataError, exit_with
from ..core.rundir import MetricsLog, read_json
from .report import integer_ticks, pyplot

_LEAVE_OUT = "restore it, or leave that run out"
COLUMNS = ("run", "arch", "backend", "status", "params", "best_val_acc", "val_acc", "val_loss",
           "train_s", "images_per_s", "onnx", "max_abs_diff", "path")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories (holding results.json) given directly or anywhere below the paths."""
    runs = []
    for path in paths:
        if (path / "results.json").exists():
            runs.append(path)
        else:
            found = sorted((p.parent for p in path.rglob("results.json")), key=_natural)
            if not found:
                raise DataError(f"{path} holds no run (no results.json found below it)")
            runs += found
    return runs


def _natural(path: Path):
    return [int(part) if part.isdigit() else part for part in path.parts]


def row(run: Path, label: str) -> dict:
    res = read_json(run / "results.json", _LEAVE_OUT)
    m, t, e = res.get("metrics", {}), res.get("timings", {}), res.get("export") or {}
    fmt = lambda v, spec=".4f": "" if v is None else format(v, spec)  # noqa: E731
    return {"run": label, "arch": res.get("arch"), "backend": res.get("backend"),
            "status": res.get("status"), "params": res.get("params"),
            "best_val_acc": fmt(m.get("best_val_acc")), "val_acc": fmt(m.get("val_acc")),
            "val_loss": fmt(m.get("val_loss")), "train_s": fmt(t.get("train_s"), ".1f"),
            "images_per_s": fmt(t.get("images_per_s"), ".0f"),
            "onnx": {True: "passed", False: "failed"}.get(e.get("passed"), ""),
            "max_abs_diff": fmt(e.get("max_abs_diff"), ".1e"), "path": str(run)}


def labels(runs: list[Path]) -> list[str]:
    """arch/backend, plus the directory name where that alone is ambiguous."""
    base = []
    for run in runs:
        res = read_json(run / "results.json", _LEAVE_OUT)
        base.append(f"{res.get('arch')}/{res.get('backend')}")
    return [b if base.count(b) == 1 else f"{b} ({r.name})" for b, r in zip(base, runs)]


def plot(runs: list[Path], names: list[str], path: Path) -> list[str]:
    """Validation accuracy and training loss per epoch; returns the curves' labels."""
    plt = pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run, name in zip(runs, names):
        if not (run / "metrics.csv").exists():
            continue
        rows = MetricsLog(run / "metrics.csv").rows()
        epochs = [r["epoch"] for r in rows]
        acc_ax.plot(epochs, [r.get("val_acc", float("nan")) for r in rows], "o-", label=name)
        loss_ax.plot(epochs, [r.get("train_loss", float("nan")) for r in rows], "o-", label=name)
    for ax, ylabel in ((acc_ax, "validation accuracy"), (loss_ax, "training loss")):
        integer_ticks(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{len(runs)} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [line.get_label() for ax in (acc_ax, loss_ax) for line in ax.get_lines()]


def compare(paths: list[Path], out: Path | None = None) -> list[dict]:
    runs = find_runs(paths)
    out = out or (paths[0] if len(paths) == 1 and runs != [paths[0]] else Path.cwd())
    out.mkdir(parents=True, exist_ok=True)
    names = labels(runs)
    rows = [row(run, name) for run, name in zip(runs, names)]
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    shown = COLUMNS[:-1]  # the path column is for the CSV
    md = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    md += ["| " + " | ".join(str(r[c]) for c in shown) + " |" for r in rows]
    (out / "comparison.md").write_text(f"# Comparison of {len(rows)} runs\n\n" + "\n".join(md) + "\n")
    plot(runs, names, out / "comparison.png")
    _print(rows, ("run", "status", "best_val_acc", "val_acc", "images_per_s", "onnx"))
    print(f"comparison of {len(rows)} runs: {out / 'comparison.md'}, {out / 'comparison.png'}")
    return rows


def _print(rows: list[dict], columns) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for c in columns:
        table.add_column(c, justify="left" if c in ("run", "arch", "backend", "status") else "right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in columns))
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cnnzoo.app.compare",
                                description="Compare run directories or a multirun directory.")
    p.add_argument("paths", nargs="+", type=Path, help="run directories or a multirun directory")
    p.add_argument("--out", type=Path, default=None, help="where comparison.* go")
    args = p.parse_args(argv)
    missing = [str(x) for x in args.paths if not x.is_dir()]
    try:
        if missing:
            raise DataError(f"not a directory: {', '.join(missing)}: give run directories or a "
                            "multirun directory")
        compare(args.paths, args.out)
    except BAD_INPUT as err:
        exit_with(err)


if __name__ == "__main__":
    main()
