"""Training: ``model.fit`` over the input pipeline, with ``TrainingProtocol`` plugged in through
a Keras callback.

- Optimizers mean what torch's do where Keras allows (``cnnzoo.core.optim``): SGD (momentum,
  Nesterov), Adam and RMSProp add ``weight_decay * w`` to the gradient, which Keras expresses as
  an L2 regularizer of ``weight_decay / 2`` on every trainable weight (``build_model``; Keras'
  own ``weight_decay`` argument is decoupled, which is torch's AdamW and is used for AdamW
  only). Remaining differences: Keras' RMSProp adds ``eps`` inside the square root
  (TensorFlow's and the Inception papers' RMSProp; torch adds it outside), Adam adds it after
  bias-correcting the rate instead of the moment, and SGD's momentum holds ``lr * gradient``
  (identical steps while the rate is constant). The learning rate is the run's ``Schedule``
  as a table the compiled step reads at the optimizer's iteration count (``StepRates``), and
  ``clip_grad_norm`` is Keras' ``global_clipnorm``, applied to the gradient with the L2 term
  (torch clips before adding the weight decay).
- Exact resume: every generator the training draws from (Python, NumPy, each Dropout's
  ``SeedGenerator``) is re-seeded at each epoch's start, the ``tf.data`` pipeline starts at the
  checkpoint's epoch, and the optimizer state comes from the checkpoint (``state.restore``).
  TensorFlow's global seed is set once at ``build``: nothing in the compiled step uses it, and
  re-setting it would clear TensorFlow's kernel cache every epoch (``seed_generators``).
- Divergence: ``SpecModel.loss_hook`` records the first non-finite training loss's step in a
  variable inside the compiled step (``LossWatch``); it is read once per epoch, with the
  metrics, and handed to the protocol, which stops the run.
"""
from __future__ import annotations

import math

import numpy as np

from cnnzoo.core.errors import ConfigError
from cnnzoo.core.finetune import FineTuning
from cnnzoo.core.optim import Optimizer, Schedule, num_batches
from cnnzoo.core.training import FirstBadStep, TrainingProtocol, TrainReport

from . import state
from .data import input_pipeline
from .model import PACKAGE, keras, tf


def make_optimizer(o: Optimizer, policy: str | None, learning_rate=None):
    """``o`` as its Keras class, at ``learning_rate`` (a ``StepRates``; default ``o.lr``)."""
    lr = o.lr if learning_rate is None else learning_rate
    clip = {"global_clipnorm": o.clip_grad_norm}
    if o.name == "sgd":
        opt = keras.optimizers.SGD(lr, momentum=o.momentum, nesterov=o.nesterov, **clip)
    elif o.name == "adam":  # torch's eps (Keras' default is 1e-7)
        opt = keras.optimizers.Adam(lr, epsilon=o.eps, **clip)
    elif o.name == "rmsprop":  # torch's alpha is Keras' rho
        opt = keras.optimizers.RMSprop(lr, rho=o.alpha, epsilon=o.eps, momentum=o.momentum,
                                       **clip)
    else:  # adamw: Keras' decoupled decay is torch's AdamW: w -= lr * weight_decay * w
        opt = keras.optimizers.AdamW(lr, weight_decay=o.weight_decay, epsilon=o.eps, **clip)
    if policy == "mixed_float16":  # float16 gradients need loss scaling
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


@keras.saving.register_keras_serializable(package=PACKAGE)
class StepRates(keras.optimizers.schedules.LearningRateSchedule):
    """A ``Schedule``'s rates as a float32 table indexed by the optimizer's iteration count
    inside the compiled step: the rates torch and MXNet set before each step, with no Python
    call per step; a resumed run's restored count continues the sequence. Its config is the
    ``Schedule``'s fields (the table is rebuilt from them)."""

    def __init__(self, **schedule):
        self.schedule = Schedule(**schedule)
        self.table = tf.constant(self.schedule.rates(), tf.float32)

    def __call__(self, step):
        last = self.schedule.total_steps - 1
        return tf.gather(self.table, tf.minimum(tf.cast(step, tf.int32), last))

    def get_config(self):
        return dict(vars(self.schedule))


