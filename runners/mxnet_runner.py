"""MXNet backend: the spec as a hybridized Gluon ``HybridBlock``, trained with ``gluon.Trainer``.

- Hardware: one CPU or GPU context, or ``hardware.devices`` contexts in this one process (each
  batch split over them, gradients summed by a kvstore): ``hardware=ddp_cpu`` trains on
  ``cpu(0)`` and ``cpu(1)``. GPUs need the CUDA build of MXNet (``mxnet-cu112``). Only 32-bit
  precision is supported.
- MXNet reads its CPU thread settings when it is imported, so this module imports it only when
  the backend is created, after setting ``OMP_NUM_THREADS`` / ``MXNET_OMP_MAX_THREADS`` from
  ``hardware.threads``; the compatibility shims (``cnnzoo.compat.patch_mxnet``) come first.
  ``hardware.threads: null`` means every physical core this process may run on (Linux sysfs
  topology of ``os.sched_getaffinity``; ``os.cpu_count()`` elsewhere), unless
  ``OMP_NUM_THREADS`` is already set, which MXNet then follows: MXNet's own default is half
  the logical CPUs, which assumes two hyper-threads per core and leaves a core idle where
  there are none (ResNet-50 on 2 cores without hyper-threading: 1 thread).
- Optimizers mean what torch's do: SGD (momentum, Nesterov) and Adam add the weight decay to the
  gradient (MXNet's own ``sgd``/``nag``/``adam``); AdamW decays the weights directly and RMSProp
  follows ``torch.optim.RMSprop`` (decay ``alpha``, ``eps`` outside the square root, momentum),
  both implemented below. Two details of MXNet's fused updates remain: the SGD momentum buffer
  holds ``lr * gradient`` (same steps as torch while the rate is constant; the cosine schedule
  changes it once per epoch), and Adam adds ``eps`` to the square root of the second moment
  before its bias correction, torch after it (the two differ only while ``sqrt(v)`` ~ ``eps``).
- Files in the run directory: ``metrics.csv``, ``tensorboard/`` and, after every epoch, the
  training state in ``checkpoints/epoch-NNNN/`` (``cnnzoo.checkpoints``): ``model.params``
  (``save_parameters``), ``optimizer.nd`` (the optimizer's per-parameter states, ``mx.nd.save``)
  and ``trainer.json`` (update counters, learning rate). Nothing is pickled
  (``Trainer.save_states`` would pickle the optimizer), and a file that is not an NDArray file
  is refused before MXNet reads it.
- Exact resume: MXNet cannot save its generators' state, so they are reseeded at every epoch
  start (``mx.random.seed(s, ctx="all")``); a divergence is found from device-side counts of
  the steps whose running loss sum is finite, read with the epoch's loss.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cnnzoo.checkpoints import CheckpointDir, CheckpointError, seed_python_numpy
from cnnzoo.compat import patch_mxnet
from cnnzoo.data import epoch_chunks
from cnnzoo.progress import EpochProgress
from cnnzoo.rundir import MetricsLog
from cnnzoo.tensorboard import ScalarWriter
from cnnzoo.validate import ConfigError

from .base import Backend, TrainingDiverged, TrainReport
from .weight_layouts import (check_weights, expected_shapes, key, native_name, parametrised,
                             to_canonical, to_native)

patch_mxnet()  # numpy.bool and onnx.mapping, before mxnet is imported (see _mxnet)

KVSTORES = ("device", "local")
WEIGHTS_FILE, OPTIMIZER_FILE, TRAINER_FILE = "model.params", "optimizer.nd", "trainer.json"
TRAINER_FORMAT = "cnnzoo-mxnet-trainer/1"
EXPORTER_OPSET = 13  # the newest opset mx.onnx.export_model has translations for
CHUNK_BYTES = 8 << 20  # input pipeline: images per NDArray, cut into whole batches (EpochBatches)


def physical_cores() -> int:
    """The physical cores this process may run on: its CPUs (``os.sched_getaffinity``) counted
    once per core (Linux sysfs ``thread_siblings_list``); ``os.cpu_count()`` where either is
    unavailable."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
                      .read_text().strip())
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def _mxnet(threads: int | None = None, deterministic: bool = False):
    """Import MXNet (once). It reads its OpenMP thread counts only while it loads, so they are
    put in the environment for the import and taken out again (child processes and other
    libraries keep the user's settings); later calls return the module as it is. ``threads``
    None: every physical core (``physical_cores``), unless ``OMP_NUM_THREADS`` is set."""
    if "mxnet" not in sys.modules:
        settings = {}
        if not threads and "OMP_NUM_THREADS" not in os.environ:
            threads = physical_cores()
        if threads:
            settings.update(OMP_NUM_THREADS=str(threads), MXNET_OMP_MAX_THREADS=str(threads))
        if deterministic:
            settings["MXNET_ENFORCE_DETERMINISM"] = "1"
        saved = {k: os.environ.get(k) for k in settings}
        os.environ.update(settings)
        try:
            import mxnet  # noqa: F401
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    import mxnet
    return mxnet


