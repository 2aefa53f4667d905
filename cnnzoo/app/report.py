"""What a person sees after a run: the summary table and the training curves (curves.png)."""
from __future__ import annotations

from pathlib import Path


def print_config(cfg) -> None:
    """The resolved config of the run as a tree, one branch per group."""
    from omegaconf import OmegaConf
    from rich.console import Console
    from rich.tree import Tree

    def add(node, value):
        for key, item in value.items():
            if isinstance(item, dict):
                add(node.add(f"[bold]{key}"), item)
            else:
                node.add(f"{key}: {item}")

    tree = Tree("[bold]config")
    add(tree, OmegaConf.to_container(cfg, resolve=True))
    Console().print(tree)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(rows: list[dict], path: Path, title: str) -> list[str]:
    """Loss and accuracy per epoch, train and validation: two panels, four curves (returned)."""
    plt = pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "acc")):
        for split, style in (("train", "o-"), ("val", "s--")):
            key = f"{split}_{metric}"
            ax.plot(epochs, [r.get(key, float("nan")) for r in rows], style, label=key)
        integer_ticks(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [line.get_label() for ax in axes for line in ax.get_lines()]


def print_summary(results: dict, run_dir: Path) -> None:
    """The end-of-run table: what was trained, how well, how fast, and the exports' verdicts."""
    from rich.console import Console
    from rich.table import Table

    export = results.get("export") or {}

    def verdict(block: dict, file: str) -> str:
        text = {True: "passed", False: "FAILED", None: "not verified"}[block.get("passed")]
        if block.get("max_abs_diff") is not None:
            text += f" (max abs diff {block['max_abs_diff']:.1e}, {', '.join(block['runtimes'])})"
        return f"{text}: {run_dir / file}"

    caffe, int8 = export.get("caffe"), export.get("int8")
    metrics, timings = results.get("metrics", {}), results.get("timings", {})
    rows = [
        ("model", f"{results['arch']} on {results['backend']} "
                  f"({results.get('hardware', {}).get('device', '?')})"),
        ("parameters", f"{results['params']:,}"),
        ("best val_acc", _num(metrics.get("best_val_acc"))),
        ("last val_acc / val_loss", f"{_num(metrics.get('val_acc'))} / {_num(metrics.get('val_loss'))}"),
        ("training time", f"{timings.get('train_s', 0):.1f} s, "
                          f"{timings.get('images_per_s', 0):,.{1 if timings.get('images_per_s', 0) < 10 else 0}f} images/s"),
        ("ONNX", verdict(export, export["path"]) if export else "not exported"),
        *([("Caffe", verdict(caffe, caffe["prototxt"]))] if caffe else []),
        *([("int8 ONNX", f"{'passed' if int8['passed'] else 'FAILED'}: val_acc "
                         f"{int8['int8_acc']:.4f} vs {int8['fp32_acc']:.4f} fp32, "
                         f"{int8['int8_size_mb']:.2f} MB, {int8['int8_latency_ms']:.2f} ms/image: "
                         f"{run_dir / int8['path']}")] if int8 else []),
        ("run directory", str(run_dir)),
    ]
    table = Table(show_header=False, title="run summary", title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def plot_confusion(matrix, classes: list[str], path: Path, title: str) -> None:
    """The confusion matrix (rows: true class, columns: predicted) with counts in the cells."""
    import numpy as np
    matrix = np.asarray(matrix)
    plt = pyplot()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(4, 0.5 * n + 1.5)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        top = matrix.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > top / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
