"""The input pipeline: a Split as NDArray batches in the order every backend uses."""
from __future__ import annotations

import math

import numpy as np

from cnnzoo.core.data import epoch_chunks

from .compat import import_mxnet

CHUNK_BYTES = 8 << 20  # images per NDArray, cut into whole batches (EpochBatches)


class EpochBatches:
    """A Split as (images, labels) NDArray batches on the CPU, in ``cnnzoo.core.data.epoch_order``
    for the current epoch (``set_epoch``) and with that epoch's augmentation, so every backend
    sees the same batches; labels are float32, as MXNet's loss and accuracy take them.
    ``limit`` caps the number of batches.

    Batches are cut from ``cnnzoo.core.data.epoch_chunks`` of ``CHUNK_BYTES`` of images: each
    chunk becomes an NDArray without a copy (``from_numpy(zero_copy=True)``: a fresh array
    nobody else writes) and each batch is a slice of it (a view: no copy, no engine call). Not
    ``mx.nd.array``: it copies synchronously in this thread, so one per batch makes Python
    wait for the engine every step, and a copy of 200,000 elements or more runs an OpenMP team
    in this thread, after which LeNet-5 steps at 2 threads ran 2.5x slower for the rest of
    the process (measured with MXNet 1.9.1)."""

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
        mx, bs = import_mxnet(), self.batch_size
        for x, y in epoch_chunks(self.split, bs, self.seed, self.epoch, self.shuffle,
                                 self.num_batches, CHUNK_BYTES):
            x = mx.nd.from_numpy(x, zero_copy=True)
            y = mx.nd.from_numpy(y.astype(np.float32), zero_copy=True)
            for b in range(0, len(y), bs):
                yield x[b:b + bs], y[b:b + bs]
