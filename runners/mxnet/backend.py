"""MXNet backend: the spec as a hybridized Gluon ``HybridBlock`` (``model``), trained with
``gluon.Trainer`` (``train``) on NDArray batches (``data``), its training state in checkpoint
files without pickle (``state``), canonical weights (``weights``) and ONNX export (``onnx``).

- Hardware: one CPU or GPU context, or ``hardware.devices`` contexts in this one process (each
  batch split over them, gradients summed by a kvstore): ``hardware=ddp_cpu`` trains on
  ``cpu(0)`` and ``cpu(1)``. GPUs need the CUDA build of MXNet (``mxnet-cu112``). Only 32-bit
  precision is supported.
- MXNet reads its CPU thread settings when it is imported, so it is imported only when the
  backend is created (``compat.import_mxnet``), with ``OMP_NUM_THREADS`` /
  ``MXNET_OMP_MAX_THREADS`` from ``hardware.threads``; the compatibility shims
  (``compat.patch_mxnet``) come first. ``hardware.threads: null`` means every physical core
  this process may run on (Linux sysfs topology of ``os.sched_getaffinity``;
  ``os.cpu_count()`` elsewhere), unless ``OMP_NUM_THREADS`` is already set, which MXNet then
  follows: MXNet's own default is half the logical CPUs, which assumes two hyper-threads per
  core and leaves a core idle where there are none (ResNet-50 on 2 cores without
  hyper-threading: 1 thread).
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np

from architectures import spec as S
from cnnzoo.core.backend import Backend
from cnnzoo.core.errors import ConfigError

from . import INFO, lr_find, onnx, state
from . import train as training
from . import weights as native_weights
from .compat import import_mxnet, patch_mxnet
from .data import EpochBatches

patch_mxnet()  # numpy.bool and onnx.mapping, before mxnet is imported


class MXNetBackend(Backend):
    name = "mxnet"
    onnx_layout = "NCHW"

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        hw = cfg.hardware
        # what INFO.limits declares: the application refuses it first; a backend created
        # directly (tests, benchmarks) says the same here, with the context problems
        errors = INFO.unsupported(cfg)
        self.mx = import_mxnet(hw.threads, cfg.trainer.deterministic)
        try:
            self.contexts = self._contexts()
        except ConfigError as err:
            errors.append(str(err))
        if errors:
            raise ConfigError("\n".join(errors))

    def _contexts(self) -> list:
        """The MXNet contexts ``hardware`` asks for: GPUs when requested (or ``auto`` and one is
        visible to a CUDA build of MXNet), else CPU contexts, ``hardware.devices`` of them."""
        mx, hw = self.mx, self.cfg.hardware
        gpus = mx.context.num_gpus()
        if hw.accelerator == "gpu" and (gpus == 0 or gpus < hw.devices):
            raise ConfigError(f"hardware.accelerator=gpu, hardware.devices={hw.devices}, but MXNet "
                              f"sees {gpus} GPU(s): a GPU needs MXNet's CUDA build "
                              "(pip install mxnet-cu112==1.9.1), else use hardware=cpu")
        if hw.accelerator == "gpu" or (hw.accelerator == "auto" and gpus and gpus >= hw.devices):
            return [mx.gpu(i) for i in range(gpus if hw.devices == -1 else hw.devices)]
        count = (os.cpu_count() or 1) if hw.devices == -1 else hw.devices  # -1: all, as Lightning
        return [mx.cpu(i) for i in range(count)]

    # ---------------------------------------------------------------- the model
    def build(self, spec, input_size):
        from .model import SpecNet, initialize

        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)
        self.mx.random.seed(self.cfg.seed)
        net = SpecNet(spec, input_size)
        initialize(self.mx, net, spec.init)
        b = self.cfg.backend
        if b.get("hybridize", True):
            # static_shape with several contexts in parallel corrupts batch-norm statistics now
            # and then in MXNet 1.9.1 (seeded runs differ by up to ~10% there); static_alloc
            # alone is safe, so multi-context training runs without static_shape
            net.hybridize(static_alloc=b.get("static_alloc", True),
                          static_shape=b.get("static_shape", True) and len(self.contexts) == 1)
        return net

    def count_params(self, model) -> int:
        return sum(math.prod(p.shape) for p in model.collect_params().values()
                   if p.grad_req != "null")

    def input_pipeline(self, split, shuffle: bool, limit: int | None = None) -> EpochBatches:
        return EpochBatches(split, self.cfg.data.batch_size, self.cfg.seed, shuffle, limit)

    # ---------------------------------------------------------------- training
    def train(self, model, train, val, resume=None):
        return training.fit(self, model, train, val, resume)

    def lr_range_test(self, model, train, rates, stop) -> list[float]:
        return lr_find.lr_range_test(self, model, train, rates, stop)

    # ---------------------------------------------------------------- inference
    def predict(self, model, images: np.ndarray) -> np.ndarray:
        x = self.mx.nd.array(images, ctx=self.mx.cpu(), dtype=np.float32)
        return model.logits(x).asnumpy()

    def node_outputs(self, model, images: np.ndarray) -> dict[str, np.ndarray]:
        x = self.mx.nd.array(images, ctx=self.mx.cpu(), dtype=np.float32)
        with self.mx.autograd.predict_mode():
            values = model.inference_graph.node_values(x)
        return {k: v.asnumpy() for k, v in values.items() if k != S.INPUT}

    # ---------------------------------------------------------------- weights and files
    def get_weights(self, model) -> dict[str, np.ndarray]:
        return native_weights.get_weights(model)

    def set_weights(self, model, weights: dict[str, np.ndarray]) -> None:
        native_weights.set_weights(self.mx, model, weights)

    def save_checkpoint(self, model, path: Path) -> None:
        model.save_parameters(str(path))

    def load_checkpoint(self, model, path: Path) -> None:
        state.load_weights_file(self.mx, model, path)

    def export_onnx(self, model, path: Path, example: np.ndarray, opset: int) -> None:
        onnx.export_onnx(self.mx, model, path, example, opset)
