"""Keras (TensorFlow) backend: the spec as a functional ``keras.Model`` (NHWC), trained with
``model.fit`` on a ``tf.data`` pipeline fed by the project's data layer.

- Layout: the data layer yields NCHW batches; ``to_nhwc`` is the one place they are transposed
  for Keras (training, validation, ``predict``). The exported ONNX model takes NHWC
  (``onnx_layout``), as the shared verification stage knows.
- Hardware: ``hardware.accelerator`` picks the CPU or the GPUs TensorFlow sees; with
  ``hardware.devices`` > 1 (or -1: all) the model is replicated by ``tf.distribute.
  MirroredStrategy`` in this one process, over GPUs or over as many logical CPU devices (so
  ``hardware=ddp_cpu``, a torch DDP preset, trains on two mirrored CPU replicas). Each batch of
  ``data.batch_size`` images is split over the replicas (as the mxnet backend does).
  ``hardware.precision`` maps to Keras' mixed-precision policies; the logits layers stay float32.
- Optimizers mean what torch's do where Keras allows: SGD (momentum, Nesterov), Adam and RMSProp
  add ``weight_decay * w`` to the gradient, which Keras expresses as an L2 regularizer of
  ``weight_decay / 2`` on every trainable weight (Keras' own ``weight_decay`` argument is
  decoupled, which is torch's AdamW and is used for AdamW only). Remaining differences: Keras'
  RMSProp adds ``eps`` inside the square root (TensorFlow's and the Inception papers' RMSProp;
  torch adds it outside), Adam adds it after bias-correcting the rate instead of the moment, and
  SGD's momentum holds ``lr * gradient`` (identical steps while the rate is constant). The
  cosine schedule is set per epoch, like torch's ``CosineAnnealingLR``.
- Files in the run directory: ``metrics.csv``, ``tensorboard/`` (the metrics.csv scalars),
  ``checkpoints/epoch-NNNN/model.keras`` (``model.save``: architecture, weights and optimizer
  state with its step count) and ``state.json``, after every epoch (``cnnzoo.checkpoints``).
- Exact resume: the model is compiled, its optimizer built and ``model.load_weights`` restores
  weights and optimizer variables; the learning rate is a function of the epoch, every
  generator the training draws from (Python, NumPy, each Dropout's ``SeedGenerator``) is
  re-seeded at each epoch's start, and the ``tf.data`` pipeline starts at the checkpoint's
  epoch. TensorFlow's global seed is set once at ``build``: nothing in the compiled step uses
  it, and re-setting it would clear TensorFlow's kernel cache every epoch (``seed_epoch``).
- Divergence: ``SpecModel.loss_hook`` records the first non-finite training loss and its step
  in variables inside the compiled step; they are read once per epoch, with the metrics.
- Input pipeline (``input_pipeline``): a ``tf.data`` generator yields chunks of whole batches,
  each batch its own ``split.take`` (the data layer's batches, bit for bit), cut into batches
  by ``unbatch``; a small validation split is prepared once and held in memory. glibc's
  per-thread heaps would give every array that generator allocates fresh pages (TensorFlow
  runs it in its own threads), so ``backend.malloc_top_pad_mb`` (default 8) lets them keep
  that much memory (``tune_malloc``; null: malloc untouched).
- Loading a ``.keras`` file never runs code from it: ``check_archive`` accepts only what
  ``model.save`` writes for a cnnzoo model, and Keras loads it with ``safe_mode=True``.
"""
from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

from cnnzoo.checkpoints import CheckpointDir, CheckpointError, seed_python_numpy
from cnnzoo.data import epoch_chunks
from cnnzoo.progress import EpochProgress
from cnnzoo.rundir import MetricsLog
from cnnzoo.tensorboard import ScalarWriter
from cnnzoo.validate import ConfigError

from .base import Backend, TrainingDiverged, TrainReport
from .keras_model import build_model, inference_model, keras, tf  # TensorFlow, imported quietly
from .weight_layouts import (DEPTHWISE, check_weights, expected_shapes, key, native_name,
                             parametrised, to_canonical, to_native)

