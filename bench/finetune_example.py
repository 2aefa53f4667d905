"""``python -m bench.finetune_example``: what starting from imported weights buys on a small
dataset, measured. LeNet-5 is first trained on the digits 0-6 (torch; its weights written as
cnnzoo's neutral .npz, one of the formats ``finetune.weights`` imports); then the digits 7-9,
with few of their images for training (``--train-fraction``), are learned from scratch and from
those weights (the 7-class classifier initialised anew for 3 classes), all layers trained or
the backbone frozen, in each backend, with the same recipe. Prints a markdown table of val_acc
per epoch; writes ``finetune_example.json`` to ``--out``."""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.common import ROOT, child_env, log, split_csv
from bench.report import md_table

# how a run on the digits 7-9 starts: random weights, the imported ones (all layers train),
# the imported ones with the backbone frozen (the new classifier alone trains)
STARTS = {"scratch": [], "pretrained": ["finetune.weights={weights}"],
          "pretrained, backbone frozen": ["finetune.weights={weights}",
                                          "finetune.freeze_backbone=true"]}
COMMON = ("hardware=cpu", "export.enabled=false", "trainer.progress_bar=false", "data=npz",
          "optim=adam", "optim.lr=0.001")


def digits_files(out: Path) -> tuple[Path, Path]:
    """The digits 0-6 (pretraining) and 7-9 (the new task, labels 0-2) as npz datasets."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = (digits.images * (255 / 16)).round().astype(np.uint8)
    y = digits.target
    old, new = out / "digits_0-6.npz", out / "digits_7-9.npz"
    np.savez(old, x=x[y < 7], y=y[y < 7], classes=np.array([str(d) for d in range(7)]))
    np.savez(new, x=x[y >= 7], y=y[y >= 7] - 7, classes=np.array(["7", "8", "9"]))
    return old, new


def run(run_dir: Path, *overrides: str) -> list[dict]:
    """One run.py training run; its metrics.csv rows."""
    if not (run_dir / "results.json").exists():
        r = subprocess.run([sys.executable, "run.py", *COMMON, *overrides,
                            f"hydra.run.dir={run_dir}"], cwd=ROOT, env=child_env(),
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"run.py {' '.join(overrides)} failed:\n{r.stderr[-3000:]}")
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


def pretrained_npz(run_dir: Path, out: Path) -> Path:
    """The torch run's final weights in the canonical layout, as an .npz."""
    from cnnzoo.app.experiment import compose, make_backend, spec_of
    from cnnzoo.core.weights import save_weights
    results = json.loads((run_dir / "results.json").read_text())
    cfg = compose("arch.num_classes=7")
    backend = make_backend(cfg, run_dir)
    model = backend.build(spec_of(cfg), cfg.arch.input_size)
    backend.load_checkpoint(model, run_dir / results["checkpoint"])
    save_weights(out, backend.get_weights(model))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.finetune_example", description=__doc__)
    p.add_argument("--backends", default="torch,keras,mxnet", type=split_csv)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-fraction", type=float, default=0.1,
                   help="of the digits 7-9 trained on; the rest is the validation split")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/finetune_example")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    old, new = digits_files(args.out)
    log("pretraining LeNet-5 on the digits 0-6 (torch, 10 epochs)")
    base = run(args.out / "pretrain", f"data.path={old}", "trainer.max_epochs=10")
    weights = pretrained_npz(args.out / "pretrain", args.out / "lenet5_digits_0-6.npz")
    frac = args.train_fraction
    task = (f"data.path={new}", f"data.val_fraction={1 - frac:g}",
            f"trainer.max_epochs={args.epochs}", f"data.batch_size={args.batch_size}")
    rows, shown = [], {1, 2, 3, 5, args.epochs}
    for backend in args.backends:
        for start, extra in STARTS.items():
            log(f"digits 7-9, {backend}, from {start}")
            extra = [e.format(weights=weights) for e in extra]
            folder = (f"{backend}-{start.replace(', backbone ', '-')}-{frac:g}-{args.epochs}"
                      f"-{args.batch_size}")
            history = run(args.out / folder, f"backend={backend}", *task, *extra)
            rows.append({"backend": backend, "start": start,
                         **{f"epoch {r['epoch']}": round(float(r["val_acc"]), 3)
                            for r in history if int(r["epoch"]) in shown}})
    report = {"pretrain_val_acc": round(float(base[-1]["val_acc"]), 4),
              "train_fraction": frac, "epochs": args.epochs, "batch_size": args.batch_size,
              "rows": rows}
    (args.out / "finetune_example.json").write_text(json.dumps(report, indent=1))
    print(f"pretrained on the digits 0-6: val_acc {report['pretrain_val_acc']}")
    print(md_table(list(rows[0]), [list(r.values()) for r in rows]))


if __name__ == "__main__":
    main()
