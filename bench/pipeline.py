"""Data pipeline throughput, to set next to LeNet-5's training rate (the data layer must never
be what a small model waits for).

- ``backend_pipeline``: one epoch of each backend's own ``input_pipeline`` (torch DataLoader,
  Keras ``tf.data`` from the data layer, MXNet ``EpochBatches``) on the same synthetic LeNet-5
  split the training benchmark uses, iterated without training: images/s per epoch.
- ``formats``: every file format the data layer reads (real digits written as IDX, IDX.gz,
  CIFAR batches, npz, PNG folders streamed and cached), timed as a backend consumes them:
  ``Split.take`` over ``epoch_order`` in batches of 32 preprocessed for LeNet-5 (1 x 32 x 32),
  streamed from the source every epoch (``data.in_memory_mb=0``) and kept in memory after the
  warm-up epoch (the default), and the kept split through the torch backend's DataLoader.

``python bench/data_pipeline.py`` (the older stand-alone script) uses the same functions.
"""
from __future__ import annotations

import gzip
import pickle
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, SEED, Row, Stats

BATCH, SIZE = 32, 32


# --------------------------------------------------------------------------- file formats
def real_digits(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """n real digits (the 1,797 repeated) as uint8 (n, size, size), and labels."""
    from PIL import Image
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
    from PIL import Image
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
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml")
    cfg.limit = None
    for k, v in extra.items():
        cfg[k] = v
    return cfg


def epoch_seconds(split, repeat: int, warmup: int = 0) -> list[float]:
    """Seconds of each of ``repeat`` epochs of ``split.take`` batches (after ``warmup``)."""
    out = []
    for epoch in range(warmup + repeat):
        order = epoch_order_of(len(split), epoch)
        t0 = time.perf_counter()
        for start in range(0, len(order), BATCH):
            split.take(order[start:start + BATCH], epoch)
        out.append(time.perf_counter() - t0)
    return out[warmup:]


def epoch_order_of(n: int, epoch: int):
    from cnnzoo.core.data import epoch_order
    return epoch_order(n, SEED, epoch)


def loader_seconds(split, repeat: int, warmup: int = 0) -> list[float]:
    """The same through the torch backend's DataLoader (what its training loop iterates)."""
    from omegaconf import OmegaConf

    from runners.torch.backend import TorchBackend
    cfg = OmegaConf.create({"seed": SEED, "data": {"batch_size": BATCH},
                            "backend": {"num_workers": 0},
                            "hardware": {"threads": None, "accelerator": "cpu"}})
    loader = TorchBackend(cfg, ".").input_pipeline(split, shuffle=True)
    out = []
    for epoch in range(warmup + repeat):
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        out.append(time.perf_counter() - t0)
    return out[warmup:]


def formats(args: dict) -> list[Row]:
    """Every file format at ``args["images"]`` images: Split.take and torch DataLoader rates."""
    from cnnzoo.core.data import Preprocess, load_dataset
    pre = Preprocess(SIZE, 1, (0.5,), (0.5,), "bilinear")
    reps, warmup, only = args["reps"], args.get("warmup", 1), args.get("formats")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnzoo-bench-data-") as tmp:
        for label, (name, extra) in write_all(Path(tmp), args["images"]).items():
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            dataset = load_dataset(data_cfg(name, extra), SEED)
            load_s = time.perf_counter() - t0
            streamed, _ = dataset.split(pre, 0.001, SEED)  # nearly all images timed
            kept, _ = dataset.split(pre, 0.001, SEED)
            budget = data_cfg(name, {}).in_memory_mb << 20  # the default config's
            if not kept.keep_in_memory(budget):
                raise RuntimeError(f"{label}: {len(kept)} images do not fit in {budget} bytes")
            n = len(streamed)
            for how, seconds in (
                    ("Split.take, streamed (data.in_memory_mb=0)",
                     epoch_seconds(streamed, reps, warmup)),
                    ("Split.take, kept in memory (default)", epoch_seconds(kept, reps, warmup)),
                    ("torch DataLoader, kept in memory (default)",
                     loader_seconds(kept, reps, warmup))):
                rows.append(Row("data", f"{label}: {how}", "throughput", "images/s",
                                Stats.of([n / s for s in seconds]), arch="lenet5",
                                input_size=SIZE, batch=BATCH, warmup=f"{warmup} epoch",
                                note=f"{n} images; dataset load {load_s:.2f} s"))
    return rows


# --------------------------------------------------------------------------- per backend
def backend_pipeline(args: dict) -> list[Row]:
    """One epoch of ``backend.input_pipeline`` on the training benchmark's LeNet-5 split."""
    from bench.common import compose
    from bench.training import config_overrides
    from cnnzoo.app.experiment import prepare
    from cnnzoo.core.backend import load_backend

    name, reps, warmup = args["backend"], args["reps"], args.get("warmup", 1)
    cfg = compose(*config_overrides(args["arch"], name, args["batch"], args["input_size"],
                                    args["steps"], 1, [f"hardware.threads={args['threads']}"]))
    exp = prepare(cfg)
    with tempfile.TemporaryDirectory(prefix="cnnzoo-bench-pipe-") as tmp:
        backend = load_backend(name)(cfg, Path(tmp))
        split = exp.train_split
        seconds = []
        for epoch in range(warmup + reps):
            t0 = time.perf_counter()
            count = sum(len(y) for _, y in epoch_batches(backend, name, split, epoch))
            seconds.append(time.perf_counter() - t0)
    return [Row("data", f"{name} input_pipeline (synthetic, as trained)", "throughput",
                "images/s", Stats.of([count / s for s in seconds[warmup:]]), arch=args["arch"],
                backend=name, input_size=args["input_size"], batch=args["batch"],
                threads=args["threads"], warmup=f"{warmup} epoch",
                note=f"{count} images per epoch, iterated without training")]


def epoch_batches(backend, name: str, split, epoch: int):
    """The batches of one training epoch from ``backend.input_pipeline``, as its training loop
    receives them."""
    if name == "torch":
        loader = backend.input_pipeline(split, shuffle=True)
        loader.sampler.set_epoch(epoch)
        return loader
    if name == "keras":  # a fresh tf.data pipeline per epoch, as a one-epoch fit would read it
        return backend.input_pipeline(split, True, 1)
    if name == "mxnet":
        batches = backend.input_pipeline(split, shuffle=True)
        batches.set_epoch(epoch)
        return batches
    return backend.input_pipeline(split, shuffle=True)
