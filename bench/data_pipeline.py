"""How fast is the data layer, per format, next to LeNet-5's training rate?

Writes real images (scikit-learn's digits, repeated to --images) in every format into a temporary
folder, then times one epoch of the data layer as a backend consumes it: ``Split.take`` over
``epoch_order`` in batches of 32, preprocessed for LeNet-5 (1 x 32 x 32), and the same through
the torch backend's DataLoader. Each number is the best of --repeat epochs (the machine may be
shared). With --train it also runs the default job (``python run.py``, LeNet-5 on torch) and
reads its training rate from results.json (``timings.images_per_s``), the best of RUNS runs.

    python bench/data_pipeline.py [--images 10000] [--repeat 3] [--train RUNS]
"""
from __future__ import annotations

import argparse
import gzip
import json
import pickle
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnzoo.data import Preprocess, epoch_order, load_dataset  # noqa: E402

BATCH, SIZE, SEED = 32, 32, 42


def real_digits(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """n real digits (the 1,797 repeated) as uint8 (n, size, size), and labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    gray = np.rint(d.images * (255 / 16)).astype(np.uint8)
    bilinear = Image.Resampling.BILINEAR
    resized = np.stack([np.asarray(Image.fromarray(g).resize((size, size), bilinear))
                        for g in gray])
    pick = np.arange(n) % len(gray)
    return resized[pick], d.target[pick]


def write_all(folder: Path, n: int) -> dict[str, tuple[str, dict]]:
    """Every format in ``folder``: {label: (data.name, extra data keys)}."""
    x28, y28 = real_digits(n, 28)
    x32, y32 = real_digits(n, 32)

    mnist = folder / "mnist"
    mnist.mkdir()
    for name, a in (("train-images-idx3-ubyte", x28), ("train-labels-idx1-ubyte", y28)):
        head = bytes([0, 0, 8, a.ndim]) + b"".join(struct.pack(">I", s) for s in a.shape)
        (mnist / name).write_bytes(head + a.astype(np.uint8).tobytes())
    mnist_gz = folder / "mnist_gz"
    mnist_gz.mkdir()
    for f in mnist.iterdir():
        (mnist_gz / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes(), 1))

    cifar = folder / "cifar"
    cifar.mkdir()
    rgb = np.stack([x32, x32 // 2, 255 - x32], axis=1).reshape(n, 3072)  # R, G, B planes
    (cifar / "data_batch_1").write_bytes(pickle.dumps(
        {b"data": rgb, b"labels": [int(v) for v in y32]}, protocol=4))

    np.savez(folder / "d.npz", x=x28, y=y28)

    images = folder / "images"
    for i, (im, label) in enumerate(zip(x28, y28)):
        (images / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(images / str(label) / f"{i:06d}.png", compress_level=1)
    return {"digits (embedded, float32 8x8)": ("digits", {}),
            "mnist IDX (memory-mapped, 28x28)": ("mnist", {"path": str(mnist)}),
            "mnist IDX .gz (in memory)": ("mnist", {"path": str(mnist_gz)}),
            "cifar10 (32x32 RGB -> gray)": ("cifar10", {"path": str(cifar)}),
            "npz (memory-mapped, 28x28)": ("npz", {"path": str(folder / 'd.npz')}),
            "image_folder PNG, streamed": ("image_folder", {"path": str(images), "verify": False}),
            "image_folder PNG, cached": ("image_folder", {"path": str(images), "cache": True})}


def data_cfg(name: str, extra: dict):
    cfg = OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml")
    cfg.limit = None
    for k, v in extra.items():
        cfg[k] = v
    return cfg


def epoch_rate(split, repeat: int) -> float:
    """Images per second of the best of ``repeat`` epochs of ``split.take`` batches."""
    best = float("inf")
    for epoch in range(repeat):
        order = epoch_order(len(split), SEED, epoch)
        t0 = time.perf_counter()
        for start in range(0, len(order), BATCH):
            split.take(order[start:start + BATCH], epoch)
        best = min(best, time.perf_counter() - t0)
    return len(split) / best


def loader_rate(split, repeat: int) -> float:
    """The same through the torch backend's DataLoader (what its training loop iterates)."""
    from runners.torch_runner import TorchBackend
    cfg = OmegaConf.create({"seed": SEED, "data": {"batch_size": BATCH},
                            "backend": {"num_workers": 0}, "hardware": {"threads": None}})
    loader = TorchBackend(cfg, ".").input_pipeline(split, shuffle=True)
    best = float("inf")
    for epoch in range(repeat):
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        best = min(best, time.perf_counter() - t0)
    return len(split) / best


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
            rows.append((label, load_s, epoch_rate(train, args.repeat),
                         loader_rate(train, args.repeat)))
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