# --------------------------------------------------------------------------- data
class EpochBatches:
    """A Split as (images, labels) NDArray batches on the CPU, in ``cnnzoo.data.epoch_order``
    for the current epoch (``set_epoch``) and with that epoch's augmentation, so every backend
    sees the same batches; labels are float32, as MXNet's loss and accuracy take them.
    ``limit`` caps the number of batches.

    Batches are cut from ``cnnzoo.data.epoch_chunks`` of ``CHUNK_BYTES`` of images: each chunk
    becomes an NDArray without a copy (``from_numpy(zero_copy=True)``: a fresh array nobody
    else writes) and each batch is a slice of it (a view: no copy, no engine call). Not
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
        mx, bs = _mxnet(), self.batch_size
        for x, y in epoch_chunks(self.split, bs, self.seed, self.epoch, self.shuffle,
                                 self.num_batches, CHUNK_BYTES):
            x = mx.nd.from_numpy(x, zero_copy=True)
            y = mx.nd.from_numpy(y.astype(np.float32), zero_copy=True)
            for b in range(0, len(y), bs):
                yield x[b:b + bs], y[b:b + bs]


def step_sums(hybridize: bool = True):
    """A block that adds one training step's loss sum and correct count to the running
    ``sums`` (per context: loss sum, correct) and counts in ``finite`` whether the new sums
    are finite (NaN and Inf stay): ``(sums, finite) = block(loss, logits, labels, sums,
    finite)``. Hybridized, it is one call per step instead of a dozen tiny imperative ops
    (each pays Python and engine overhead: ~0.1 ms per LeNet-5 step on one thread)."""
    from mxnet import gluon

    class StepSums(gluon.HybridBlock):
        def hybrid_forward(self, F, loss, logits, labels, sums, finite):
            correct = F.sum(F.argmax(logits, axis=1) == labels)
            sums = sums + F.concat(F.sum(loss), correct, dim=0)
            # isfinite (as nd.contrib.isfinite): not NaN and not infinite
            return sums, finite + (sums == sums) * (F.abs(sums) != math.inf)  # noqa: PLR0124

    block = StepSums()
    if hybridize:
        block.hybridize()
    return block


def _num_batches(limit, total: int) -> int:
    """Lightning's rule: a fraction (<= 1.0) of the batches, at least one, or a whole number."""
    return min(total, int(limit)) if limit > 1 else max(1, int(total * limit))


