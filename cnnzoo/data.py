"""Datasets and the one preprocessing contract every backend uses.

A dataset is held as raw float32 images in [0, 1], shape (N, H, W, C), plus integer labels.
``Preprocess`` turns raw images into the architecture's input: resize to input_size x input_size
(stated interpolation), adapt channels (gray -> RGB by repetition, RGB -> gray by ITU-R 601 luma),
then normalise with the config's mean/std. Output is float32, channels-first (C, H, W);
backends with another layout transpose it themselves. Items are preprocessed on access, so a
big input size never holds the whole resized dataset in memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class DataError(ValueError):
    """A dataset that cannot be used with the chosen architecture or options."""


@dataclass(frozen=True)
class Preprocess:
    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, C) float image in [0, 1] -> normalised (channels, size, size) float32."""
        h, w, c = image.shape
        if (h, w) != (self.size, self.size):
            resample = _RESAMPLE[self.interpolation]
            image = np.stack([np.asarray(Image.fromarray(image[:, :, k], mode="F")
                                         .resize((self.size, self.size), resample))
                              for k in range(c)], axis=-1)
        image = self._adapt_channels(image)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return np.ascontiguousarray(((image - mean) / std).transpose(2, 0, 1), dtype=np.float32)

    def _adapt_channels(self, image: np.ndarray) -> np.ndarray:
        c = image.shape[-1]
        if c == self.channels:
            return image
        if c == 1:
            return np.repeat(image, self.channels, axis=-1)
        if c in (3, 4) and self.channels == 1:
            return image[:, :, :3] @ _LUMA[:, None]
        if c == 4 and self.channels == 3:
            return image[:, :, :3]
        raise DataError(f"cannot convert {c}-channel images to {self.channels} channels; "
                        f"set arch.in_channels={c}")

    def metadata(self) -> dict:
        """What a deployer needs to feed the model; goes into the ONNX metadata."""
        return {"resize": [self.size, self.size], "interpolation": self.interpolation,
                "channels": self.channels, "scale": "pixel / 255 (to [0, 1])",
                "mean": list(self.mean), "std": list(self.std),
                "normalise": "(x - mean) / std, per channel"}


class Split:
    """A map-style dataset: ``split[i]`` is (preprocessed image, label). Torch's DataLoader and
    any other loader can index it directly."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, preprocess: Preprocess):
        self.images, self.labels, self.preprocess = images, labels.astype(np.int64), preprocess

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.preprocess(self.images[i]), self.labels[i]

    def take(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """A batch: stacked preprocessed images (N, C, H, W) and their labels."""
        indices = np.asarray(indices)
        return np.stack([self.preprocess(self.images[i]) for i in indices]), self.labels[indices]

    def batch(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.take(np.arange(start, min(stop, len(self))))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of a split's images in one epoch: a pure function of (seed, epoch), so every
    backend sees the same batches and a resumed run continues with the same order."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class Dataset:
    name: str
    images: np.ndarray  # (N, H, W, C) float32 in [0, 1]
    labels: np.ndarray  # (N,) int
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, preprocess: Preprocess, val_fraction: float, seed: int,
              limit: int | None = None) -> tuple[Split, Split]:
        """Shuffle with ``seed`` (same order on every backend), then hold out the validation part."""
        order = np.random.default_rng(seed).permutation(len(self.labels))[:limit]
        n_val = max(1, round(len(order) * val_fraction))
        if len(order) - n_val < 1:
            raise DataError(f"{self.name}: {len(order)} images leave none for training; "
                            "lower data.val_fraction or raise data.limit")
        val, train = order[:n_val], order[n_val:]
        return (Split(self.images[train], self.labels[train], preprocess),
                Split(self.images[val], self.labels[val], preprocess))


def load_digits() -> Dataset:
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


def load_dataset(cfg, seed: int) -> Dataset:
    """The dataset named by the ``data`` config group."""
    if cfg.name == "digits":
        return load_digits()
    if cfg.name == "synthetic":
        return make_synthetic(cfg.num_samples, cfg.num_classes, cfg.image_size, cfg.channels,
                              seed)
    raise DataError(f"unknown dataset '{cfg.name}'")
