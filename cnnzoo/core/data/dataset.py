"""Datasets, splits and the per-epoch order of batches.

A ``Dataset`` holds raw images and integer labels, plus an optional predefined validation part.
Raw images stay in their source's form: uint8 (N, H, W, C) where the source is 8-bit (4x less
memory than float32), uint16 for 16-bit sources, float32 in [0, 1] otherwise (the embedded
digits, synthetic data), either in memory, memory-mapped, or as image files decoded on demand
(an "image store": anything with ``len()``, ``get(positions)`` and ``channels``).
``Preprocess`` (``preprocess``) is the one contract that turns raw images into the
architecture's input, batch by batch, for every backend.

The formats (``loading``) build a ``Dataset``; this module knows none of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError
from .preprocess import Preprocess


class ArrayStore:
    """Images as one (N, H, W, C) array, in memory or memory-mapped: ``get`` copies only the
    requested rows, so a memory-mapped file is read batch by batch."""

    def __init__(self, array: np.ndarray):
        if array.ndim != 4:
            raise DataError(f"images must be an (N, H, W, C) array, got shape {array.shape}")
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    @property
    def channels(self) -> set[int]:
        return {self.array.shape[-1]}

    def get(self, positions) -> np.ndarray:
        return np.asarray(self.array[positions])


def _store(images):
    return images if hasattr(images, "get") else ArrayStore(images)


# kept images are resized in these fixed groups of the split's positions, whichever batch
# first asks: resize_batch's results can differ in the last bit with the batch it runs on, and
# a resumed run (which first asks in another order) must see the same values
KEEP_BLOCK = 256


class Split:
    """A map-style dataset: ``split[i]`` is (preprocessed image, label), ``split.take(indices)``
    a batch. Torch's DataLoader and any other loader can index it directly.

    ``index`` maps the split's positions to the images' positions in their source (the split
    holds no copy of the images). A training split has ``augment_seed`` (the run's seed): its
    augmentation, if the Preprocess has one, is drawn from (seed, epoch, source position), so a
    key may be ``i`` (epoch 0) or ``(i, epoch)``.

    ``keep_in_memory`` makes it keep each image once resized (what ``Preprocess.resized``
    returns, the same every epoch): from the second time an image is taken, only a copy,
    its augmentation and the normalisation remain, as in a loop over preprocessed tensors."""

    def __init__(self, images, labels, preprocess: Preprocess, index=None,
                 augment_seed: int | None = None):
        self.source, self.preprocess = _store(images), preprocess
        self.labels = np.asarray(labels).astype(np.int64)
        self.index = (np.arange(len(self.labels)) if index is None
                      else np.asarray(index, np.int64))
        self.augment_seed = augment_seed
        self._kept: tuple[np.ndarray, np.ndarray] | None = None  # (resized images, filled)

    def keep_in_memory(self, max_bytes: int) -> int:
        """Keep this split's resized images in memory, filled as they are first taken, if
        all of them fit in ``max_bytes``; return the bytes they take (0: not kept)."""
        p = self.preprocess
        need = len(self) * p.image_bytes
        if not 0 < need <= max_bytes:
            return 0
        # np.empty maps pages only as they are written: memory grows with the images taken
        self._kept = (np.empty((len(self), p.channels, p.size, p.size), np.float32),
                      np.zeros(-(-len(self) // KEEP_BLOCK), bool))
        return need

    def fill_memory(self, batch: int = 1024) -> None:
        """Resize every image into the kept memory now (before forking loader workers, which
        then share it instead of each filling a copy of their own)."""
        if self._kept is not None:
            for start in range(0, len(self), batch):
                self._resized(np.arange(start, min(start + batch, len(self))))

    @property
    def augments(self) -> bool:
        """Whether this split's images depend on the epoch (training with augmentation)."""
        return self.augment_seed is not None and self.preprocess.augment.enabled

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        x, y = self.take([i], epoch)
        return x[0], y[0]

    def __getitems__(self, keys):
        """A whole batch at once (torch's DataLoader uses it): one vectorised preprocess."""
        pairs = [k if isinstance(k, tuple) else (k, 0) for k in keys]
        x, y = self.take([i for i, _ in pairs], np.array([e for _, e in pairs]))
        return list(zip(x, y))

    def take(self, indices, epoch=0) -> tuple[np.ndarray, np.ndarray]:
        """A batch: preprocessed images (N, C, H, W) float32 and their int64 labels.
        ``epoch`` (one, or one per image) only matters for an augmented training split."""
        indices = np.asarray(indices, np.int64)
        keys = self.index[indices] if self.augments else None
        x = self.preprocess.finish(self._resized(indices), self.augment_seed or 0, epoch, keys)
        return x, self.labels[indices]

    def _resized(self, indices: np.ndarray) -> np.ndarray:
        """The resized images at ``indices`` (a copy: ``finish`` works in place)."""
        if self._kept is None:
            return self.preprocess.resized(self.source.get(self.index[indices]))
        kept, filled = self._kept
        for block in np.unique(indices // KEEP_BLOCK):
            if not filled[block]:
                rows = np.arange(block * KEEP_BLOCK, min((block + 1) * KEEP_BLOCK, len(self)))
                kept[rows] = self.preprocess.resized(self.source.get(self.index[rows]))
                filled[block] = True
        return kept[indices]

    def batch(self, start: int, stop: int, epoch=0) -> tuple[np.ndarray, np.ndarray]:
        return self.take(np.arange(start, min(stop, len(self))), epoch)

    def raw(self, indices):
        """The raw (unpreprocessed) images at ``indices``, as the source stores them."""
        return self.source.get(self.index[np.asarray(indices, np.int64)])


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of a split's images in one epoch: a pure function of (seed, epoch), so every
    backend sees the same batches and a resumed run continues with the same order."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_chunks(split: Split, batch_size: int, seed: int, epoch: int, shuffle: bool,
                 batches: int, chunk_bytes: int):
    """The first ``batches`` batches of ``epoch`` (in ``epoch_order``) as (images, labels)
    arrays of several whole batches each, about ``chunk_bytes`` of images, (n, C, H, W)
    float32 and (n,) int64; the epoch's smaller last batch comes alone. Each batch is its own
    ``split.take``, so a backend that cuts the chunks into batches gets exactly the images
    every backend gets (a resize's last bit can depend on the batch it runs on); a backend
    makes one tensor per chunk instead of one per batch."""
    p = split.preprocess
    order = epoch_order(len(split), seed, epoch, shuffle)[:batches * batch_size]
    whole = len(order) // batch_size * batch_size
    per_chunk = batch_size * max(1, chunk_bytes // (batch_size * p.image_bytes))
    for first in range(0, whole, per_chunk):
        part = order[first:min(first + per_chunk, whole)]
        x = np.empty((len(part), p.channels, p.size, p.size), np.float32)
        y = np.empty(len(part), np.int64)
        for b in range(0, len(part), batch_size):
            x[b:b + batch_size], y[b:b + batch_size] = split.take(part[b:b + batch_size], epoch)
        yield x, y
    if whole < len(order):
        yield split.take(order[whole:], epoch)


def _check_labels(name: str, part: str, images, labels, classes: list[str]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or (len(labels) and labels.dtype.kind not in "ui"):
        raise DataError(f"{name}: {part} labels must be one integer per image")
    if len(labels) != len(images):
        raise DataError(f"{name}: {len(images)} {part} images but {len(labels)} labels")
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if len(bad):
        raise DataError(f"{name}: {part} label {labels[bad[0]]} (image {bad[0]}) is outside the "
                        f"{len(classes)} classes 0..{len(classes) - 1}: fix the labels or name "
                        "every class")
    return labels.astype(np.int64)


def _check_finite(source: str, part: str, images, chunk: int = 4096) -> None:
    """Float images must hold numbers: a NaN or infinity is a data error, found at load time
    (in training it would look like a learning rate that is too high)."""
    if not isinstance(images, np.ndarray) or images.dtype.kind != "f":
        return  # integer pixels (and decoded image files) are always finite
    for start in range(0, len(images), chunk):  # a memory-mapped file is read piece by piece
        block = images[start:start + chunk]
        bad = np.flatnonzero(~np.isfinite(block).reshape(len(block), -1).all(axis=1))
        if len(bad):
            raise DataError(f"{source}: {part} image {start + bad[0]} has NaN or infinite "
                            "values: fix or remove it")


@dataclass
class Dataset:
    name: str
    images: Any            # (N, H, W, C) array (uint8, uint16 or float32 in [0, 1]) or a store
    labels: np.ndarray     # (N,) int
    classes: list[str]
    val_images: Any = None  # a predefined validation part (e.g. MNIST's t10k files), or None
    val_labels: np.ndarray | None = None
    path: str | None = None  # the file or folder it was read from, for messages

    def __post_init__(self):
        self.labels = _check_labels(self.name, "training", self.images, self.labels, self.classes)
        _check_finite(self.source, "training", self.images)
        if self.val_images is not None:
            self.val_labels = _check_labels(self.name, "validation", self.val_images,
                                            self.val_labels, self.classes)
            _check_finite(self.source, "validation", self.val_images)

    @property
    def source(self) -> str:
        """The dataset's name and where it was read from, e.g. ``npz /data/mine.npz``."""
        return f"{self.name} {self.path}" if self.path else self.name

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> set[int]:
        """The channel counts of the raw images (1 gray, 3 RGB, ...)."""
        parts = [self.images] + ([self.val_images] if self.val_images is not None else [])
        return set().union(*(_store(p).channels for p in parts))

    def split(self, preprocess: Preprocess, val_fraction: float, seed: int,
              limit: int | None = None) -> tuple[Split, Split]:
        """Training and validation splits, shuffled with ``seed`` (same on every backend).

        Without a predefined validation part, ``val_fraction`` of the (first ``limit``)
        shuffled images is held out. With one, each part is shuffled and cut to ``limit``."""
        for c in sorted(self.channels):
            preprocess.check_channels(c)
        n = len(self.labels)
        if self.val_images is None:
            order = np.random.default_rng(seed).permutation(n)[:limit]
            n_val = max(1, round(len(order) * val_fraction))
            if len(order) - n_val < 1:
                raise DataError(f"{self.name}: {len(order)} images leave none for training; "
                                "lower data.val_fraction or raise data.limit")
            val, train = order[:n_val], order[n_val:]
            return (Split(self.images, self.labels[train], preprocess, train, augment_seed=seed),
                    Split(self.images, self.labels[val], preprocess, val))
        if n == 0 or len(self.val_labels) == 0:
            raise DataError(f"{self.name}: the {'training' if n == 0 else 'validation'} part "
                            "has no images")
        train = np.random.default_rng(seed).permutation(n)[:limit]
        val = np.random.default_rng([seed, 1]).permutation(len(self.val_labels))[:limit]
        return (Split(self.images, self.labels[train], preprocess, train, augment_seed=seed),
                Split(self.val_images, self.val_labels[val], preprocess, val))