# --------------------------------------------------------------------------- optimizers
@functools.cache
def _optimizer_classes() -> dict:
    """torch-equivalent AdamW and RMSprop as MXNet optimizers. They subclass MXNet's classes,
    which exist only once MXNet is imported (after the thread settings), hence this function."""
    mx = _mxnet()
    nd = mx.nd

    class AdamW(mx.optimizer.Adam):
        """``torch.optim.AdamW``: weights shrink by ``lr * weight_decay`` before the Adam step,
        which itself has no L2 term."""

        def __init__(self, weight_decay: float = 0.01, **kwargs):
            super().__init__(wd=0.0, **kwargs)
            self.decoupled_wd = weight_decay

        def update(self, index, weight, grad, state):
            if self.decoupled_wd:
                weight *= 1.0 - self._get_lr(index) * self.decoupled_wd
            super().update(index, weight, grad, state)

    class RMSprop(mx.optimizer.Optimizer):
        """``torch.optim.RMSprop`` (not centered): ``v = alpha v + (1 - alpha) g^2``, step
        ``g / (sqrt(v) + eps)``, optional momentum buffer, weight decay added to ``g``."""

        def __init__(self, alpha=0.99, epsilon=1e-8, momentum=0.0, **kwargs):
            super().__init__(**kwargs)
            self.alpha, self.epsilon, self.momentum = alpha, epsilon, momentum

        def create_state(self, index, weight):
            zeros = functools.partial(nd.zeros, weight.shape, weight.context, dtype=weight.dtype)
            return zeros(), (zeros() if self.momentum else None)

        def update(self, index, weight, grad, state):
            self._update_count(index)
            lr, wd = self._get_lr(index), self._get_wd(index)
            g = grad * self.rescale_grad
            if self.clip_gradient:
                g = nd.clip(g, -self.clip_gradient, self.clip_gradient)
            if wd:
                g = g + wd * weight
            square_avg, buf = state
            square_avg *= self.alpha
            square_avg += (1.0 - self.alpha) * nd.square(g)
            step = g / (nd.sqrt(square_avg) + self.epsilon)
            if buf is not None:
                buf *= self.momentum
                buf += step
                step = buf
            weight -= lr * step

    return {"AdamW": AdamW, "RMSprop": RMSprop}


def make_optimizer(c):
    """The MXNet optimizer for ``cfg.optim`` (name or instance, and its parameters)."""
    if c.name == "sgd":
        name = "nag" if c.get("nesterov") else "sgd"
        return name, {"learning_rate": c.lr, "momentum": c.get("momentum", 0.0),
                      "wd": c.weight_decay}
    if c.name == "adam":  # torch's defaults
        return "adam", {"learning_rate": c.lr, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8,
                        "wd": c.weight_decay}
    classes = _optimizer_classes()
    if c.name == "rmsprop":  # defaults: the Inception papers' decay 0.9 and eps 1.0
        return classes["RMSprop"](learning_rate=c.lr, alpha=c.get("alpha", 0.9),
                                  epsilon=c.get("eps", 1.0), momentum=c.get("momentum", 0.0),
                                  wd=c.weight_decay), None
    if c.name == "adamw":
        return classes["AdamW"](learning_rate=c.lr, weight_decay=c.weight_decay), None
    raise ConfigError(f"optim.name={c.name!r} is not supported by the mxnet backend")


@functools.cache
def _cross_entropy():
    """One loss block for every step (building a Gluon block costs ~50 us of Python)."""
    from mxnet import gluon
    return gluon.loss.SoftmaxCrossEntropyLoss()


def training_loss(outputs, labels, aux_weight: float):
    """Per-image softmax cross-entropy of the training graph's outputs, and the main logits.
    With auxiliary classifiers (``(logits, *aux)``) their losses join, weighted as in the
    papers: ``main + aux_weight * sum(aux)``."""
    from mxnet import nd

    ce = _cross_entropy()
    logits, *aux = outputs if isinstance(outputs, (list, tuple)) else (outputs,)
    loss = ce(logits, labels)
    if aux:
        loss = loss + aux_weight * nd.add_n(*[ce(a, labels) for a in aux])
    return loss, logits


def learning_rate(c, epoch: int, max_epochs: int) -> float:
    """The rate for 0-based ``epoch``: constant, or cosine to 0 like torch's CosineAnnealingLR
    stepped once per epoch."""
    if c.scheduler == "cosine":
        return c.lr * (1 + math.cos(math.pi * epoch / max_epochs)) / 2
    return c.lr


# --------------------------------------------------------------------------- checkpoints
_ND_MAGIC = (0x112).to_bytes(8, "little")  # the header of MXNet's NDArray files (mx.nd.save)
_ONLY_OURS = "only checkpoints written by cnnzoo are loaded"


