"""How fast is the data layer, per format, next to LeNet-5's training rate?

Writes real images (scikit-learn's digits, repeated to --images) in every format into a temporary
folder, then times one epoch of the data layer as a backend consumes it: ``Split.take`` over
``epoch_order`` in batches of 32, preprocessed for LeNet-5 (1 x 32 x 32), and the same through
the torch backend's DataLoader. Each number is the best of --repeat epochs (the machine may be
shared). With --train it also runs the default job (``python run.py``, LeNet-5 on torch) and
reads its training rate from results.json (``timings.images_per_s``), the best of RUNS runs.

    python bench/data_pipeline.py [--images 10000] [--repeat 3] [--train RUNS]

The measuring code lives in ``bench/pipeline.py``; ``python -m bench --parts data`` runs the
same measurements (plus each backend's own input pipeline) with the harness's statistics.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pipeline import BATCH, SIZE, data_cfg, epoch_seconds, loader_seconds, write_all
from cnnzoo.core.data import Preprocess, load_dataset

SEED = 42


def training_rate(runs: int) -> float:
    """LeNet-5's training images/s: the best of ``runs`` default jobs (results.json). The best,
    like the data layer's best epoch, is the rate of a machine not busy with anything else."""
    rates = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as run_dir:
            subprocess.run([sys.executable, "run.py", f"hydra.run.dir={run_dir}",
                            "trainer.progress_bar=false"], cwd=ROOT, check=True,
                           capture_output=True)
            results = json.loads((Path(run_dir) / "results.json").read_text())
            rates.append(results["timings"]["images_per_s"])
    print(f"LeNet-5 training runs (images/s): {', '.join(f'{r:,.0f}' for r in rates)}")
    return max(rates)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10000, help="images per file format")
    ap.add_argument("--repeat", type=int, default=3, help="epochs timed; the best counts")
    ap.add_argument("--train", type=int, default=0, metavar="RUNS",
                    help="also time LeNet-5 training: the best of RUNS default jobs (run.py)")
    args = ap.parse_args()
    pre = Preprocess(SIZE, 1, (0.5,), (0.5,), "bilinear")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        formats = write_all(Path(tmp), args.images)
        print(f"wrote {args.images} images per format in {time.perf_counter() - t0:.1f} s; "
              f"LeNet-5 input 1x{SIZE}x{SIZE}, batch {BATCH}, best of {args.repeat} epochs")
        for label, (name, extra) in formats.items():
            t0 = time.perf_counter()
            dataset = load_dataset(data_cfg(name, extra), SEED)
            load_s = time.perf_counter() - t0
            train, _ = dataset.split(pre, 0.001, SEED)  # nearly all images in the timed split
            rows.append((label, load_s, len(train) / min(epoch_seconds(train, args.repeat)),
                         len(train) / min(loader_seconds(train, args.repeat))))
    print(f"{'format':36} {'load s':>7} {'Split.take img/s':>17} {'torch DataLoader img/s':>23}")
    for label, load_s, take, loader in rows:
        print(f"{label:36} {load_s:7.2f} {take:17,.0f} {loader:23,.0f}")
    if args.train:
        rate = training_rate(args.train)
        print(f"LeNet-5 training (python run.py, torch), best run: {rate:,.0f} images/s")
        worst = min(min(take, loader) for _, _, take, loader in rows)
        print(f"slowest data path / training rate: {worst / rate:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
