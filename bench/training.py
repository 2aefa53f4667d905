"""Training throughput: the product (a backend's real ``train()``) next to a hand-written loop in
the same framework, on the same native model (``backend.build(spec, size)``) and the same
synthetic images.

- **Product**: the config is composed with Hydra's compose API (as ``run.py`` would compose
  it: ``data=synthetic``, ``optim=sgd`` at a constant rate, ``hardware=cpu``, export off, plus
  the variant's overrides), then ``cnnzoo.app.tasks.prepare`` / ``build_model`` and
  ``backend.train(model, train, val)`` run exactly as in ``python run.py``. One epoch is
  ``steps`` batches (the synthetic training split holds ``steps x batch`` images; validation is
  one image). Each backend prints one line per finished epoch when its output is not a
  terminal (``cnnzoo.core.progress``); the benchmark timestamps those lines, so one repetition is
  the wall time from one epoch's line to the next: the epoch's data loading and steps, its
  one-image validation, its checkpoint, metrics.csv and TensorBoard writes, whatever order a
  backend does them in. The first ``warmup`` epochs are discarded (graph tracing,
  allocation). The product's own ``images_per_s`` (all epochs, validation excluded) and its
  per-epoch ``epoch_time_s`` are kept in ``extra``.
- **Hand-written**: what an expert writes in each framework, on a model from the same
  ``backend.build``, with every image preprocessed once and held as framework tensors:
  torch a plain loop (SGD, ``zero_grad(set_to_none=True)``), NCHW and channels-last;
  Keras a ``tf.function`` train step (GradientTape, the model's L2 losses, SGD); MXNet
  ``autograd.record`` + ``Trainer.step`` on the block hybridized with
  ``static_alloc=True, static_shape=True``; an outside backend's package names its own loop
  (entry point group ``cnnzoo.bench_loops``), which runs on its backend's devices. Threads:
  every physical core, set explicitly (and, for LeNet-5, also the framework's default count:
  the faster one is the baseline).
  One repetition is ``steps`` batches, timed to the end of the last step's computation.
"""
from __future__ import annotations

import contextlib
import io
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import SAME_PROCESS, SEED, Row, Stats, compose, synthetic_data, timed

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4  # conf/optim/sgd.yaml, at a constant rate

HAND_DESCRIPTIONS = {
    ("torch", "nchw"): "hand-written: plain loop, NCHW",
    ("torch", "channels_last"): "hand-written: plain loop, channels_last",
    ("keras", "nhwc"): "hand-written: tf.function step",
    ("mxnet", "nchw"): "hand-written: autograd, hybridize(static_alloc, static_shape)",
}


def config_overrides(arch: str, backend: str, batch: int, input_size: int, steps: int,
                     epochs: int, extra=(), hardware: str = "cpu") -> list[str]:
    """The training config of both sides: ``steps`` batches per epoch of synthetic images
    generated at the input size (no resize), and one validation image."""
    return [f"arch={arch}", f"backend={backend}", f"hardware={hardware}",
            *synthetic_data(steps * batch, batch, input_size), "optim=sgd", f"optim.lr={LR}",
            f"optim.momentum={MOMENTUM}", f"optim.weight_decay={WEIGHT_DECAY}",
            "optim.scheduler=none", f"trainer.max_epochs={epochs}",
            "trainer.limit_val_batches=1", "trainer.progress_bar=true",
            "export.enabled=false", f"seed={SEED}", *extra]


def _common(args: dict) -> dict:
    return {"arch": args["arch"], "backend": args["backend"], "input_size": args["input_size"],
            "batch": args["batch"]}