def check_nd_file(path: Path) -> None:
    """Refuse (``CheckpointError``) a file that is not an MXNet NDArray file before MXNet reads
    it: a pickle, say, saved under the expected name."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read: {err.strerror or err}") from None
    if head != _ND_MAGIC:
        looks = " (it looks like a Python pickle, which runs code when loaded)" \
            if head[:1] == b"\x80" else ""
        raise CheckpointError(f"{path}: refused: not an MXNet NDArray file{looks}; "
                              f"{_ONLY_OURS}")


def load_nd(mx, path: Path) -> dict:
    """The named NDArrays of an ``mx.nd.save`` file (MXNet's own format: nothing is unpickled)."""
    check_nd_file(path)
    try:
        arrays = mx.nd.load(str(path))
    except mx.base.MXNetError as err:
        raise CheckpointError(f"{path}: damaged NDArray file ({_first_line(err)})") from None
    if isinstance(arrays, list) and not arrays:  # an empty dict is read back as []
        return {}
    if not isinstance(arrays, dict):
        raise CheckpointError(f"{path}: refused: unnamed arrays; {_ONLY_OURS}")
    return arrays


def _first_line(err: Exception) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return next((ln for ln in lines if "Error" in ln or "failed" in ln), lines[-1] if lines
                else type(err).__name__).strip()


def _updaters(trainer) -> list:
    """The ``Updater``s that hold the optimizer's per-parameter states: the kvstore's when it
    updates the weights (several contexts, by default), else one per context."""
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    if trainer._kvstore is not None and trainer._update_on_kvstore:
        return [trainer._kvstore._updater]
    return list(trainer._updaters)


def save_trainer_state(mx, trainer, folder: Path) -> None:
    """What ``Trainer.save_states`` saves, without pickle: every updater's per-parameter states
    (NDArrays, tuples of them or None) in ``optimizer.nd`` under flat keys
    ``<updater>/<index>/<position>``, their layout and the optimizer's counters (updates per
    context and parameter, ``num_update``) and learning rate in ``trainer.json``."""
    opt, arrays, layout = trainer._optimizer, {}, []
    cpu = mx.cpu()

    def encode(state, name):
        if state is None:
            return None
        if isinstance(state, mx.nd.NDArray):
            arrays[name] = state.as_in_context(cpu)
            return name
        if isinstance(state, (tuple, list)):
            return {type(state).__name__: [encode(s, f"{name}/{j}") for j, s in enumerate(state)]}
        raise TypeError(f"cannot save optimizer state of type {type(state).__name__}")

    for u, updater in enumerate(_updaters(trainer)):
        layout.append([[i, encode(updater.states[i], f"{u}/{i}")]
                       for i in sorted(updater.states, key=str)])
    current = next((d for d, c in opt._all_index_update_counts.items()
                    if c is opt._index_update_count), 0)
    meta = {"format": TRAINER_FORMAT, "optimizer": type(opt).__name__,
            "learning_rate": opt.learning_rate, "num_update": opt.num_update,
            "begin_num_update": opt.begin_num_update, "current_context": current,
            "update_counts": [[d, i, n] for d, counts in opt._all_index_update_counts.items()
                              for i, n in counts.items()],
            "updaters": layout}
    mx.nd.save(str(folder / OPTIMIZER_FILE), arrays)
    (folder / TRAINER_FILE).write_text(json.dumps(meta) + "\n")


def restore_trainer_state(mx, trainer, folder: Path) -> None:
    """Put what ``save_trainer_state`` wrote into a freshly created ``trainer`` of the same
    config; a file that does not fit raises ``CheckpointError``."""
    path = folder / TRAINER_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != TRAINER_FORMAT:
        raise CheckpointError(f"{path}: refused: not a cnnzoo MXNet trainer state; {_ONLY_OURS}")
    opt, updaters = trainer._optimizer, _updaters(trainer)
    if meta.get("optimizer") != type(opt).__name__ or len(meta.get("updaters", ())) != len(
            updaters):
        raise CheckpointError(f"{path}: written for optimizer {meta.get('optimizer')!r} with "
                              f"{len(meta.get('updaters', ()))} updater(s), this run has "
                              f"{type(opt).__name__!r} with {len(updaters)}")
    arrays = load_nd(mx, folder / OPTIMIZER_FILE)
    shapes = [p.shape for p in trainer._params]

    def decode(tree, shape):
        if tree is None:
            return None
        if isinstance(tree, str):
            if arrays[tree].shape != shape:
                raise ValueError(f"'{tree}' has shape {arrays[tree].shape}, its weight {shape}")
            return arrays[tree]
        (kind, items), = tree.items()
        return {"tuple": tuple, "list": list}[kind](decode(t, shape) for t in items)

    try:
        states = [{i: decode(tree, shapes[i]) for i, tree in layout}
                  for layout in meta["updaters"]]
        counts = {}
        for d, i, n in meta["update_counts"]:
            counts.setdefault(d, {})[i] = int(n)
        num_update, begin = int(meta["num_update"]), int(meta["begin_num_update"])
        lr, current = float(meta["learning_rate"]), meta["current_context"]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path}: damaged or of another model: {err!r}") from None
    for updater, s in zip(updaters, states):
        updater.states = s
        updater.states_synced = dict.fromkeys(s, False)  # moved to each weight's context
    opt._all_index_update_counts = counts or {0: {}}
    opt._index_update_count = opt._all_index_update_counts.setdefault(current, {})
    opt.num_update, opt.begin_num_update = num_update, begin
    trainer.set_learning_rate(lr)


