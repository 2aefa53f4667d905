"""The input pipeline: a Split as device batches in the order every backend uses, prepared
ahead of the training step by worker threads."""
from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cnnzoo.core.data import epoch_order

AHEAD = 2                   # batches prepared beyond the one the step runs on
MANY_THREADS_BYTES = 4 << 20  # batches of at least 4 MiB of images get several threads
MAX_THREADS = 8


def prefetch_threads(image_bytes: int, batch_size: int) -> int:
    """One thread ahead of the step for small batches (LeNet-5's 128 KB: more threads only
    contend for the interpreter), up to ``MAX_THREADS`` for large ones (a ResNet-50 batch of
    128 at 224x224 is 77 MB: one thread's resize and normalisation cannot keep a GPU busy)."""
    if image_bytes * batch_size < MANY_THREADS_BYTES:
        return 1
    return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0))))


class EpochBatches:
    """A Split as (images, labels) batches, (n, C, H, W) float32 and (n,) int32 (JAX computes
    in 32 bits), in ``cnnzoo.core.data.epoch_order`` for the current epoch (``set_epoch``) and
    with that epoch's augmentation: the batches every backend sees for the same seed (each is
    one ``Split.take``, as ``epoch_chunks`` takes them). ``put`` places a batch on the
    devices; ``threads`` workers prepare and place the next ``AHEAD`` batches while the step
    runs, and batches come out in order, so the result does not depend on the thread count.
    ``limit`` caps the number of batches."""

    def __init__(self, split, batch_size: int, seed: int, shuffle: bool, limit: int | None = None,
                 put=lambda x, y: (x, y), threads: int = 1):
        self.split, self.batch_size, self.seed, self.shuffle = split, batch_size, seed, shuffle
        self.put, self.threads, self.epoch = put, threads, 0
        self.num_batches = math.ceil(len(split) / batch_size)
        if limit is not None:
            self.num_batches = min(self.num_batches, limit)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _batch(self, indices: np.ndarray, epoch: int):
        x, y = self.split.take(indices, epoch)
        return self.put(x, y.astype(np.int32))

    def __iter__(self):
        bs, epoch = self.batch_size, self.epoch
        order = epoch_order(len(self.split), self.seed, epoch, self.shuffle)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="cnnzoo-batches") as pool:
            queued = deque()
            for i in range(self.num_batches):
                queued.append(pool.submit(self._batch, order[i * bs:(i + 1) * bs], epoch))
                if len(queued) > AHEAD:
                    yield queued.popleft().result()
            while queued:
                yield queued.popleft().result()