# --------------------------------------------------------------------------- the product
def product(args: dict) -> list[Row]:
    """The product's row; with ``args["paired"]`` also the hand-written loop timed in this
    same process before and after the product's run (``SAME_PROCESS``), its baseline."""
    from cnnzoo.app.experiment import build_model, prepare

    warmup, reps, variant = args["warmup"], args["reps"], list(args.get("variant", []))
    variant_name, paired = " ".join(variant) or "default", bool(args.get("paired"))
    hand = _same_process_hand(args, variant) if paired else {}
    cfg = compose(*config_overrides(args["arch"], args["backend"], args["batch"],
                                    args["input_size"], args["steps"], warmup + reps, variant,
                                    args.get("hardware", "cpu")))
    exp = prepare(cfg)
    clock = EpochLineClock()
    with tempfile.TemporaryDirectory(prefix="cnnzoo-bench-run-") as run_dir:
        backend, model, _ = build_model(cfg, Path(run_dir), exp)
        with contextlib.redirect_stdout(clock):
            report = backend.train(model, exp.train_split, exp.val_split)
    ends = clock.times
    if len(ends) != warmup + reps or warmup < 1:
        raise RuntimeError(f"saw {len(ends)} epoch lines for {warmup} warm-up + {reps} epochs "
                           "(at least one warm-up epoch is needed)")
    walls = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    images = len(exp.train_split)
    recorded = [float(r["epoch_time_s"]) for r in report.history]
    threads = threads_in_use(args["backend"], cfg.hardware.threads)
    rows = [Row("training", "product: backend.train()", "throughput", "images/s",
                Stats.of([images / t for t in walls]), **_common(args),
                variant=variant_name, threads=threads,
                warmup=f"{warmup} epoch",
                note=f"{args['steps']} steps/epoch; wall time between epoch lines",
                extra={"reported_images_per_s": round(report.images_per_s, 2),
                       "train_time_s": round(report.train_time_s, 3),
                       "epoch_walls_s": [round(t, 4) for t in walls],
                       "epoch_time_s": [round(t, 4) for t in recorded],
                       "steps_per_epoch": args["steps"], "images_per_epoch": images})]
    if paired:
        after = _same_process_hand(args, variant)
        # the layout that was faster over both sittings; its samples from both
        layout = max(hand, key=lambda k: statistics.median(hand[k] + after[k]))
        rows.append(Row("training", SAME_PROCESS, "throughput", "images/s",
                        Stats.of(hand[layout] + after[layout]), **_common(args),
                        variant=variant_name, threads=threads,
                        warmup=f"{args['warmup_steps']} steps",
                        note=f"{describe_hand(args['backend'], layout)}, the product's "
                             "threads; timed before and after the product's run"))
    return rows


def _same_process_hand(args: dict, variant: list[str]) -> dict[str, list[float]]:
    """images/s of each hand-written layout at the product's thread count, per repetition:
    the baseline that a product row is judged against where it is measured (LeNet-5, whose
    rates move by about 20% from one process to the next on a 2-core machine)."""
    rows = handwritten({**args, "threads": None, "diagnose_pipeline": False,
                        "extra_overrides": variant})
    return {r.variant: r.extra["samples"] for r in rows}


class EpochLineClock(io.TextIOBase):
    """A stdout that notes when each "epoch i/N" line arrives (what every backend prints per
    finished epoch when its output is not a terminal) and drops the text."""

    LINE = re.compile(r"^epoch \d+/\d+\b")

    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self._pending = ""

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        now = time.perf_counter()
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        self.times += [now for line in lines if self.LINE.match(line)]
        return len(text)


def threads_in_use(backend: str, configured: int | None) -> str:
    """The thread count a backend trains with: the configured one, or what its framework's
    default gives on this machine."""
    if configured:
        return str(configured)
    import os
    if backend == "torch":
        import torch
        return f"default ({torch.get_num_threads()})"
    if backend == "keras":
        return f"default ({os.cpu_count()}: TensorFlow's intra-op pool)"
    if backend == "mxnet":  # the backend's rule (runners/mxnet/compat.import_mxnet)
        from runners.mxnet.compat import physical_cores
        n = os.environ.get("OMP_NUM_THREADS") or physical_cores()
        return f"default ({n}: every physical core)"
    return "default"


# --------------------------------------------------------------------------- hand-written
def handwritten(args: dict) -> list[Row]:
    """The expert loops on preloaded tensors; with ``diagnose_pipeline`` also the same step fed
    by the product's own ``input_pipeline`` (a diagnostic: it splits a product's gap into what
    its data pipeline costs and what its training loop costs)."""
    from bench.pipeline import epoch_batches
    from cnnzoo.app.experiment import build_model, prepare

    threads = args["threads"]  # None: the framework's default
    cfg = compose(*config_overrides(args["arch"], args["backend"], args["batch"],
                                    args["input_size"], args["steps"], 1,
                                    [*args.get("extra_overrides", ()),
                                     *([f"hardware.threads={threads}"] if threads else [])],
                                    args.get("hardware", "cpu")))
    exp = prepare(cfg)
    x, y = exp.train_split.take(np.arange(len(exp.train_split)))  # preprocessed once
    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnzoo-bench-hand-") as run_dir:
        made = {}

        def build():
            made["backend"], model, _ = build_model(cfg, Path(run_dir), exp)
            return model

        def product_epoch(epoch: int):
            return epoch_batches(made["backend"], args["backend"], exp.train_split, epoch)

        if args["backend"] in BUILT_IN_LOOPS:
            if args.get("hardware", "cpu") != "cpu":
                raise ValueError(f"the {args['backend']} hand-written loop runs on the CPU "
                                 "(python -m bench.gpu measures torch on a GPU)")
            timings = BUILT_IN_LOOPS[args["backend"]](build, x, y, args, product_epoch)
        else:  # an installed plugin's own loop, on its backend's devices
            def backend_and_model():
                model = build()
                return made["backend"], model
            timings = plugin_loop(args["backend"]).loop(backend_and_model, x, y, args)
        for layout, seconds in timings:
            rates = [args["steps"] * args["batch"] / s for s in seconds]
            rows.append(Row("training", describe_hand(args["backend"], layout),
                            "throughput", "images/s", Stats.of(rates), **_common(args),
                            variant=layout, threads=threads or "default",
                            warmup="1 epoch" if layout in (PIPELINE, FRAMEWORK_LOOP)
                            else f"{args['warmup_steps']} steps",
                            note=f"{args['steps']} steps per repetition",
                            extra={"samples": rates}))
    return rows