# --------------------------------------------------------------------------- the backend
class MXNetBackend(Backend):
    name = "mxnet"
    onnx_layout = "NCHW"

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        hw, b = cfg.hardware, cfg.backend
        errors = []
        if hw.precision != "32-true":
            errors.append(f"hardware.precision={hw.precision} is not supported by the mxnet "
                          "backend: use hardware.precision=32-true")
        if hw.get("num_nodes", 1) != 1:
            errors.append(f"hardware.num_nodes={hw.num_nodes}: the mxnet backend trains on one "
                          "machine (hardware.num_nodes=1)")
        if b.get("kvstore", "device") not in KVSTORES:
            errors.append(f"backend.kvstore={b.kvstore!r} is invalid: expected one of "
                          f"{', '.join(KVSTORES)}")
        self.mx = _mxnet(hw.threads, cfg.trainer.deterministic)
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

    def _seed(self) -> None:
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)
        self.mx.random.seed(self.cfg.seed)

    def build(self, spec, input_size):
        from .mxnet_model import SpecNet

        self._seed()
        net = SpecNet(spec, input_size)
        # torch's default for conv/dense weights, U(+-1/sqrt(fan_in)); zero biases
        net.initialize(self.mx.init.Xavier(rnd_type="uniform", factor_type="in", magnitude=1),
                       ctx=self.mx.cpu())
        b = self.cfg.backend
        if b.get("hybridize", True):
            # static_shape with several contexts in parallel corrupts batch-norm statistics now
            # and then in MXNet 1.9.1 (seeded runs differ by up to ~10% there); static_alloc alone
            # is safe, so multi-context training runs without static_shape
            net.hybridize(static_alloc=b.get("static_alloc", True),
                          static_shape=b.get("static_shape", True) and len(self.contexts) == 1)
        return net

    def count_params(self, model) -> int:
        return sum(math.prod(p.shape) for p in model.collect_params().values()
                   if p.grad_req != "null")

    def input_pipeline(self, split, shuffle: bool, limit: int | None = None):
        return EpochBatches(split, self.cfg.data.batch_size, self.cfg.seed, shuffle, limit)

    # ---------------------------------------------------------------- training
    def train(self, model, train, val, resume=None) -> TrainReport:
        c = self.cfg
        from mxnet import gluon

        ctxs = self.contexts
        kvstore = c.backend.get("kvstore", "device") if len(ctxs) > 1 else None
        if len(ctxs) > 1 and c.hardware.strategy not in ("auto", None):
            print(f"mxnet: hardware.strategy={c.hardware.strategy} is a torch concept; training "
                  f"data-parallel in this process on {', '.join(map(str, ctxs))} with kvstore "
                  f"'{kvstore}'", flush=True)
        if resume is not None:
            self.load_checkpoint(model, resume.file(WEIGHTS_FILE))
        model.collect_params().reset_ctx(ctxs)
        optimizer, params = make_optimizer(c.optim)
        trainer = gluon.Trainer(model.collect_params(), optimizer, params,
                                kvstore=kvstore or "device")
        if resume is not None:
            restore_trainer_state(self.mx, trainer, resume.path)
        max_epochs = c.trainer.max_epochs
        train_batches = self.input_pipeline(train, True, _num_batches(
            c.trainer.limit_train_batches, math.ceil(len(train) / c.data.batch_size)))
        val_batches = self.input_pipeline(val, False, _num_batches(
            c.trainer.limit_val_batches, math.ceil(len(val) / c.data.batch_size)))

        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpts = CheckpointDir(self.run_dir)
        checkpoint = resume.file(WEIGHTS_FILE) if resume is not None else None
        metrics_log = MetricsLog(self.run_dir / "metrics.csv")
        board = ScalarWriter(self.run_dir / "tensorboard")
        progress = EpochProgress(max_epochs, len(train_batches), c.trainer.progress_bar)
        rows, train_time, images = [], 0.0, 0
        sums_block = step_sums(bool(c.backend.get("hybridize", True)))
        try:
            for epoch in range(resume.epoch if resume is not None else 0, max_epochs):
                t0 = time.perf_counter()
                self.mx.random.seed(seed_python_numpy(c.seed, epoch), ctx="all")
                lr = learning_rate(c.optim, epoch, max_epochs)
                trainer.set_learning_rate(lr)
                train_batches.set_epoch(epoch)
                progress.start_epoch(epoch + 1)
                loss, acc, seen, (bad, steps) = self._train_epoch(model, trainer, train_batches,
                                                                  ctxs, progress, sums_block)
                if bad is not None:  # before anything is saved: the last checkpoint stays good
                    raise TrainingDiverged(
                        f"training diverged: train_loss is {loss} at step {epoch * steps + bad} "
                        f"(epoch {epoch + 1}, batch {bad} of {steps}); lower optim.lr")
                _sync_running_stats(model, ctxs)
                train_seconds = time.perf_counter() - t0  # metrics read above: work is done
                train_time, images = train_time + train_seconds, images + seen
                val_loss, val_acc = self._evaluate_batches(model, val_batches, ctxs)
                row = {"epoch": epoch + 1, "train_loss": loss, "train_acc": acc,
                       "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
                       "epoch_time_s": time.perf_counter() - t0}
                rows.append(row)
                metrics_log.append(row)  # before the checkpoint: a resume drops rows after it
                checkpoint = ckpts.save(epoch + 1, functools.partial(
                    self._write_checkpoint, model, trainer), {"backend": self.name}) / WEIGHTS_FILE
                board.write(epoch + 1, {k: v for k, v in row.items() if k != "epoch"})
                progress.end_epoch(row)
        finally:
            progress.close()
            board.close()
        model.collect_params().reset_ctx(self.mx.cpu())  # predict and export run on the CPU
        seconds = max(train_time, 1e-9)
        return TrainReport(history=rows, train_time_s=seconds, images_per_s=images / seconds,
                           checkpoint=checkpoint,
                           extra={"device": ", ".join(map(str, ctxs)),
                                  "contexts": [str(x) for x in ctxs], "kvstore": kvstore,
                                  "hybridize": bool(c.backend.get("hybridize", True))})

    def _train_epoch(self, model, trainer, batches, ctxs, progress, sums_block=None):
        """One epoch; loss and accuracy are summed on the devices (``step_sums``) and read
        once at the end. Returns loss, accuracy, images and (the 1-based batch where the loss
        sum stopped being finite or None, batches trained). That batch is counted on the
        devices too: the number of steps after which each context's running sum is still
        finite (NaN and Inf stay)."""
        if sums_block is None:
            sums_block = step_sums(bool(self.cfg.backend.get("hybridize", True)))
        mx = self.mx
        from mxnet import autograd, gluon

        sums = [mx.nd.zeros(2, ctx=ctx) for ctx in ctxs]  # per context: loss sum, correct
        finite = [mx.nd.zeros(2, ctx=ctx) for ctx in ctxs]  # steps with a finite sum, steps
        seen, steps, pending = 0, 0, []
        for x, y in batches:
            n = len(y)
            if n < len(ctxs):  # cannot be split over every context (at most one per epoch)
                continue
            xs = gluon.utils.split_and_load(x, ctxs, even_split=False)
            ys = gluon.utils.split_and_load(y, ctxs, even_split=False)
            losses, outputs = [], []
            with autograd.record():
                for xi, yi in zip(xs, ys):
                    loss, logits = training_loss(model(xi), yi, model.aux_weight)
                    losses.append(loss)
                    outputs.append(logits)
            autograd.backward(losses)
            for i, (loss, logits, yi) in enumerate(zip(losses, outputs, ys)):
                sums[i], finite[i] = sums_block(loss, logits, yi, sums[i], finite[i])
            trainer.step(n)  # gradients of the summed loss / n: the batch mean, as in torch
            seen, steps = seen + n, steps + 1
            # bound how far Python runs ahead of the engine without reading any value
            pending.append(losses[0])
            if len(pending) > 2:
                pending.pop(0).wait_to_read()
            # running values are read only when a terminal display refreshes (a few times/s)
            progress.step(1, lambda: _running(sums, seen))
        total = sum(s.asnumpy().astype(np.float64) for s in sums)  # the one host read
        loss = float(total[0] / max(seen, 1))
        bad = None if math.isfinite(loss) else \
            int(min(f.asnumpy()[0] for f in finite)) + 1  # (computed already)
        return loss, float(total[1] / max(seen, 1)), seen, (bad, steps)

    def _evaluate_batches(self, model, batches, ctxs) -> tuple[float, float]:
        """Mean cross-entropy and accuracy in inference mode, over ``ctxs``."""
        mx = self.mx
        from mxnet import gluon

        ce = gluon.loss.SoftmaxCrossEntropyLoss()
        sums = [mx.nd.zeros(2, ctx=ctx) for ctx in ctxs]
        seen = 0
        for x, y in batches:
            use = ctxs[:min(len(ctxs), len(y))]
            xs = gluon.utils.split_and_load(x, use, even_split=False)
            ys = gluon.utils.split_and_load(y, use, even_split=False)
            for xi, yi, acc in zip(xs, ys, sums):
                logits = model.logits(xi)
                correct = (logits.argmax(axis=1) == yi).sum()
                acc += mx.nd.concat(ce(logits, yi).sum(), correct, dim=0)
            seen += len(y)
        total = sum(s.asnumpy().astype(np.float64) for s in sums)
        return float(total[0] / max(seen, 1)), float(total[1] / max(seen, 1))

    def _write_checkpoint(self, model, trainer, folder: Path) -> None:
        """The training state into an epoch folder being written (``CheckpointDir.save``)."""
        model.save_parameters(str(folder / WEIGHTS_FILE))
        save_trainer_state(self.mx, trainer, folder)

    # ---------------------------------------------------------------- inference
    def predict(self, model, images: np.ndarray) -> np.ndarray:
        x = self.mx.nd.array(images, ctx=self.mx.cpu(), dtype=np.float32)
        return model.logits(x).asnumpy()

    # ---------------------------------------------------------------- weights
    def _parameters(self, model):
        """(canonical key, kind, param, Gluon Parameter) of every parameter and statistic."""
        for node, kind, params in parametrised(model.spec):
            layer = model.layer(node.name)
            for p in params:
                yield key(node.name, p), kind, p, getattr(layer, native_name("mxnet", kind, p))

    def get_weights(self, model) -> dict[str, np.ndarray]:
        return {k: to_canonical("mxnet", kind, p, param.list_data()[0].asnumpy())
                for k, kind, p, param in self._parameters(model)}

    def set_weights(self, model, weights) -> None:
        check_weights(weights, expected_shapes(model.spec, model.input_size))
        for k, kind, p, param in self._parameters(model):
            # in place on every context the parameter lives on (a hybridized graph sees it)
            param.set_data(self.mx.nd.array(to_native("mxnet", kind, p, weights[k]),
                                            dtype=np.float32))

    def save_checkpoint(self, model, path: Path) -> None:
        model.save_parameters(str(path))

    def load_checkpoint(self, model, path: Path) -> None:
        """``load_parameters`` of an NDArray file (checked first: a pickle is refused unread)."""
        check_nd_file(path)
        try:
            model.load_parameters(str(path), ctx=self.mx.cpu())
        except (self.mx.base.MXNetError, AssertionError, ValueError, KeyError, AttributeError,
                TypeError) as err:
            raise CheckpointError(f"{path}: cannot be loaded into this {model.spec.name} model: "
                                  f"{_first_line(err)}") from None

    # ---------------------------------------------------------------- export
    def export_onnx(self, model, path: Path, example: np.ndarray, opset: int) -> None:
        """``HybridBlock.export`` of the inference graph, converted by ``mx.onnx.export_model``.

        The exporter writes every weight as a Python list (``tolist()``: ~25 s and gigabytes of
        memory for AlexNet), so the graph is converted with the weights as inputs and they are
        attached afterwards as raw initializers (not graph inputs). Its translations target opset
        13, so the graph is declared 13 and ``onnx.version_converter`` brings it to ``opset``."""
        import onnx

        mx = self.mx
        graph = model.inference_graph
        hybridized = getattr(graph, "_active", False)
        if not hybridized:  # export needs the traced graph
            graph.hybridize()
        try:
            model.logits(mx.nd.array(example, ctx=mx.cpu(), dtype=np.float32))
            with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".mxnet-") as tmp:
                prefix = str(Path(tmp) / "model")
                graph.export(prefix)
                sym = mx.sym.load(f"{prefix}-symbol.json")
                saved = mx.nd.load(f"{prefix}-0000.params")  # a list when it is empty
                weights = {k.split(":", 1)[1]: v.asnumpy() for k, v in dict(saved).items()}
                raw = Path(tmp) / "graph.onnx"
                with _quiet_root_logger():  # the exporter logs INFO lines to the root logger
                    _export_graph(mx, sym, weights, example.shape[1:], raw)
                out_shape = model.spec.analyze(model.input_size)[model.spec.output].out_shape
                finished = _finish_onnx(onnx.load(str(raw)), weights, opset, out_shape)
            onnx.save(finished, str(path))
        finally:
            if not hybridized:
                graph.hybridize(False)


