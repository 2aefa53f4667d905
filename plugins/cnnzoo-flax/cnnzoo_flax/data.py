"""The input pipeline: a Split as numpy batches in the order every backend uses."""
from __future__ import annotations

import math

import numpy as np

from cnnzoo.core.data import epoch_chunks

CHUNK_BYTES = 8 << 20  # images preprocessed per chunk (``epoch_chunks``), cut into batches


class EpochBatches:
    """A Split as (images, labels) batches, (n, C, H, W) float32 and (n,) int32 (JAX computes
    in 32 bits), in ``cnnzoo.core.data.epoch_order`` for the current epoch (``set_epoch``) and
    with that epoch's augmentation: the batches every backend sees for the same seed. Each
    batch is a view of a chunk of ``epoch_chunks``; the jitted step copies it to its device.
    ``limit`` caps the number of batches."""

    def __init__(self, split, batch_size: int, seed: int, shuffle: bool, limit: int | None = None):
        self.split, self.batch_size, self.seed, self.shuffle = split, batch_size, seed, shuffle
        self.epoch = 0
        self.num_batches = math.ceil(len(split) / batch_size)
        if limit is not None:
            self.num_batches = min(self.num_batches, limit)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        bs = self.batch_size
        for x, y in epoch_chunks(self.split, bs, self.seed, self.epoch, self.shuffle,
                                 self.num_batches, CHUNK_BYTES):
            y = y.astype(np.int32)
            for b in range(0, len(y), bs):
                yield x[b:b + bs], y[b:b + bs]
