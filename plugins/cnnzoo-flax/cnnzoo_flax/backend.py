"""Flax backend: the spec as a linen module (``model``), trained with optax in one jitted step
over explicit state (``train``) on the data layer's batches (``data``), its training state in
one ``.npz`` per epoch folder (``state``), canonical weights (``weights``) and ONNX export
(``onnx``).

- Hardware: one device, the CPU or a GPU (``hardware.accelerator``: cpu, gpu, or auto: a GPU
  when JAX sees one). ``hardware.devices`` other than 1 is refused in one line for now.
- Precision: ``32-true``, or ``bf16-mixed``: the training step computes in bfloat16 with
  float32 parameters, statistics and logits; ``predict`` and the export are float32.
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

from cnnzoo.core.backend import Backend
from cnnzoo.core.errors import ConfigError

from . import INFO, lr_find, state
from . import train as training
from . import weights as canonical
from .data import EpochBatches
from .model import FlaxModel, build_model

_DTYPES = {"32-true": jnp.float32, "bf16-mixed": jnp.bfloat16}


class FlaxBackend(Backend):
    name = "flax"
    onnx_layout = "NCHW"

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        # what INFO.limits declares: the application refuses it first; a backend created
        # directly (tests, benchmarks) says the same here
        errors = INFO.unsupported(cfg)
        hw = cfg.hardware
        if hw.devices != 1:
            errors.append(f"hardware.devices={hw.devices} is not supported by backend=flax yet: "
                          "use hardware.devices=1 (one CPU or GPU)")
        if errors:
            raise ConfigError("\n".join(errors))
        # "Unable to initialize backend 'tpu'" and the like: JAX probing for platforms
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
        # read when XLA's GPU client starts (the first device query), not at import
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = \
            "true" if cfg.backend.get("preallocate", False) else "false"
        jax.config.update("jax_default_matmul_precision",
                          cfg.backend.get("matmul_precision", "highest"))
        self.device = self._device()
        self.dtype = _DTYPES[hw.precision]

    def _device(self):
        """The device ``hardware.accelerator`` asks for: the CPU, a GPU, or (auto) JAX's
        default (a GPU when jaxlib has CUDA and sees one)."""
        accelerator = self.cfg.hardware.accelerator
        if accelerator == "cpu":
            return jax.devices("cpu")[0]
        if accelerator == "gpu":
            try:
                return jax.devices("gpu")[0]
            except RuntimeError:
                raise ConfigError("hardware.accelerator=gpu, but JAX sees no GPU: install jax "
                                  'with CUDA (pip install "jax[cuda12]"), else use '
                                  "hardware=cpu") from None
        return jax.devices()[0]

    # ---------------------------------------------------------------- the model
    def build(self, spec, input_size) -> FlaxModel:
        return build_model(spec, input_size, self.cfg.seed)

    def count_params(self, model: FlaxModel) -> int:
        return model.param_count()

    def training_module(self, model: FlaxModel):
        """The module the training step runs: the model's, computing in the precision's
        dtype (parameters stay float32)."""
        return model.module.clone(dtype=self.dtype)

    def input_pipeline(self, split, shuffle: bool, limit: int | None = None) -> EpochBatches:
        return EpochBatches(split, self.cfg.data.batch_size, self.cfg.seed, shuffle, limit)

    # ---------------------------------------------------------------- training
    def train(self, model, train, val, resume=None):
        return training.fit(self, model, train, val, resume)

    def lr_range_test(self, model, train, rates, stop) -> list[float]:
        return lr_find.lr_range_test(self, model, train, rates, stop)

    # ---------------------------------------------------------------- inference
    def predict(self, model: FlaxModel, images: np.ndarray) -> np.ndarray:
        with jax.default_device(jax.devices("cpu")[0]):
            return model.predict(images)

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