PRECISION_POLICIES = {"32-true": None, "bf16-mixed": "mixed_bfloat16",
                      "16-mixed": "mixed_float16"}
CHECKPOINT = "model.keras"  # in each checkpoints/epoch-NNNN folder
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


def num_batches(limit, total: int) -> int:
    """Lightning's rule for ``trainer.limit_*_batches``: a fraction (<= 1.0) of the batches, at
    least one, or a whole number of them."""
    return min(total, int(limit)) if limit > 1 else max(1, int(total * limit))


def learning_rate(c, epoch: int, max_epochs: int) -> float:
    """The rate of 0-based ``epoch``: constant, or cosine to 0 over ``max_epochs`` as torch's
    CosineAnnealingLR stepped once per epoch."""
    if c.scheduler == "cosine":
        return c.lr * (1 + math.cos(math.pi * epoch / max_epochs)) / 2
    return c.lr


def coupled_weight_decay(c) -> float:
    """The weight decay that becomes L2 regularization (torch's SGD/Adam/RMSprop meaning); AdamW
    decays decoupled, inside the optimizer."""
    return 0.0 if c.name == "adamw" else float(c.weight_decay or 0.0)


def make_optimizer(c, policy: str | None):
    lr, eps = c.lr, c.get("eps")
    if c.name == "sgd":
        opt = keras.optimizers.SGD(lr, momentum=c.get("momentum") or 0.0,
                                   nesterov=bool(c.get("nesterov", False)))
    elif c.name == "adam":  # torch's eps (Keras' default is 1e-7)
        opt = keras.optimizers.Adam(lr, epsilon=1e-8 if eps is None else eps)
    elif c.name == "rmsprop":  # torch's alpha is Keras' rho; defaults: the Inception papers'
        opt = keras.optimizers.RMSprop(lr, rho=c.get("alpha", 0.9),
                                       epsilon=1.0 if eps is None else eps,
                                       momentum=c.get("momentum") or 0.0)
    else:  # adamw: Keras' decoupled decay is torch's AdamW: w -= lr * weight_decay * w
        opt = keras.optimizers.AdamW(lr, weight_decay=c.weight_decay,
                                     epsilon=1e-8 if eps is None else eps)
    if policy == "mixed_float16":  # float16 gradients need loss scaling
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


