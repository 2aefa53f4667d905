"""Keras (TensorFlow) backend: the spec as a functional ``keras.Model`` (NHWC), trained with
``model.fit`` on a ``tf.data`` pipeline fed by the project's data layer. This module ties the
package together: ``model`` (spec -> Keras), ``data`` (input pipeline), ``train`` (``fit`` with
``TrainingProtocol``), ``state`` (checkpoint files), ``weights`` (canonical weights), ``onnx``.

- Layout: the data layer yields NCHW batches; ``to_nhwc`` is the one place they are transposed
  for Keras (training, validation, ``predict``). The exported ONNX model takes NHWC
  (``onnx_layout``), as the shared verification stage knows.
- Hardware: ``hardware.accelerator`` picks the CPU or the GPUs TensorFlow sees; with
  ``hardware.devices`` > 1 (or -1: all) the model is replicated by ``tf.distribute.
  MirroredStrategy`` in this one process, over GPUs or over as many logical CPU devices (so
  ``hardware=ddp_cpu``, a torch DDP preset, trains on two mirrored CPU replicas). Each batch of
  ``data.batch_size`` images is split over the replicas (as the mxnet backend does).
  ``hardware.precision`` maps to Keras' mixed-precision policies; the logits layers stay float32.
- Files in the run directory: ``metrics.csv``, ``tensorboard/`` and
  ``checkpoints/epoch-NNNN/model.weights.h5`` (and ``model.keras`` after the last epoch)
  with ``state.json`` after every epoch, written by ``cnnzoo.core.training.
  TrainingProtocol`` (the checkpoint's content: ``state``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from cnnzoo.core.backend import Backend
from cnnzoo.core.errors import ConfigError
from cnnzoo.core.optim import Optimizer
from cnnzoo.core.training import TrainReport

from . import lr_find, state
from . import onnx as keras_onnx
from . import weights as canonical
from .data import input_pipeline, to_nhwc, tune_malloc
from .model import build_model, inference_model, keras, tf  # TensorFlow, imported quietly
from .state import CHECKPOINT
from .train import coupled_weight_decay, fit

__all__ = ["CHECKPOINT", "KerasBackend", "keras", "tf", "to_nhwc"]

PRECISION_POLICIES = {"32-true": None, "bf16-mixed": "mixed_bfloat16",
                      "16-mixed": "mixed_float16"}


class _Inference:
    """A float32, logits-only model for ``predict`` and export, its compiled call, and the
    model it stands for (kept, so that its ``id`` is never reused while cached)."""

    def __init__(self, source, model):
        self.source, self.model = source, model
        # one trace for every batch size (verification runs several, evaluate a remainder):
        # a shape-specific trace and then a generalized one cost seconds each for a big model
        batch = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        self.call = tf.function(lambda x: model(x, training=False), input_signature=[batch],
                                jit_compile=False)


class KerasBackend(Backend):
    name = "keras"
    onnx_layout = "NHWC"

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        tune_malloc(cfg.backend.get("malloc_top_pad_mb", 8))
        self.policy = PRECISION_POLICIES[cfg.hardware.precision]
        self.devices, self.kind = self._configure_devices()
        if cfg.trainer.deterministic:
            tf.config.experimental.enable_op_determinism()
        self.strategy = (tf.distribute.MirroredStrategy(self.devices) if len(self.devices) > 1
                         else tf.distribute.get_strategy())
        self._built: dict[int, tuple] = {}      # id(model) -> (spec, input_size)
        self._inference: dict[int, _Inference] = {}

    # ---------------------------------------------------------------- hardware
    def _configure_devices(self) -> tuple[list[str], str]:
        """The devices ``hardware`` asks for, set up before TensorFlow initializes its runtime:
        hidden GPUs for the CPU, logical CPU devices for mirrored CPU replicas, thread pools.
        (``hardware.num_nodes`` is 1: the declared limit, checked by the application.)"""
        hw = self.cfg.hardware
        gpus = tf.config.list_physical_devices("GPU")
        if hw.accelerator == "gpu" and (not gpus or hw.devices > len(gpus)):
            raise ConfigError(f"hardware.accelerator=gpu, hardware.devices={hw.devices}, but "
                              f"TensorFlow sees {len(gpus)} GPU(s): a GPU needs TensorFlow's CUDA "
                              "build (README, GPU section), else use hardware=cpu")
        use_gpu = hw.accelerator == "gpu" or (hw.accelerator == "auto" and gpus
                                             and len(gpus) >= hw.devices)
        try:
            if use_gpu:
                for gpu in gpus:  # take memory as needed (onnxruntime may share the GPU)
                    tf.config.experimental.set_memory_growth(gpu, True)
                count = len(gpus) if hw.devices == -1 else hw.devices
                devices = [f"/gpu:{i}" for i in range(count)]
            else:
                if gpus:
                    tf.config.set_visible_devices([], "GPU")
                count = (os.cpu_count() or 1) if hw.devices == -1 else hw.devices
                if count > 1:
                    cpu = tf.config.list_physical_devices("CPU")[0]
                    tf.config.set_logical_device_configuration(
                        cpu, [tf.config.LogicalDeviceConfiguration()] * count)
                devices = [f"/cpu:{i}" for i in range(count)]
            if hw.threads:
                tf.config.threading.set_intra_op_parallelism_threads(hw.threads)
                # mirrored replicas are independent ops: let them run side by side
                tf.config.threading.set_inter_op_parallelism_threads(hw.threads * len(devices))
        except RuntimeError:  # TensorFlow already initialized in this process (e.g. tests)
            kind = "GPU" if use_gpu else "CPU"
            found = len(tf.config.list_logical_devices(kind))
            count = found if hw.devices == -1 else hw.devices
            if found < count:
                raise ConfigError(f"hardware.devices={hw.devices}: TensorFlow is already "
                                  f"initialized in this process with {found} {kind} device(s)")
            devices = [f"/{kind.lower()}:{i}" for i in range(count)]
        return devices, "gpu" if use_gpu else "cpu"

    def _announce_strategy(self) -> None:
        hw = self.cfg.hardware
        if len(self.devices) < 2:
            return
        what = f"{len(self.devices)} {'GPUs' if self.kind == 'gpu' else 'logical CPU devices'}"
        note = (f"hardware.strategy={hw.strategy} is a torch concept; " if hw.strategy not in
                ("auto", None) else "")
        print(f"keras: {note}training with tf.distribute.MirroredStrategy over {what} in this "
              f"process ({', '.join(self.devices)})", flush=True)

    # ---------------------------------------------------------------- model
    def build(self, spec, input_size):
        keras.utils.set_random_seed(self.cfg.seed)  # Python, NumPy and TensorFlow
        with self.strategy.scope():
            model = build_model(spec, input_size, self.policy,
                                coupled_weight_decay(Optimizer.from_config(self.cfg.optim)))
        self._built[id(model)] = (spec, input_size)
        return model

    def count_params(self, model) -> int:
        return int(sum(math.prod(w.shape) for w in model.trainable_weights))

    def input_pipeline(self, split, shuffle: bool, epochs: int = 1, limit: int | None = None,
                       start: int = 0):
        """``data.input_pipeline`` with this run's batch size and seed."""
        return input_pipeline(split, self.cfg.data.batch_size, self.cfg.seed, shuffle, epochs,
                              limit, start)

    # ---------------------------------------------------------------- training
    def train(self, model, train, val, resume=None) -> TrainReport:
        self._announce_strategy()
        spec, _ = self._built[id(model)]
        # keys beside the hardware config in results.json (none replaces one)
        extra = {"device": self.devices[0], "replica_devices": self.devices,
                 "replicas": self.strategy.num_replicas_in_sync,
                 "distribution": "MirroredStrategy" if len(self.devices) > 1 else "none",
                 "dtype_policy": self.policy or "float32"}
        self._inference.pop(id(model), None)  # the weights change from here on
        try:
            return fit(model, spec, train, val, resume, cfg=self.cfg, run_dir=self.run_dir,
                       strategy=self.strategy, policy=self.policy, devices=len(self.devices),
                       extra=extra, hooks=self.epoch_end_hooks)
        finally:
            self._inference.pop(id(model), None)  # the weights changed

    def lr_range_test(self, model, train, rates, stop) -> list[float]:
        spec, _ = self._built[id(model)]
        self._inference.pop(id(model), None)  # the weights change from here on
        try:
            return lr_find.lr_range_test(model, spec, train, rates, stop, cfg=self.cfg,
                                         strategy=self.strategy, policy=self.policy)
        finally:
            self._inference.pop(id(model), None)

    # ---------------------------------------------------------------- inference
    def _inference_of(self, model) -> _Inference:
        """The float32 logits-only view of ``model``: its own layers when it computes in
        float32, else the spec rebuilt in float32 with ``model``'s weights (mixed precision)."""
        cached = self._inference.get(id(model))
        if cached is None or cached.source is not model:
            view = model
            if self.policy is not None:
                spec, size = self._built[id(model)]
                with tf.device("/cpu:0"):
                    view = build_model(spec, size)
                view.set_weights(model.get_weights())
            cached = self._inference[id(model)] = _Inference(model, inference_model(view))
        return cached

    def predict(self, model, images: np.ndarray) -> np.ndarray:
        with tf.device("/cpu:0"):
            out = self._inference_of(model).call(tf.constant(to_nhwc(images)))
        return np.asarray(out, dtype=np.float32)

    def node_outputs(self, model, images: np.ndarray) -> dict[str, np.ndarray]:
        spec = self._built[id(model)][0]
        layers = {layer.name for layer in model.layers}
        names = [n.name for n in spec.nodes if n.name in layers and n.name not in spec.aux_outputs]
        probe = keras.Model(model.inputs[0], [model.get_layer(n).output for n in names])
        with tf.device("/cpu:0"):
            outs = probe(tf.constant(to_nhwc(images)), training=False)
        return {n: np.asarray(np.transpose(o, (0, 3, 1, 2)) if len(o.shape) == 4 else o,
                              dtype=np.float32) for n, o in zip(names, outs)}

    # ---------------------------------------------------------------- weights
    def get_weights(self, model) -> dict[str, np.ndarray]:
        return canonical.get_weights(model, self._built[id(model)][0])

    def set_weights(self, model, weights) -> None:
        spec, size = self._built[id(model)]
        canonical.set_weights(model, spec, size, weights)
        self._inference.pop(id(model), None)  # a mixed-precision float32 copy is stale now

    # ---------------------------------------------------------------- files
    def save_checkpoint(self, model, path: Path) -> None:
        """``.keras``: the whole model (architecture, weights, optimizer state if compiled);
        ``.weights.h5``: the weights (and the optimizer's variables, if compiled)."""
        state.save_checkpoint(model, path)

    def load_checkpoint(self, model, path: Path) -> None:
        """Weights from a ``.keras`` file (a file with code is refused) or a ``.weights.h5``
        file (data only) into ``model``."""
        state.load_checkpoint(model, path)
        self._inference.pop(id(model), None)

    def export_onnx(self, model, path: Path, example: np.ndarray, opset: int) -> None:
        """The float32 logits-only model through tf2onnx (``onnx``), input "input" (N, H, W, C)
        with a dynamic N, output "logits"."""
        keras_onnx.export_onnx(self._inference_of(model).model, path, opset,
                               self.cfg.backend.get("onnx_lift_min_size", 1))
