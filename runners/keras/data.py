"""The input pipeline: the data layer's batches as a ``tf.data.Dataset`` of NHWC batches.

A ``tf.data`` generator yields chunks of whole batches, each batch its own ``split.take`` (the
data layer's batches, bit for bit), cut into batches by ``unbatch``; a small validation split is
prepared once and held in memory. glibc's per-thread heaps would give every array that
generator allocates fresh pages (TensorFlow runs it in its own threads), so
``backend.malloc_top_pad_mb`` (default 8) lets them keep that much memory (``tune_malloc``;
null: malloc untouched).
"""
from __future__ import annotations

import ctypes
import math
import os

import numpy as np

from cnnzoo.core.data import epoch_chunks

from .model import tf

CHUNK_BYTES = 4 << 20  # input pipeline: images per call of its Python generator (whole batches)
IN_MEMORY_BYTES = 128 << 20  # an unshuffled, unaugmented split up to this size is held in memory

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt() parameters


def tune_malloc(top_pad_mb) -> bool:
    """Keep glibc's per-thread heaps from handing memory back after every free: the input
    pipeline's generator runs in TensorFlow's threads, whose malloc arenas (unlike the main
    thread's) shrink their heap whenever its top is freed, so every batch array that generator
    allocates starts on fresh pages: one page fault per 4 KiB, 7x the CPU time of a LeNet-5
    ``split.take``. ``M_TOP_PAD`` lets each heap keep ``top_pad_mb`` MiB; setting it turns
    off glibc's self-tuning of the mmap and trim thresholds, so they are set to the ceilings
    that self-tuning reaches (32 and 64 MiB). Process-wide; glibc only (elsewhere, or with
    ``top_pad_mb`` null or 0, nothing changes). Returns whether it applied."""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        glibc = ""
    if not top_pad_mb or not glibc.startswith("glibc"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 64 << 20),
        (_M_TOP_PAD, int(top_pad_mb) << 20)))


def to_nhwc(images: np.ndarray) -> np.ndarray:
    """The data layer's NCHW float32 batch as the NHWC batch Keras takes: the one place the
    layout changes."""
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1), dtype=np.float32)


def input_pipeline(split, batch_size: int, seed: int, shuffle: bool, epochs: int = 1,
                   limit: int | None = None, start: int = 0):
    """A ``tf.data.Dataset`` of (NHWC images, labels) batches: epoch ``start``'s batches in
    ``epoch_order(len(split), seed, start, shuffle)``, then the next epoch's, ... up to
    epoch ``epochs`` - 1, each epoch with its own augmentation; ``limit`` batches per epoch
    (default all). Training runs ``model.fit(initial_epoch=start)`` over it with
    ``steps_per_epoch`` = batches per epoch, so epoch e consumes exactly epoch e's
    batches, also when resumed.

    The Python generator yields the data layer's ``epoch_chunks`` of many whole batches
    (``CHUNK_BYTES`` of images; each batch still its own ``split.take``), in NHWC and
    shaped (batches, batch, H, W, C), and ``unbatch`` cuts them into batches in C++: each
    call of a ``from_generator`` generator costs far more than preparing a LeNet-5 batch.
    An epoch's last, smaller batch is a chunk of its own, so no batch mixes two epochs. The
    next chunk is prepared while the current one trains (``prefetch``). A split whose batches
    are the same every epoch (unshuffled, not augmented: validation) of at most
    ``IN_MEMORY_BYTES`` is prepared the same way once and held in memory: Keras starts a new
    iterator for every validation, which costs ~20 ms on a generator and ~1 ms on tensors."""
    bs = batch_size
    per_epoch = math.ceil(len(split) / bs)
    per_epoch = per_epoch if limit is None else min(per_epoch, limit)
    c, size = split.preprocess.channels, split.preprocess.size

    def nhwc_chunks(epoch: int, chunk_bytes: int):
        """``epoch_chunks`` as (batches, batch, H, W, C) images and (batches, batch)
        labels; the epoch's smaller last batch comes alone, (1, rest, H, W, C)."""
        for x, y in epoch_chunks(split, bs, seed, epoch, shuffle, per_epoch, chunk_bytes):
            n = bs if len(y) % bs == 0 else len(y)
            yield to_nhwc(x).reshape(-1, n, size, size, c), y.reshape(-1, n)

    options = tf.data.Options()
    options.deterministic = True
    # one worker: the batches are split over the replicas, never sharded by file
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF)
    if (not shuffle and not split.augments and epochs > start and per_epoch > 0
            and min(len(split), per_epoch * bs) * split.preprocess.image_bytes
            <= IN_MEMORY_BYTES):
        # the same batches every epoch (validation): prepared once, held in memory
        parts = [tf.data.Dataset.from_tensor_slices(part)
                 for part in nhwc_chunks(start, IN_MEMORY_BYTES)]
        ds = parts[0] if len(parts) == 1 else parts[0].concatenate(parts[1])
        ds = ds.repeat(epochs - start)
    else:
        def chunks():
            for epoch in range(start, epochs):
                yield from nhwc_chunks(epoch, CHUNK_BYTES)

        ds = tf.data.Dataset.from_generator(chunks, output_signature=(
            tf.TensorSpec((None, None, size, size, c), tf.float32),
            tf.TensorSpec((None, None), tf.int64)))
        ds = ds.prefetch(1).unbatch()
    # a known length: Keras then never reads past the last batch (or warns that it ran out)
    ds = ds.apply(tf.data.experimental.assert_cardinality(max(0, epochs - start) * per_epoch))
    return ds.with_options(options).prefetch(2)
