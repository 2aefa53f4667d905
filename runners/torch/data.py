"""The input pipeline: a ``DataLoader`` of whole batches in the data layer's epoch order."""
from __future__ import annotations

import torch

from cnnzoo.core.data import epoch_order


class EpochBatches(torch.utils.data.Sampler):
    """The data layer's per-epoch order (``epoch_order``) cut into batches: each item is one
    whole batch, ``(indices, epoch)``, which ``SplitBatches`` fetches with one vectorised
    ``Split.take`` (no per-image ``__getitem__``, no collation). The items carry the epoch,
    since an augmented split's images depend on it and DataLoader worker processes never see
    ``set_epoch``.

    Over ``world`` processes (DDP) the batches are dealt in turn: process ``rank`` takes
    batches rank, rank + world, ... of the epoch's order. Every process then trains on
    ``data.batch_size`` images per step, so a step's global batch is ``data.batch_size`` x
    processes, and each batch holds the same images as on one device. When the processes do
    not divide the number of batches, the first few batches are dealt again (fewer than the
    processes), so that every process takes the same number of steps; those repeats count in
    the epoch's means."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool, rank: int = 0,
                 world: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle, self.epoch = n, batch_size, seed, \
            shuffle, 0
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self._batches() // self.world)

    def _batches(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        order, epoch, bs = epoch_order(self.n, self.seed, self.epoch, self.shuffle), self.epoch, \
            self.batch_size
        starts = range(0, self.n, bs)
        dealt = [starts[k % len(starts)] for k in range(self.rank, len(self) * self.world,
                                                          self.world)] if len(starts) else []
        return iter([(order[i:i + bs], epoch) for i in dealt])


class SplitBatches(torch.utils.data.Dataset):
    """A Split read batch by batch: the key is ``(indices, epoch)`` (``EpochBatches``), the
    item the batch's images (N, C, H, W) float32 and labels int64, as tensors."""

    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        indices, epoch = key
        x, y = self.split.take(indices, epoch)
        return torch.from_numpy(x), torch.from_numpy(y)


def input_pipeline(split, shuffle: bool, batch_size: int, seed: int, num_workers: int = 0,
                   pin_memory: bool = False, rank: int = 0, world: int = 1):
    """A DataLoader of whole batches (``EpochBatches``: one item per batch, so
    ``batch_size=None``), the same batches in the same order as ``split.take`` of
    ``epoch_order`` (process ``rank`` of ``world``: its share of them);
    ``loader.sampler.set_epoch`` picks the epoch. ``pin_memory`` (for a CUDA device): batches
    in page-locked memory, which are copied to the GPU without blocking the host."""
    if num_workers > 0:  # workers fork from here: they share the kept images, never copy them
        split.fill_memory()
    # a generator of its own: starting an iterator draws a seed, which from the global
    # generator (dropout's) would shift its numbers differently in a resumed run
    return torch.utils.data.DataLoader(
        SplitBatches(split), batch_size=None, num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        sampler=EpochBatches(len(split), batch_size, seed, shuffle, rank, world))
