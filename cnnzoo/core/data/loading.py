"""The datasets of the ``data`` config group: the embedded ones and the file formats, one
module each: ``image_folder`` (PNG/JPEG/BMP class folders), ``idx`` (MNIST's IDX files),
``cifar`` (CIFAR-10 python batches), ``npz``."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from . import cifar, idx, image_folder, npz
from .dataset import Dataset

# data.name -> what data.path must point at
FILE_FORMATS = {
    "image_folder": "a folder of class folders (root/<class>/<image>, or root/train/... and "
                    "root/val/...)",
    "mnist": "the folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte (and t10k-...)",
    "cifar10": "the cifar-10-batches-py folder (data_batch_1..5, test_batch, batches.meta)",
    "npz": "an .npz file with arrays x (images) and y (labels)",
}



def load_digits() -> Dataset:
    """scikit-learn's 1,797 real 8x8 digits (0..16 levels), as float32 in [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits  # ships with scikit-learn
    digits = sk_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    return Dataset("digits", images, digits.target, [str(d) for d in range(10)])


def make_synthetic(num_samples: int, num_classes: int, image_size: int, channels: int,
                   seed: int) -> Dataset:
    """Each class is a fixed random smooth pattern; images are that pattern plus noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((num_classes, 4, 4, channels), dtype=np.float32)
    patterns = np.stack([np.stack([np.asarray(Image.fromarray(p[:, :, k], mode="F").resize(
        (image_size, image_size), Image.Resampling.BILINEAR)) for k in range(channels)], -1)
        for p in coarse])
    labels = rng.integers(0, num_classes, num_samples)
    noise = rng.random((num_samples, image_size, image_size, channels), dtype=np.float32)
    images = np.clip(0.7 * patterns[labels] + 0.3 * noise, 0, 1).astype(np.float32)
    return Dataset("synthetic", images, labels, [f"class_{k}" for k in range(num_classes)])


def dataset_path(cfg) -> Path:
    """``data.path`` as an existing path, or a DataError saying what it must point at."""
    path = Path(os.path.expanduser(str(cfg.path)))
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise DataError(f"data.path={str(cfg.path)!r} does not exist{where}: set data.path to "
                        f"{FILE_FORMATS[cfg.name]}")
    return path


def load_dataset(cfg, seed: int) -> Dataset:
    """The dataset named by the ``data`` config group."""
    if cfg.name == "digits":
        return load_digits()
    if cfg.name == "synthetic":
        return make_synthetic(cfg.num_samples, cfg.num_classes, cfg.image_size, cfg.channels,
                              seed)
    if cfg.name not in FILE_FORMATS:
        raise DataError(f"unknown dataset '{cfg.name}'")
    loader = {"image_folder": image_folder, "mnist": idx, "cifar10": cifar, "npz": npz}[cfg.name]
    return loader.load(dataset_path(cfg), cfg)
