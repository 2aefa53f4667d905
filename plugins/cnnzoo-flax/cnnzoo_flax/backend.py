"""Flax backend: the spec as a linen module (``model``), trained with optax in one jitted step
over explicit state (``train``) on the data layer's batches (``data``), its training state in
one ``.npz`` per epoch folder (``state``), canonical weights (``weights``) and ONNX export
(``onnx``).

- Hardware: the CPU or GPUs (``hardware.accelerator``: cpu, gpu, or auto: GPUs when JAX sees
  them), ``hardware.devices`` of them (-1: all) in this one process: the jitted step runs over a
  one-axis mesh, each batch split along it and the state replicated, so XLA all-reduces the
  gradients and batch norm sees the whole batch (the step computes what it computes on one
  device). Several CPU devices are XLA's host-platform devices (``jax_num_cpu_devices``, set
  before JAX starts its backends), so ``hardware=ddp_cpu`` trains on cpu:0 and cpu:1.
- Precision: ``32-true``, or ``bf16-mixed``: the training step computes in bfloat16 with
  float32 parameters, statistics and logits; ``predict`` and the export are float32.
- ``hardware.threads`` binds the process to that many CPUs per device (XLA sizes its thread
  pools from them; JAX has no thread setting); ``trainer.deterministic`` turns on XLA's
  deterministic GPU kernels.
- ``backend.matmul_precision`` is XLA's precision for float32 convolutions and matrix
  products (``highest``: true float32 on GPUs too, as the other backends compute);
  ``backend.preallocate`` is set for XLA's GPU client before it starts.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnnzoo.core.backend import Backend
from cnnzoo.core.errors import ConfigError

from . import INFO, lr_find, state
from . import train as training
from . import weights as canonical
from .data import EpochBatches, prefetch_threads
from .model import FlaxModel, build_model

_DTYPES = {"32-true": jnp.float32, "bf16-mixed": jnp.bfloat16}


def jax_started() -> bool:
    """Whether JAX has started its backends (after which the CPU device count is fixed)."""
    from jax._src import xla_bridge  # no public API says it (JAX 0.7)

    return xla_bridge.backends_are_initialized()


def _platform_devices(platform: str) -> list:
    try:
        return jax.devices(platform)
    except RuntimeError:  # no such platform in this jaxlib
        return []


def _add_xla_flag(flag: str) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if flag not in flags.split():
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def _limit_threads(n: int) -> None:
    """``hardware.threads`` (per device): JAX has no thread setting, but XLA sizes its CPU
    thread pools from the CPUs the process may run on (as under ``taskset``), so the process
    is bound to the first ``n`` of them before JAX starts its backends."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) <= n:
        return
    if jax_started():  # its pools exist: binding now would not resize them
        raise ConfigError(f"hardware.threads: JAX already runs on {len(allowed)} CPUs in this "
                          "process; set the threads in a fresh process")
    os.sched_setaffinity(0, allowed[:n])