# --------------------------------------------------------------------------- callbacks
class _LossWatch:
    """The first training step whose loss is NaN or infinite, kept on the device: ``update``
    runs inside every compiled step (a few scalar ops, no host read) and records the 1-based
    global step there (the optimizer's ``iterations`` + 1), once; ``first_bad`` reads it back,
    once per epoch. Under MirroredStrategy each replica keeps its own copy (``ON_READ``) and
    the earliest wins."""

    def __init__(self, strategy, iterations):
        self.strategy, self.iterations = strategy, iterations
        with strategy.scope():
            self.step = tf.Variable(tf.constant(0, tf.int64), trainable=False,
                                    name="first_bad_step",
                                    synchronization=tf.VariableSynchronization.ON_READ,
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def update(self, loss) -> None:
        first = tf.logical_and(tf.logical_not(tf.math.is_finite(loss)), tf.equal(self.step, 0))
        step = tf.cast(tf.convert_to_tensor(self.iterations), tf.int64) + 1
        self.step.assign(tf.where(first, step, self.step))

    def first_bad(self) -> int | None:
        """The step of the first non-finite loss so far, or None."""
        found = [int(s.numpy()) for s in self.strategy.experimental_local_results(self.step)]
        return min((s for s in found if s), default=None)


def seed_state_variables(model) -> list:
    """The state variables of every ``SeedGenerator`` in ``model`` (each Dropout layer has its
    own), in layer order."""
    return [g.state for layer in model._flatten_layers(include_self=True, recursive=True)
            for g in getattr(layer, "_seed_generators", ())]


def seed_epoch(seed: int, epoch: int, generators: list) -> None:
    """Seed Python, NumPy and every ``SeedGenerator`` state for 0-based ``epoch``: generator i
    starts from ``[SeedSequence([s, i]), 0]``, s the epoch's seed (a variable assignment: the
    compiled functions are untouched).

    TensorFlow's global seed is set once, in ``build``, and never here: no op of the compiled
    train or test step draws from it (Dropout runs stateless random ops keyed by its
    ``SeedGenerator`` state; ``test_train_step_uses_no_global_tf_seed`` checks this), and
    ``tf.random.set_seed`` clears TensorFlow's kernel cache, so every epoch would instantiate
    and optimize the train and test functions again (ResNet-50: seconds per epoch)."""
    s = seed_python_numpy(seed, epoch)
    for i, state in enumerate(generators):
        first = int(np.random.SeedSequence([s, i]).generate_state(1)[0] & 0x7FFFFFFF)
        state.assign(np.array([first, 0], dtype=state.dtype))


class _EpochLog(keras.callbacks.Callback):
    """Seeds the epoch and sets its learning rate, times training excluding validation, writes
    metrics.csv/TensorBoard, drives the shared progress display, stops on a non-finite loss
    and writes the epoch's checkpoint folder."""

    def __init__(self, backend: KerasBackend, steps: int, images_per_epoch: int,
                 outputs: list[str], aux_weight: float, watch: _LossWatch, generators: list):
        super().__init__()
        c = backend.cfg
        self.optim, self.max_epochs, self.seed = c.optim, c.trainer.max_epochs, c.seed
        self.images_per_epoch, self.steps = images_per_epoch, steps
        self.watch, self.generators = watch, generators
        self.checkpoints, self.saved = CheckpointDir(backend.run_dir), None
        self.backend_name = backend.name
        # Keras prefixes metrics with the output's name when a model has several outputs
        prefix = (lambda o: f"{o}_") if len(outputs) > 1 else (lambda o: "")
        self.acc_key = f"{prefix(outputs[0])}acc"
        self.ce_keys = [f"{prefix(o)}ce" for o in outputs]
        self.aux_weight = aux_weight
        self.metrics_log = MetricsLog(backend.run_dir / "metrics.csv")
        self.board = ScalarWriter(backend.run_dir / "tensorboard")
        self.progress = EpochProgress(self.max_epochs, steps, c.trainer.progress_bar)
        self.rows, self.train_time, self.images = [], 0.0, 0

    def on_epoch_begin(self, epoch, logs=None):
        seed_epoch(self.seed, epoch, self.generators)
        self.lr = learning_rate(self.optim, epoch, self.max_epochs)
        self.model.optimizer.learning_rate = self.lr
        self.progress.start_epoch(epoch + 1)
        self._t0, self._val_time, self._steps_shown = time.perf_counter(), 0.0, 0

    def on_test_begin(self, logs=None):
        self._v0 = time.perf_counter()

    def on_test_end(self, logs=None):
        self._val_time += time.perf_counter() - self._v0

    def _loss(self, logs: dict) -> float:
        """torch's training loss: the logits' cross-entropy plus the weighted auxiliary ones
        (Keras' own ``loss`` also holds the L2 penalty of the weight decay)."""
        main, *aux = (logs[k] for k in self.ce_keys)
        return float(main + self.aux_weight * sum(aux))

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self._t0
        self.train_time += elapsed - self._val_time
        self.images += self.images_per_epoch
        row = {"epoch": epoch + 1, "train_loss": self._loss(logs),
               "train_acc": float(logs[self.acc_key]), "lr": self.lr, "epoch_time_s": elapsed}
        if f"val_{self.ce_keys[0]}" in logs:  # validation: the logits alone, as in inference
            row["val_loss"] = float(logs[f"val_{self.ce_keys[0]}"])
            row["val_acc"] = float(logs[f"val_{self.acc_key}"])
        step = self.watch.first_bad()
        if step is not None:  # the epoch's loss says nan or inf (the weight decay alone: inf)
            loss = row["train_loss"] if not math.isfinite(row["train_loss"]) else math.inf
            raise TrainingDiverged(
                f"training diverged: train_loss is {loss} at step {step} (epoch {epoch + 1}, "
                f"batch {step - epoch * self.steps} of {self.steps}); lower optim.lr")
        if not math.isfinite(row["train_loss"]):  # every step finite, their mean overflowed
            raise TrainingDiverged(f"training diverged: train_loss is {row['train_loss']} in "
                                   f"epoch {epoch + 1} (its mean over the steps); lower optim.lr")
        self.rows.append(row)
        self.metrics_log.append(row)
        self.board.write(epoch + 1, {k: v for k, v in row.items() if k != "epoch"})
        self.progress.end_epoch(row)
        folder = self.checkpoints.save(epoch + 1, lambda tmp: self.model.save(tmp / CHECKPOINT),
                                       {"backend": self.backend_name})
        self.saved = folder / CHECKPOINT

    def close(self) -> None:
        self.progress.close()
        self.board.close()


class _LiveEpochLog(_EpochLog):
    """With a live terminal display: also reports every step. (A batch hook makes Keras read
    the running metrics after each step, so it is installed only when something shows them.)"""

    def on_train_batch_end(self, batch, logs=None):
        # ``batch`` is the last step of the compiled call (steps_per_execution may be > 1)
        done, self._steps_shown = batch + 1 - self._steps_shown, batch + 1
        loss = self._loss(logs) if all(k in logs for k in self.ce_keys) else logs.get("loss")
        self.progress.step(done, lambda: {"loss": loss, "acc": logs.get(self.acc_key)})


def _divisor_at_most(n: int, steps: int) -> int:
    """The largest divisor of ``steps`` that is <= ``n``: a compiled call of several batches
    stops only when it has run all of them, so it must never straddle two epochs."""
    return max(d for d in range(1, max(1, min(n, steps)) + 1) if steps % d == 0)


# --------------------------------------------------------------------------- safe loading
_ARCHIVE = ("config.json", "metadata.json", "model.weights.h5")  # what model.save writes
# Keras classes whose config carries code or loads another file
_CODE_CLASSES = {"Lambda": "Python code", "__lambda__": "Python code",
                 "TorchModuleWrapper": "Python code", "JaxLayer": "Python code",
                 "FlaxLayer": "Python code", "TFSMLayer": "a SavedModel loaded from another path"}
_OWN_MODULE = __name__.rsplit(".", 1)[0] + ".keras_model"  # the registered cnnzoo layers


def _refused(path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: refused: {reason}; only checkpoints written by cnnzoo "
                           "are loaded")


def check_archive(path: Path) -> None:
    """Raise ``CheckpointError`` unless ``path`` is what ``model.save`` writes for a cnnzoo
    model: a zip of exactly config.json, metadata.json and model.weights.h5 whose config
    names Keras' own classes and functions and cnnzoo's registered layers only (no Lambda or
    other code, no other module). Nothing in the file is deserialized here."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with zipfile.ZipFile(path) as z:
            names = sorted(z.namelist())
            if names != sorted(_ARCHIVE):
                raise _refused(path, f"it holds {', '.join(names) or 'nothing'}, not exactly "
                               f"{', '.join(_ARCHIVE)}")
            config = json.loads(z.read("config.json"))
    except (OSError, zipfile.BadZipFile, ValueError, KeyError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise _refused(path, f"not a .keras archive ({type(err).__name__}: "
                       f"{_first_line(err)})") from None

    def walk(node):
        if isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, dict):
            name, module = node.get("class_name"), node.get("module")
            if name in _CODE_CLASSES:
                raise _refused(path, f"its config holds a {name} ({_CODE_CLASSES[name]})")
            if module is not None and not (
                    module == "keras" or str(module).startswith("keras.")
                    or (module == "builtins" and name == "function")
                    or (module == _OWN_MODULE
                        and str(node.get("registered_name")).startswith("cnnzoo>"))):
                what = node.get("config") if name == "function" else name
                raise _refused(path, f"its config names {module}.{what}, which is not part of "
                               "Keras or cnnzoo")
            for v in node.values():
                walk(v)
    walk(config)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_safely(path: Path):
    """The uncompiled model saved at ``path``, after ``check_archive``, with ``safe_mode=True``;
    ``CheckpointError`` (one line) for a file that cannot or must not be loaded."""
    path = Path(path)
    check_archive(path)
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as err:  # noqa: BLE001 (Keras raises many kinds; all mean refused)
        raise _refused(path, f"Keras cannot load it safely: {_first_line(err)}") from None


# --------------------------------------------------------------------------- the backend
class _Inference:
    """A float32, logits-only model for ``predict`` and export, its compiled call, and the
    model it stands for (kept, so that its ``id`` is never reused while cached)."""

    def __init__(self, source, model):
        self.source, self.model = source, model
        self.call = tf.function(lambda x: model(x, training=False), reduce_retracing=True,
                                jit_compile=False)


class KerasBackend(Backend):
    name = "keras"
    onnx_layout = "NHWC"

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        pad = cfg.backend.get("malloc_top_pad_mb", 8)
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 0):
            raise ConfigError(f"backend.malloc_top_pad_mb={pad!r} is invalid: expected an "
                              "integer >= 0 or null")
        tune_malloc(pad)
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
        hidden GPUs for the CPU, logical CPU devices for mirrored CPU replicas, thread pools."""
        hw = self.cfg.hardware
        if hw.get("num_nodes", 1) != 1:
            raise ConfigError(f"hardware.num_nodes={hw.num_nodes}: the keras backend trains on "
                              "one machine (hardware.num_nodes=1)")
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
                                coupled_weight_decay(self.cfg.optim))
        self._built[id(model)] = (spec, input_size)
        return model

    def count_params(self, model) -> int:
        return int(sum(math.prod(w.shape) for w in model.trainable_weights))

    def input_pipeline(self, split, shuffle: bool, epochs: int = 1, limit: int | None = None,
                       start: int = 0):
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
        An epoch's last, smaller batch is a chunk of its own, so no batch mixes two epochs. The next chunk is prepared while the
        current one trains (``prefetch``). A split whose batches are the same every epoch
        (unshuffled, not augmented: validation) of at most ``IN_MEMORY_BYTES`` is prepared
        the same way once and held in memory: Keras starts a new iterator for every
        validation, which costs ~20 ms on a generator and ~1 ms on tensors."""
        bs, seed = self.cfg.data.batch_size, self.cfg.seed
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
        ds = ds.apply(tf.data.experimental.assert_cardinality(max(0, epochs - start)
                                                              * per_epoch))
        return ds.with_options(options).prefetch(2)

    # ---------------------------------------------------------------- training
    def train(self, model, train, val, resume=None) -> TrainReport:
        c = self.cfg
        self._announce_strategy()
        spec, _ = self._built[id(model)]
        outputs = list(model.output_names)
        bs, max_epochs = c.data.batch_size, c.trainer.max_epochs
        start = 0 if resume is None else resume.epoch
        steps = num_batches(c.trainer.limit_train_batches, math.ceil(len(train) / bs))
        val_steps = num_batches(c.trainer.limit_val_batches, math.ceil(len(val) / bs))
        train_ds = self.input_pipeline(train, True, max_epochs, steps, start)
        val_ds = self.input_pipeline(val, False, 1, val_steps)
        if len(outputs) > 1:  # every head is trained on the same labels
            copies = lambda x, y: (x, (y,) * len(outputs))  # noqa: E731
            train_ds, val_ds = train_ds.map(copies), val_ds.map(copies)

        def ce():
            return keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="ce")

        with self.strategy.scope():
            model.compile(
                optimizer=make_optimizer(c.optim, self.policy),
                loss=[keras.losses.SparseCategoricalCrossentropy(from_logits=True)] * len(outputs),
                loss_weights=[1.0] + [spec.aux_weight] * (len(outputs) - 1),
                metrics=[[keras.metrics.SparseCategoricalAccuracy(name="acc"), ce()]]
                + [[ce()] for _ in outputs[1:]],
                jit_compile=c.backend.get("jit_compile", "auto"),
                steps_per_execution=_divisor_at_most(self._steps_per_execution(), steps))
        # keys beside the hardware config in results.json (none replaces one)
        extra = {"device": self.devices[0], "replica_devices": self.devices,
                 "replicas": self.strategy.num_replicas_in_sync,
                 "distribution": "MirroredStrategy" if len(self.devices) > 1 else "none",
                 "dtype_policy": self.policy or "float32"}
        self._inference.pop(id(model), None)  # the weights change from here on
        if resume is not None:
            self._restore(model, resume.file(CHECKPOINT))
            if start >= max_epochs:  # nothing left to train
                return TrainReport(history=[], train_time_s=0.0, images_per_s=0.0,
                                   checkpoint=resume.file(CHECKPOINT), extra=extra)
        watch = _LossWatch(self.strategy, model.optimizer.iterations)
        images_per_epoch = min(steps * bs, len(train))
        progress_live = c.trainer.progress_bar and sys.stdout.isatty()
        log = (_LiveEpochLog if progress_live else _EpochLog)(
            self, steps, images_per_epoch, outputs, spec.aux_weight, watch,
            seed_state_variables(model))
        model.loss_hook = watch.update
        try:
            model.fit(train_ds, initial_epoch=start, epochs=max_epochs, steps_per_epoch=steps,
                      validation_data=val_ds, callbacks=[log], verbose=0, shuffle=False)
        finally:
            model.loss_hook = None
            log.close()
            self._inference.pop(id(model), None)  # the weights changed
        seconds = max(log.train_time, 1e-9)
        return TrainReport(history=log.rows, train_time_s=seconds,
                           images_per_s=log.images / seconds,
                           checkpoint=log.saved or (resume.file(CHECKPOINT) if resume else None),
                           extra=extra)

    def _steps_per_execution(self) -> int:
        """``backend.steps_per_execution``: auto is 16 on one device and 1 over several, where
        more fails inside Keras 3.15's distributed step ("You must feed a value for
        placeholder tensor ..."), so a number above 1 is refused there."""
        wanted = self.cfg.backend.get("steps_per_execution", "auto")
        if len(self.devices) == 1:
            return 16 if wanted == "auto" else wanted
        if wanted not in ("auto", 1):
            raise ConfigError(f"backend.steps_per_execution={wanted} does not work when keras "
                              f"trains over {len(self.devices)} devices (tf.distribute): use "
                              "auto or 1")
        return 1

    def _restore(self, model, path: Path) -> None:
        """Weights and optimizer state (moments, step count) from a checkpoint into the
        compiled ``model``: the optimizer is built first so that ``load_weights`` fills its
        variables. The file is checked and loaded safely (``load_safely``) before."""
        load_safely(path)  # refuses a file that would need code; discarded, read again below
        with self.strategy.scope():
            model.optimizer.build(model.trainable_variables)
        try:
            model.load_weights(path)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot be loaded into this model: "
                                  f"{_first_line(err)}") from None

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

    # ---------------------------------------------------------------- weights
    def _parameters(self, model):
        """(canonical key, kind, param, Keras variable) of every parameter and statistic;
        a spec convolution that became a ``DepthwiseConv2D`` has its own kernel layout."""
        spec, _ = self._built[id(model)]
        for node, kind, params in parametrised(spec):
            layer = model.get_layer(node.name)
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                kind = DEPTHWISE
            for p in params:
                yield key(node.name, p), kind, p, getattr(layer, native_name("keras", kind, p))

    def get_weights(self, model) -> dict[str, np.ndarray]:
        return {k: to_canonical("keras", kind, p, np.asarray(v.numpy()))
                for k, kind, p, v in self._parameters(model)}

    def set_weights(self, model, weights) -> None:
        spec, size = self._built[id(model)]
        check_weights(weights, expected_shapes(spec, size))
        for k, kind, p, v in self._parameters(model):
            v.assign(to_native("keras", kind, p, weights[k]))
        self._inference.pop(id(model), None)  # a mixed-precision float32 copy is stale now

    # ---------------------------------------------------------------- files
    def save_checkpoint(self, model, path: Path) -> None:
        """``.keras``: the whole model (architecture, weights, optimizer state if compiled);
        ``.weights.h5``: the weights only."""
        path = Path(path)
        if path.name.endswith(".weights.h5"):
            model.save_weights(path)
        elif path.suffix == ".keras":
            model.save(path)
        else:
            raise ValueError(f"{path.name}: keras checkpoints end in .keras or .weights.h5")

    def load_checkpoint(self, model, path: Path) -> None:
        """Weights from a ``.keras`` file (``load_safely``: a file with code is refused) or a
        ``.weights.h5`` file (data only) into ``model``."""
        path = Path(path)
        if path.name.endswith(".weights.h5"):
            model.load_weights(path)
        else:
            model.set_weights(load_safely(path).get_weights())
        self._inference.pop(id(model), None)

    def export_onnx(self, model, path: Path, example: np.ndarray, opset: int) -> None:
        """The float32 logits-only model through tf2onnx, input "input" (N, H, W, C) with a
        dynamic N, output "logits".

        - Keras' ``model.export(format="onnx")`` hands tf2onnx a graph with every weight
          frozen into it, and tf2onnx copies that graph many times while converting it:
          VGG-16 runs out of 23 GB, Inception-ResNet-v2 peaks at 11 GB. So weights with at
          least ``backend.onnx_lift_min_size`` elements (default 1: all) are fed to the
          converter as graph inputs (``stateless_call``) and attached afterwards as
          initializers (peak 2 GB, and faster). The graph then computes batch norm from its
          parameters instead of folding it into the convolution weights; onnxruntime folds
          it when it loads the model. ``onnx_lift_min_size: null`` (or no weight that large)
          is exactly ``model.export``.
        - tf2onnx 1.17 writes opsets up to 18; a higher ``opset`` is reached with
          ``onnx.version_converter`` (on the graph without the lifted weights)."""
        import onnx
        import tf2onnx
        from onnx import version_converter

        logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # its INFO lines are noise here
        first = min(opset, max(tf2onnx.constants.OPSET_TO_IR_VERSION))
        view = self._inference_of(model).model
        lift_min = self.cfg.backend.get("onnx_lift_min_size", 1)
        lifted = [] if lift_min is None else [
            v for v in view.variables if v.dtype == "float32" and math.prod(v.shape) >= lift_min]
        signature = [tf.TensorSpec((None, *view.input_shape[1:]), tf.float32, name="input")]
        with warnings.catch_warnings(), tf.device("/cpu:0"):
            warnings.simplefilter("ignore")  # Keras' numpy-2 shim for tf2onnx warns on numpy 1
            if lifted:
                onnx_model, weights = _convert_with_lifted_weights(view, signature, lifted, first)
            else:
                view.export(str(path), format="onnx", verbose=False,
                            input_signature=signature, opset_version=first)
                onnx_model, weights = onnx.load(str(path)), {}
        if opset > first:
            onnx_model = version_converter.convert_version(onnx_model, opset)
        _attach_initializers(onnx_model.graph, weights)
        _rename(onnx_model.graph, {onnx_model.graph.output[0].name: "logits"})
        onnx.save(onnx_model, str(path))