def plugin_loop(backend: str):
    """The hand-written loop an outside backend ships for this benchmark: the module its
    package names in the ``cnnzoo.bench_loops`` entry point group, with
    ``loop(backend_and_model, x, y, args)`` yielding ``(layout, seconds per repetition)`` and
    ``DESCRIPTIONS`` (layout -> what the loop is)."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="cnnzoo.bench_loops") if ep.name == backend]
    if not found:
        raise ValueError(f"backend {backend!r} ships no hand-written loop (entry point group "
                         "cnnzoo.bench_loops)")
    return found[0].load()


def describe_hand(backend: str, layout: str) -> str:
    if (backend, layout) in HAND_DESCRIPTIONS:
        return HAND_DESCRIPTIONS[(backend, layout)]
    return plugin_loop(backend).DESCRIPTIONS[layout]


PIPELINE = "product input_pipeline"
FRAMEWORK_LOOP = "framework loop"
for _b in ("torch", "keras", "mxnet"):
    HAND_DESCRIPTIONS[(_b, PIPELINE)] = "diagnostic: hand-written step, product input_pipeline"
HAND_DESCRIPTIONS[("torch", FRAMEWORK_LOOP)] = \
    "diagnostic: minimal Lightning Fabric loop, preloaded batches"
HAND_DESCRIPTIONS[("keras", FRAMEWORK_LOOP)] = \
    "diagnostic: model.fit with the loss only, preloaded batches"
KERAS_STEPS_PER_CALL = 16  # backend.steps_per_execution=auto on one device


def _batches(items, steps: int):
    """``steps`` batches, cycling through ``items``."""
    return [items[i % len(items)] for i in range(steps)]


def _run(step, sync, batches) -> None:
    last = None
    for xb, yb in batches:
        last = step(xb, yb)
    sync(last)  # asynchronous engines: wait for the last step's computation


def _timings(step, sync, preloaded, args, product_epoch=None) -> list[float]:
    """Seconds of each repetition: ``steps`` preloaded batches after ``warmup_steps``, or (with
    ``product_epoch``) one epoch of the product's input pipeline after a warm-up epoch."""
    if product_epoch is None:
        _run(step, sync, _batches(preloaded, args["warmup_steps"]))
        epoch = _batches(preloaded, args["steps"])
        return timed(lambda: _run(step, sync, epoch), 0, args["reps"])
    _run(step, sync, product_epoch(0))
    epochs = iter(range(1, args["reps"] + 1))
    return timed(lambda: _run(step, sync, product_epoch(next(epochs))), 0, args["reps"])


def _torch_loop(build, x, y, args, product_epoch):
    import torch
    import torch.nn.functional as F

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    bs = args["batch"]

    def trainer(net):
        opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM,
                              weight_decay=WEIGHT_DECAY)

        def step(xb, yb):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
        return step

    for layout in args.get("layouts", ["nchw", "channels_last"]):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        xs, ys = torch.from_numpy(x).contiguous(memory_format=fmt), torch.from_numpy(y)
        batches = [(xs[i:i + bs], ys[i:i + bs]) for i in range(0, len(ys), bs)]
        step = trainer(build().to(memory_format=fmt).train())
        yield layout, _timings(step, lambda _: None, batches, args)
    if args.get("diagnose_pipeline"):  # NCHW, as the product's default
        step = trainer(build().train())
        yield PIPELINE, _timings(step, lambda _: None, None, args, product_epoch)
        yield FRAMEWORK_LOOP, _fabric_epochs(build, xs, ys, args)