@keras.saving.register_keras_serializable(package=PACKAGE)
def smoothed_cross_entropy(y_true, y_pred, label_smoothing: float):
    """Per-image sparse softmax cross-entropy of logits with label smoothing, torch's formula
    ``(1 - s) * -log p[y] + s * mean_k(-log p[k])`` (Keras' sparse loss has no smoothing)."""
    logp = tf.nn.log_softmax(tf.cast(y_pred, tf.float32))
    labels = tf.reshape(tf.cast(y_true, tf.int32), [-1, 1])
    nll = -tf.squeeze(tf.gather(logp, labels, batch_dims=1), -1)
    return (1 - label_smoothing) * nll - label_smoothing * tf.reduce_mean(logp, axis=-1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class SmoothedCrossEntropy(keras.losses.Loss):
    """``smoothed_cross_entropy`` as a loss, its mean over the batch."""

    def __init__(self, label_smoothing: float, **kwargs):
        super().__init__(**kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        return smoothed_cross_entropy(y_true, y_pred, self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def output_loss(label_smoothing: float):
    """The loss of one output."""
    if label_smoothing:
        return SmoothedCrossEntropy(label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def coupled_weight_decay(o: Optimizer) -> float:
    """The weight decay that becomes L2 regularization (torch's SGD/Adam/RMSprop meaning); AdamW
    decays decoupled, inside the optimizer."""
    return 0.0 if o.name == "adamw" else o.weight_decay


# --------------------------------------------------------------------------- seeding, divergence
class LossWatch:
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


def seed_generators(seed: int, generators: list) -> None:
    """Seed every ``SeedGenerator`` state from the epoch's ``seed`` (``TrainingProtocol.
    start_epoch``): generator i starts from ``[SeedSequence([seed, i]), 0]`` (a variable
    assignment: the compiled functions are untouched).

    TensorFlow's global seed is set once, in ``build``, and never here: no op of the compiled
    train or test step draws from it (Dropout runs stateless random ops keyed by its
    ``SeedGenerator`` state; ``test_train_step_uses_no_global_tf_seed`` checks this), and
    ``tf.random.set_seed`` clears TensorFlow's kernel cache, so every epoch would instantiate
    and optimize the train and test functions again (ResNet-50: seconds per epoch)."""
    for i, variable in enumerate(generators):
        first = int(np.random.SeedSequence([seed, i]).generate_state(1)[0] & 0x7FFFFFFF)
        variable.assign(np.array([first, 0], dtype=variable.dtype))


# --------------------------------------------------------------------------- the compiled model
def metric_keys(outputs: list[str], smoothed: bool = False) -> tuple[str, list[str], list[str]]:
    """The logs' keys of the accuracy, of each output's cross-entropy and of each output's
    training loss (``compile_for_training``'s metrics: "sce", the label-smoothed one, when
    ``smoothed``): Keras prefixes them with the output's name when there are several."""
    prefix = (lambda o: f"{o}_") if len(outputs) > 1 else (lambda o: "")
    ce_keys = [f"{prefix(o)}ce" for o in outputs]
    return (f"{prefix(outputs[0])}acc", ce_keys,
            [f"{prefix(o)}sce" for o in outputs] if smoothed else ce_keys)


def training_loss(logs: dict, ce_keys: list[str], aux_weight: float) -> float:
    """torch's training loss from Keras' logs: the logits' cross-entropy plus the weighted
    auxiliary ones (Keras' own ``loss`` also holds the L2 penalty of the weight decay)."""
    main, *aux = (logs[k] for k in ce_keys)
    return float(main + aux_weight * sum(aux))


def labels_per_output(ds, outputs: list[str]):
    """A dataset of (images, labels) for a model with ``outputs``: every head is trained on
    the same labels."""
    if len(outputs) == 1:
        return ds
    return ds.map(lambda x, y: (x, (y,) * len(outputs)))


def compile_for_training(model, spec, cfg, strategy, policy, steps_per_call: int,
                         learning_rate=None) -> None:
    """Compile ``model`` as training steps it: the configured optimizer (at ``learning_rate``, a
    ``StepRates``; default ``optim.lr``), a loss per output (label-smoothed if asked; auxiliary
    heads weighted by ``spec.aux_weight``), the accuracy and each output's plain cross-entropy
    (validation's loss) and smoothed one as metrics (``metric_keys``), ``steps_per_call``
    batches per compiled call; its optimizer's variables made now."""
    outputs, optim = list(model.output_names), Optimizer.from_config(cfg.optim)
    smoothing = optim.label_smoothing

    def ce():
        ces = [keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="ce")]
        if smoothing:
            ces.append(keras.metrics.MeanMetricWrapper(
                smoothed_cross_entropy, name="sce", label_smoothing=smoothing))
        return ces

    for name in FineTuning.from_config(cfg, spec).frozen:  # no update; batch norms in
        model.get_layer(name).trainable = False           # inference mode (Keras' rule)
    with strategy.scope():
        model.compile(
            optimizer=make_optimizer(optim, policy, learning_rate),
            loss=[output_loss(smoothing) for _ in outputs],
            loss_weights=[1.0] + [spec.aux_weight] * (len(outputs) - 1),
            metrics=[[keras.metrics.SparseCategoricalAccuracy(name="acc"), *ce()]]
            + [ce() for _ in outputs[1:]],
            jit_compile=cfg.backend.get("jit_compile", "auto"),
            steps_per_execution=steps_per_call)
        # the optimizer's variables (zeros) now, not in the first trace of the train step:
        # Keras builds them lazily there without a tf.distribute strategy, and a tf.function
        # that creates variables is traced twice (Inception-ResNet-v2 at 75 px: ~20 s)
        state.build_optimizer(model)


# --------------------------------------------------------------------------- the callback
class EpochCallback(keras.callbacks.Callback):
    """``TrainingProtocol`` inside ``model.fit``: at each epoch's start the seeds (the rate of
    each step comes from the optimizer's ``StepRates``), validation timed apart, and at its end
    the means, the first non-finite step and the checkpoint writer handed to ``end_epoch``."""

    def __init__(self, protocol: TrainingProtocol, steps: int, images_per_epoch: int,
                 outputs: list[str], aux_weight: float, watch: LossWatch, generators: list):
        super().__init__()
        self.protocol, self.steps, self.images_per_epoch = protocol, steps, images_per_epoch
        self.watch, self.generators = watch, generators
        # the training loss is the one optimized: label-smoothed where smoothing is on
        self.acc_key, self.ce_keys, self.train_keys = metric_keys(
            outputs, protocol.optim.label_smoothing > 0)
        self.aux_weight = aux_weight

    def on_epoch_begin(self, epoch, logs=None):
        seed_generators(self.protocol.start_epoch(epoch), self.generators)
        self._steps_shown = 0

    def on_test_begin(self, logs=None):
        self.protocol.begin_validation()

    def on_test_end(self, logs=None):
        self.protocol.end_validation()

    def _loss(self, logs: dict) -> float:
        return training_loss(logs, self.train_keys, self.aux_weight)

    def on_epoch_end(self, epoch, logs=None):
        means = {"train_loss": self._loss(logs), "train_acc": float(logs[self.acc_key])}
        if f"val_{self.ce_keys[0]}" in logs:  # validation: the logits alone, as in inference
            means["val_loss"] = float(logs[f"val_{self.ce_keys[0]}"])
            means["val_acc"] = float(logs[f"val_{self.acc_key}"])
        step, bad = self.watch.first_bad(), None
        if step is not None:  # the epoch's loss says nan or inf (the weight decay alone: inf)
            loss = means["train_loss"]
            bad = FirstBadStep(step - epoch * self.steps, loss if not math.isfinite(loss)
                               else math.inf)
        last = epoch + 1 == self.protocol.max_epochs  # its folder gets the .keras archive too
        self.protocol.end_epoch(epoch, means, self.images_per_epoch, bad,
                                lambda folder: state.write_state(self.model, folder, last))
        if self.protocol.stop_reason:
            self.model.stop_training = True  # Keras' own way to end fit after this epoch


class LiveEpochCallback(EpochCallback):
    """With a live terminal display: also reports every step. (A batch hook makes Keras read
    the running metrics after each step, so it is installed only when something shows them.)"""

    def on_train_batch_end(self, batch, logs=None):
        # ``batch`` is the last step of the compiled call (steps_per_execution may be > 1)
        done, self._steps_shown = batch + 1 - self._steps_shown, batch + 1
        loss = self._loss(logs) if all(k in logs for k in self.train_keys) else logs.get("loss")
        self.protocol.step(done, lambda: {"loss": loss, "acc": logs.get(self.acc_key)})


# --------------------------------------------------------------------------- fit
def divisor_at_most(n: int, steps: int) -> int:
    """The largest divisor of ``steps`` that is <= ``n``: a compiled call of several batches
    stops only when it has run all of them, so it must never straddle two epochs."""
    return max(d for d in range(1, max(1, min(n, steps)) + 1) if steps % d == 0)


def steps_per_execution(cfg, devices: int) -> int:
    """``backend.steps_per_execution``: auto is 16 on one device and 1 over several, where
    more fails inside Keras 3.15's distributed step ("You must feed a value for placeholder
    tensor ..."), so a number above 1 is refused there."""
    wanted = cfg.backend.get("steps_per_execution", "auto")
    if devices == 1:
        return 16 if wanted == "auto" else wanted
    if wanted not in ("auto", 1):
        raise ConfigError(f"backend.steps_per_execution={wanted} does not work when keras "
                          f"trains over {devices} devices (tf.distribute): use auto or 1")
    return 1


def fit(model, spec, train, val, resume, *, cfg, run_dir, strategy, policy, devices: int,
        extra: dict, hooks=()) -> TrainReport:
    """Compile ``model``, restore ``resume``'s state (if any) and train it to
    ``trainer.max_epochs`` (or until an epoch-end hook stops it); ``extra``: the report's
    hardware facts."""
    outputs = list(model.output_names)
    bs, max_epochs = cfg.data.batch_size, cfg.trainer.max_epochs
    start = 0 if resume is None else resume.epoch
    steps = num_batches(cfg.trainer.limit_train_batches, math.ceil(len(train) / bs))
    val_steps = num_batches(cfg.trainer.limit_val_batches, math.ceil(len(val) / bs))
    train_ds = labels_per_output(
        input_pipeline(train, bs, cfg.seed, True, max_epochs, steps, start), outputs)
    val_ds = labels_per_output(input_pipeline(val, bs, cfg.seed, False, 1, val_steps), outputs)
    # the protocol (and its schedule) before compiling: the optimizer reads the schedule
    protocol = TrainingProtocol(cfg, run_dir, "keras", steps, checkpoint_file=state.CHECKPOINT,
                                hooks=hooks)
    compile_for_training(model, spec, cfg, strategy, policy,
                         divisor_at_most(steps_per_execution(cfg, devices), steps),
                         StepRates(**vars(protocol.schedule)))
    resumed = state.training_file(resume.path) if resume is not None else None
    if resumed is not None:
        state.restore(model, resumed, strategy)
        if start >= max_epochs:  # nothing left to train
            protocol.close()
            return protocol.report(extra, checkpoint=resumed)
    watch = LossWatch(strategy, model.optimizer.iterations)
    callback = (LiveEpochCallback if protocol.live else EpochCallback)(
        protocol, steps, min(steps * bs, len(train)), outputs, spec.aux_weight, watch,
        seed_state_variables(model))
    model.loss_hook = watch.update
    try:
        model.fit(train_ds, initial_epoch=start, epochs=max_epochs, steps_per_epoch=steps,
                  validation_data=val_ds, callbacks=[callback], verbose=0, shuffle=False)
    finally:
        model.loss_hook = None
        protocol.close()
    return protocol.report(extra, checkpoint=resumed)
