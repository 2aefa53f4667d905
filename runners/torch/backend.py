"""PyTorch backend: the spec as an ``nn.Module`` (``model``), trained in a loop on Lightning
Fabric (``train``) over a DataLoader of the data layer's batches (``data``).

Files: ``metrics.csv``, ``tensorboard/`` and ``checkpoints/epoch-NNNN/`` come from
``cnnzoo.core.training.TrainingProtocol``; each epoch folder holds ``model.ckpt``, the full
training state (``state``), which a resume loads before its first epoch. Every load is
``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from lightning_fabric.utilities.seed import seed_everything

from cnnzoo.core.backend import Backend
from cnnzoo.core.training import TrainReport

from . import data, lr_find, onnx, state
from . import weights as canonical
from .model import SpecModule
from .train import check_gpus, fit

MAX_AUTO_WORKERS = 8
# below this, a batch's preprocessing costs less than handing it over from a worker (on an
# H200 host: LeNet-5's 128 KB batches 8,742 images/s without workers, 6,851 with 8; ResNet-50's
# 77 MB batches 1,042 without, 2,526 with 8; docs/benchmarks.md, GPU)
AUTO_WORKERS_MIN_BATCH_BYTES = 4 * 2**20


def trains_on_cuda(hw) -> bool:
    """Whether Lightning will train on CUDA GPUs (``accelerator: auto`` takes one if any)."""
    return hw.accelerator == "gpu" or (hw.accelerator == "auto" and torch.cuda.is_available())


def loader_workers(cfg, on_cuda: bool, batch_bytes: int) -> int:
    """``backend.num_workers``. auto: none on the CPU, where the steps already use every core
    and workers only compete with them, nor for batches under
    ``AUTO_WORKERS_MIN_BATCH_BYTES``; else, so that the preprocessing of the next batches
    overlaps the GPU's steps, the cores this process may use, shared by the training
    processes on this machine, less one for each process's own loop, at most
    ``MAX_AUTO_WORKERS``."""
    wanted = cfg.backend.num_workers
    if wanted != "auto":
        return wanted
    if not on_cuda or batch_bytes < AUTO_WORKERS_MIN_BATCH_BYTES:
        return 0
    devices = cfg.hardware.devices
    processes = torch.cuda.device_count() if devices == -1 else devices
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(MAX_AUTO_WORKERS, (cores or 1) // max(1, processes) - 1))


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        if cfg.hardware.threads:
            torch.set_num_threads(cfg.hardware.threads)
        self._fabric = None

    @property
    def is_main_process(self) -> bool:
        if self._fabric is not None:
            return self._fabric.is_global_zero
        return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0

    def build(self, spec, input_size):
        seed_everything(self.cfg.seed, workers=True, verbose=False)
        net = SpecModule(spec, input_size)
        if self.cfg.backend.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net

    def count_params(self, model) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def input_pipeline(self, split, shuffle: bool, rank: int = 0, world: int = 1):
        """A DataLoader of whole batches in ``epoch_order`` (``data.input_pipeline``), process
        ``rank``'s share of ``world``; ``loader.sampler.set_epoch`` picks the epoch. On a CUDA
        device its batches are pinned."""
        on_cuda, batch = trains_on_cuda(self.cfg.hardware), self.cfg.data.batch_size
        workers = loader_workers(self.cfg, on_cuda, batch * split.preprocess.image_bytes)
        return data.input_pipeline(split, shuffle, batch, self.cfg.seed, workers,
                                   pin_memory=on_cuda, rank=rank, world=world)

    def train(self, model, train, val, resume=None) -> TrainReport:
        check_gpus(self.cfg.hardware)
        loaders = functools.partial(self._loaders, train, val)
        self._fabric, report = fit(self.cfg, self.run_dir, model, loaders, resume,
                                   self.epoch_end_hooks)
        return report

    def lr_range_test(self, model, train, rates, stop) -> list[float]:
        return lr_find.lr_range_test(self.cfg, model, self.input_pipeline(train, True), rates,
                                     stop)

    def _loaders(self, train, val, rank: int, world: int):
        """One process's training and validation loaders (called in the process that trains)."""
        return self.input_pipeline(train, True, rank, world), \
            self.input_pipeline(val, False, rank, world)

    def predict(self, model, images: np.ndarray) -> np.ndarray:
        model = model.cpu().float().eval()
        with torch.inference_mode():
            return model(torch.from_numpy(images)).numpy()

    def node_outputs(self, model, images: np.ndarray) -> dict[str, np.ndarray]:
        model = model.cpu().float().eval()
        with torch.inference_mode():
            return {k: v.numpy() for k, v in model.node_outputs(torch.from_numpy(images)).items()}

    def save_checkpoint(self, model, path: Path) -> None:
        """The model's weights alone (``state.save_weights``), readable by ``load_checkpoint``."""
        state.save_weights(model, path)

    def load_checkpoint(self, model, path: Path) -> None:
        state.load_weights(model, path)

    def get_weights(self, model) -> dict[str, np.ndarray]:
        return canonical.get_weights(model)

    def set_weights(self, model, weights: dict[str, np.ndarray]) -> None:
        canonical.set_weights(model, weights)

    def export_onnx(self, model, path: Path, example: np.ndarray, opset: int) -> None:
        onnx.export_onnx(model, path, example, opset)