def _fabric_epochs(build, xs, ys, args) -> list[float]:
    """The least the product's loop costs: the hand-written step through Lightning Fabric
    (``setup``, ``fabric.backward``, as ``runners/torch/train.py``) on the preloaded
    channels-last batches (the product's default layout), with nothing else per step; one
    warm-up epoch, then one epoch per repetition."""
    import lightning_fabric
    import torch
    import torch.nn.functional as F

    bs, steps = args["batch"], args["steps"]
    xs = xs.contiguous(memory_format=torch.channels_last)
    batches = _batches([(xs[i:i + bs], ys[i:i + bs]) for i in range(0, len(ys), bs)], steps)
    fabric = lightning_fabric.Fabric(accelerator="cpu", devices=1, precision="32-true")
    net = build().to(memory_format=torch.channels_last)
    net, opt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM,
                                                 weight_decay=WEIGHT_DECAY))

    def step(xb, yb):
        opt.zero_grad(set_to_none=True)
        fabric.backward(F.cross_entropy(net(xb), yb))
        opt.step()

    _run(step, lambda _: None, batches)
    return timed(lambda: _run(step, lambda _: None, batches), 0, args["reps"])


def _keras_loop(build, x, y, args, product_epoch):
    model = build()  # first: the backend sets TensorFlow's threads before its runtime starts
    from runners.keras.model import keras, tf

    bs = args["batch"]
    xs = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # Keras models take NHWC
    batches = [(tf.constant(xs[i:i + bs]), tf.constant(y[i:i + bs]))
               for i in range(0, len(y), bs)]
    variables = model.trainable_variables
    opt = keras.optimizers.SGD(LR, momentum=MOMENTUM)
    opt.build(variables)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(jit_compile=False)  # the product's default on a CPU (jit_compile: auto)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = ce(yb, model(xb, training=True))
            if model.losses:  # the weight decay, as L2 terms (what the product trains)
                loss = loss + tf.add_n(model.losses)
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    def sync(loss):
        loss.numpy()

    yield "nhwc", _timings(step, sync, batches, args)
    if args.get("diagnose_pipeline"):
        yield PIPELINE, _timings(step, sync, None, args, product_epoch)
        yield FRAMEWORK_LOOP, _keras_fit_epochs(build, xs, y, args)


def _keras_fit_epochs(build, xs, y, args) -> list[float]:
    """The least Keras' fit loop costs: compile with the loss only (no metrics), as many
    batches per compiled call as the product's default (``KERAS_STEPS_PER_CALL``), fit on
    the preloaded batches as a tensor dataset, no callback but the clock; one warm-up epoch,
    then one epoch per repetition."""
    from runners.keras.model import keras, tf
    from runners.keras.train import divisor_at_most

    model, bs, steps = build(), args["batch"], args["steps"]
    data = tf.data.Dataset.from_tensor_slices((xs, y)).batch(bs).repeat()
    model.compile(optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM), jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=divisor_at_most(KERAS_STEPS_PER_CALL, steps))

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.t0)

    clock = Clock()
    model.fit(data, epochs=1 + args["reps"], steps_per_epoch=steps, callbacks=[clock],
              verbose=0)
    return clock.seconds[1:]


def _mxnet_loop(build, x, y, args, product_epoch):
    net = build()  # first: the backend imports MXNet (shims, OpenMP threads from the config)
    import mxnet as mx
    from mxnet import autograd, gluon

    bs = args["batch"]
    net.hybridize(static_alloc=True, static_shape=True)
    batches = [(mx.nd.array(x[i:i + bs], dtype=np.float32),
                mx.nd.array(y[i:i + bs], dtype=np.float32)) for i in range(0, len(y), bs)]
    trainer = gluon.Trainer(net.collect_params(), "sgd", {
        "learning_rate": LR, "momentum": MOMENTUM, "wd": WEIGHT_DECAY})
    ce = gluon.loss.SoftmaxCrossEntropyLoss()

    def step(xb, yb):
        with autograd.record():
            loss = ce(net(xb), yb)
        loss.backward()
        trainer.step(bs)

    def sync(_):
        mx.nd.waitall()

    yield "nchw", _timings(step, sync, batches, args)
    if args.get("diagnose_pipeline"):
        yield PIPELINE, _timings(step, sync, None, args, product_epoch)


BUILT_IN_LOOPS = {"torch": _torch_loop, "keras": _keras_loop, "mxnet": _mxnet_loop}