def _convert_with_lifted_weights(view, signature, lifted, opset: int):
    """tf2onnx on ``view`` with the ``lifted`` variables as extra graph inputs; returns the ONNX
    model and those inputs' values by name."""
    import tf2onnx

    trainable, other = list(view.trainable_variables), list(view.non_trainable_variables)
    lifted_at = {id(v): i for i, v in enumerate(lifted)}
    specs = [tf.TensorSpec(v.shape, tf.float32, name=f"lifted_{i}") for i, v in enumerate(lifted)]

    def forward(x, *weights):
        def values(variables):
            return [weights[lifted_at[id(v)]] if id(v) in lifted_at else v.value
                    for v in variables]
        logits, _ = view.stateless_call(values(trainable), values(other), x, training=False)
        return logits

    fn = tf.function(forward, input_signature=signature + specs)
    onnx_model, _ = tf2onnx.convert.from_function(fn, signature + specs, opset=opset)
    return onnx_model, {spec.name: np.asarray(v.numpy()) for v, spec in zip(lifted, specs)}


def _attach_initializers(graph, weights: dict) -> None:
    """Turn the graph inputs named in ``weights`` into initializers holding those values."""
    from onnx import numpy_helper

    if not weights:
        return
    graph.initializer.extend(numpy_helper.from_array(w, name) for name, w in weights.items())
    kept = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(kept)


def _rename(graph, names: dict[str, str]) -> None:
    """Rename values of an ONNX graph (inputs, outputs and every node's references)."""
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