def _export_graph(mx, sym, weights: dict, chw, out: Path) -> None:
    """``mx.onnx.export_model`` with a dynamic batch and the weights as (static) graph inputs."""
    names = sym.list_inputs()
    data = [n for n in names if n not in weights]
    if len(data) != 1:
        raise RuntimeError(f"expected one data input, the exported graph has {data}")
    shapes = [(2, *chw) if n in data else weights[n].shape for n in names]
    dynamic = [("N", *chw) if n in data else weights[n].shape for n in names]
    mx.onnx.export_model(sym, {}, in_shapes=shapes, in_types=[np.float32] * len(names),
                         onnx_file_path=str(out), dynamic=True, dynamic_input_shapes=dynamic)


def _finish_onnx(model, weights: dict, opset: int, out_shape: tuple[int, ...]):
    """Declare the exporter's opset and convert to ``opset``; name the input "input" and the
    output "logits" (shape ``N x out_shape``); make every weight an initializer that is not a
    graph input."""
    from onnx import helper, numpy_helper, version_converter

    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", EXPORTER_OPSET))
    if opset != EXPORTER_OPSET:  # on the weight-free graph: fast
        model = version_converter.convert_version(model, opset)
    g = model.graph
    data = next(i.name for i in g.input if i.name not in weights)
    _rename(g, {data: "input", g.output[0].name: "logits"})
    g.initializer.extend(numpy_helper.from_array(w, name) for name, w in weights.items())
    initializers = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in initializers]
    del g.input[:]
    g.input.extend(inputs)
    out_dims = g.output[0].type.tensor_type.shape.dim
    out_dims[0].dim_param = "N"
    for dim, size in zip(out_dims[1:], out_shape):
        dim.dim_value = size
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    return model


@contextlib.contextmanager
def _quiet_root_logger():
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _rename(graph, names: dict[str, str]) -> None:
    for value in (*graph.input, *graph.output):
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]


def _running(sums, seen: int) -> dict:
    total = sum(s.asnumpy().astype(np.float64) for s in sums)
    return {"loss": total[0] / max(seen, 1), "acc": total[1] / max(seen, 1)}


def _sync_running_stats(model, ctxs) -> None:
    """Average batch-norm running statistics over the contexts (each updates its own copy from
    its share of the batch) so that every context, and the saved model, holds the same values."""
    if len(ctxs) < 2:
        return
    mx = _mxnet()
    for p in model.collect_params().values():
        if p.grad_req == "null":
            copies = p.list_data()
            p.set_data(mx.nd.add_n(*[d.as_in_context(ctxs[0]) for d in copies]) / len(copies))