class FlaxBackend(Backend):
    name = "flax"
    onnx_layout = "NCHW"

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        # what INFO.limits declares: the application refuses it first; a backend created
        # directly (tests, benchmarks) says the same here
        errors = INFO.unsupported(cfg)
        if errors:
            raise ConfigError("\n".join(errors))
        hw = cfg.hardware
        # "Unable to initialize backend 'tpu'" and the like: JAX probing for platforms
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
        # read when XLA's GPU client starts (the first device query), not at import
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = \
            "true" if cfg.backend.get("preallocate", False) else "false"
        jax.config.update("jax_default_matmul_precision",
                          cfg.backend.get("matmul_precision", "highest"))
        if cfg.trainer.get("deterministic"):  # XLA's GPU kernels without atomics; read when
            _add_xla_flag("--xla_gpu_deterministic_ops=true")  # its GPU client starts
        if hw.threads:
            _limit_threads(hw.threads * (1 if hw.devices == -1 else hw.devices))
        self.devices = self._devices()
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.split = NamedSharding(self.mesh, PartitionSpec("data"))
        self.dtype = _DTYPES[hw.precision]

    def _devices(self) -> list:
        """The devices ``hardware`` asks for: ``hardware.devices`` CPUs or GPUs, or (auto) GPUs
        when JAX sees enough of them, else CPUs."""
        hw = self.cfg.hardware
        wanted = hw.devices
        if wanted != 1 and hw.accelerator != "gpu" and not jax_started():
            # XLA's host platform offers one device unless told before it starts
            jax.config.update("jax_num_cpu_devices",
                              (os.cpu_count() or 1) if wanted == -1 else wanted)
        gpus = _platform_devices("gpu")
        if hw.accelerator == "gpu" or (hw.accelerator == "auto" and gpus and (
                wanted == -1 or len(gpus) >= wanted)):
            found, what = gpus, "GPU"
        else:
            found, what = jax.devices("cpu"), "CPU device"
        if wanted != -1 and len(found) < wanted:
            fix = ('install jax with CUDA (pip install "jax[cuda12]"), else use hardware=cpu'
                   if what == "GPU" else "the CPU devices are fixed when JAX starts: run in a "
                   "fresh process")
            raise ConfigError(f"hardware.devices={wanted} ({hw.accelerator}), but JAX sees "
                              f"{len(found)} {what}(s): {fix}")
        return list(found if wanted == -1 else found[:wanted])

    def put_batch(self, x, y):
        """A batch on the devices, split along the mesh (replicated when it does not divide,
        as an epoch's last batch may not)."""
        sharding = self.split if len(y) % len(self.devices) == 0 else self.replicated
        return jax.device_put((x, y), sharding)

    # ---------------------------------------------------------------- the model
    def build(self, spec, input_size) -> FlaxModel:
        return build_model(spec, input_size, self.cfg.seed)

    def count_params(self, model: FlaxModel) -> int:
        return model.param_count()

    def training_module(self, model: FlaxModel, frozen: frozenset = frozenset()):
        """The module the training step runs: the model's, computing in the precision's
        dtype (parameters stay float32), the batch norms of ``frozen`` nodes in inference
        mode."""
        return model.module.clone(dtype=self.dtype, frozen=frozen)

    def input_pipeline(self, split, shuffle: bool, limit: int | None = None) -> EpochBatches:
        bs = self.cfg.data.batch_size
        return EpochBatches(split, bs, self.cfg.seed, shuffle, limit, self.put_batch,
                            prefetch_threads(split.preprocess.image_bytes, bs))

    # ---------------------------------------------------------------- training
    def train(self, model, train, val, resume=None):
        return training.fit(self, model, train, val, resume)

    def lr_range_test(self, model, train, rates, stop) -> list[float]:
        return lr_find.lr_range_test(self, model, train, rates, stop)

    # ---------------------------------------------------------------- inference
    def predict(self, model: FlaxModel, images: np.ndarray) -> np.ndarray:
        with jax.default_device(jax.devices("cpu")[0]):
            return model.predict(images)

    def node_outputs(self, model: FlaxModel, images: np.ndarray) -> dict[str, np.ndarray]:
        with jax.default_device(jax.devices("cpu")[0]):
            return model.node_outputs(np.asarray(images, np.float32))

    # ---------------------------------------------------------------- weights and files
    def get_weights(self, model) -> dict[str, np.ndarray]:
        return canonical.get_weights(model)

    def set_weights(self, model, weights: dict[str, np.ndarray]) -> None:
        canonical.set_weights(model, weights)

    def load_checkpoint(self, model, path: Path) -> None:
        state.load_weights(model, path)

    def export_onnx(self, model, path: Path, example: np.ndarray, opset: int) -> None:
        from . import onnx

        onnx.export_onnx(model, path, example, opset)
