"""Training: one pure jitted step over explicit state, the backend's own loop around it, epoch
by epoch through ``cnnzoo.core.training.TrainingProtocol`` (seeding, metrics, checkpoints,
divergence stop).

- The state is a pytree ``{"params", "batch_stats", "opt_state"}``; the step is a function of
  (state, running sums, batch, rate, epoch key, batch index) and nothing else: no generator,
  no global. Dropout's key is ``fold_in(PRNGKey(epoch seed), batch index)``, the epoch seed
  the protocol's, so a run resumed from a checkpoint (the same arrays) repeats the same steps
  bit for bit.
- Optimizers mean what torch's do (``cnnzoo.core.optim``), as optax chains without the rate
  (``update_direction``): the step subtracts ``rate * direction``, the rate the schedule's
  for that step. SGD (momentum, Nesterov: ``optax.trace`` is torch's buffer), Adam and RMSprop
  add ``weight_decay * w`` to the gradient; AdamW adds it after the Adam direction, so the
  weights shrink by ``rate * weight_decay`` (decoupled); RMSprop has ``eps`` outside the square
  root and starts its average at 0, as ``torch.optim.RMSprop``. ``clip_grad_norm`` clips the
  loss's gradient first, with torch's ``clip_grad_norm_`` formula.
- The loss is torch's cross-entropy with label smoothing, plus ``aux_weight`` times the
  auxiliary heads' losses; its sum, the correct predictions and the count of steps after which
  the running sum is still finite stay on the device and are read once per epoch.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnzoo.core.finetune import FineTuning
from cnnzoo.core.optim import Optimizer, num_batches
from cnnzoo.core.training import FirstBadStep, TrainingProtocol, TrainReport
from cnnzoo.core.weights import parametrised

from . import state as checkpoint
from .data import EpochBatches
from .model import BATCH_STATS, PARAMS, scope_name


# --------------------------------------------------------------------------- optimizers
def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: every gradient times
    min(1, max_norm / (global norm + 1e-6))."""
    def update(grads, state, params=None):
        norm = optax.global_norm(grads)
        coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree_util.tree_map(lambda g: g * coef.astype(g.dtype), grads), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def update_direction(optim: Optimizer) -> optax.GradientTransformation:
    """The optimizer's update without the learning rate (the step multiplies by the rate of
    the schedule), with torch's meaning of every setting."""
    parts = []
    if optim.clip_grad_norm is not None:  # the loss's gradient, before any weight decay
        parts.append(clip_by_global_norm_like_torch(optim.clip_grad_norm))
    coupled = optim.weight_decay and optim.name != "adamw"
    if coupled:  # an L2 term: weight_decay * w joins the gradient
        parts.append(optax.add_decayed_weights(optim.weight_decay))
    if optim.name in ("adam", "adamw"):  # torch's betas
        parts.append(optax.scale_by_adam(b1=0.9, b2=0.999, eps=optim.eps))
    if optim.name == "adamw" and optim.weight_decay:  # decoupled: w shrinks by rate * wd
        parts.append(optax.add_decayed_weights(optim.weight_decay))
    if optim.name == "rmsprop":
        parts.append(optax.scale_by_rms(decay=optim.alpha, eps=optim.eps, initial_scale=0.0,
                                        eps_in_sqrt=False))
    if optim.name in ("sgd", "rmsprop") and optim.momentum:
        parts.append(optax.trace(decay=optim.momentum,
                                 nesterov=optim.nesterov and optim.name == "sgd"))
    return optax.chain(*parts) if parts else optax.identity()  # plain SGD: the gradient


# --------------------------------------------------------------------------- the loss
def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Per-image cross-entropy, torch's label smoothing:
    ``(1 - s) * -log p[y] + s * mean_k(-log p[k])``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    if not label_smoothing:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)


def nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1))


class Steps:
    """The jitted training and evaluation steps of one model and optimizer.

    ``train(state, sums, x, y, rate, key, index) -> (state, sums)``: one optimizer step;
    ``sums`` (float32: loss sum, correct, steps whose running loss sum is finite) gain this
    step's. ``evaluate(variables, sums, x, y) -> sums`` (loss sum, correct) in inference mode.
    The state's buffers are donated: a step's input state must not be used after it."""

    def __init__(self, module, aux_weight: float, optim: Optimizer,
                 lr_scales: dict[str, float] | None = None):
        self.module, self.aux_weight, self.optim = module, aux_weight, optim
        self.lr_scales = lr_scales  # finetune.*: a multiple of the rate per scope (0: frozen)
        self.tx = update_direction(optim)
        self.train = jax.jit(self._train, donate_argnums=(0,))
        self.evaluate = jax.jit(self._evaluate)

    def init_state(self, variables: dict) -> dict:
        params = variables[PARAMS]
        return {PARAMS: params, BATCH_STATS: variables[BATCH_STATS],
                "opt_state": self.tx.init(params)}

    def loss(self, params, batch_stats, x, y, key):
        """The training loss (mean over the batch), the main logits, the new statistics."""
        outs, updates = self.module.apply({PARAMS: params, BATCH_STATS: batch_stats}, nhwc(x),
                                          train=True, mutable=[BATCH_STATS],
                                          rngs={"dropout": key})
        logits, *aux = outs if isinstance(outs, tuple) else (outs,)
        smoothing = self.optim.label_smoothing
        loss = jnp.mean(cross_entropy(logits, y, smoothing))
        for a in aux:
            loss = loss + self.aux_weight * jnp.mean(cross_entropy(a, y, smoothing))
        return loss, (logits, updates.get(BATCH_STATS, batch_stats))

    def _train(self, state, sums, x, y, rate, key, index):
        key = jax.random.fold_in(key, index)
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(self.loss, has_aux=True)(
            state[PARAMS], state[BATCH_STATS], x, y, key)
        direction, opt_state = self.tx.update(grads, state["opt_state"], state[PARAMS])
        params = self.updated(state[PARAMS], direction, rate)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == y)
        running = sums[0] + loss * y.shape[0]
        sums = jnp.stack([running, sums[1] + correct,
                          sums[2] + jnp.isfinite(running).astype(jnp.float32)])
        return {PARAMS: params, BATCH_STATS: batch_stats, "opt_state": opt_state}, sums

    def updated(self, params, direction, rate):
        """``params - rate * direction``, each scope at its multiple of the rate (a frozen
        one, multiple 0, stays as it is)."""
        step = lambda p, d, r=rate: p - r * d  # noqa: E731
        if self.lr_scales is None:
            return jax.tree_util.tree_map(step, params, direction)
        return {k: v if self.lr_scales[k] == 0.0 else jax.tree_util.tree_map(
                    functools.partial(step, r=rate * self.lr_scales[k]), v, direction[k])
                for k, v in params.items()}

    def _evaluate(self, variables, sums, x, y):
        logits = self.module.apply(variables, nhwc(x), train=False)
        return sums + jnp.stack([jnp.sum(cross_entropy(logits, y)),
                                 jnp.sum(jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)])


def fine_tuned_steps(backend, model) -> Steps:
    """The run's steps, with ``finetune.*``'s frozen nodes and rate multiples."""
    ft = FineTuning.from_config(backend.cfg, model.spec)
    scales = ({scope_name(n.name): ft.lr_scale(n.name) for n, _, _ in parametrised(model.spec)}
              if ft.active else None)
    return Steps(backend.training_module(model, ft.frozen), model.spec.aux_weight,
                 Optimizer.from_config(backend.cfg.optim), scales)


# --------------------------------------------------------------------------- the loop
def fit(backend, model, train, val, resume=None) -> TrainReport:
    """``Backend.train`` of the Flax backend (``backend``: its ``FlaxBackend``)."""
    c, replicated = backend.cfg, backend.replicated
    steps = fine_tuned_steps(backend, model)
    state = steps.init_state(model.variables)
    if resume is not None:  # the arrays of the epoch folder, checked against this run's
        state = checkpoint.read_state(resume.file(checkpoint.STATE_FILE), state)
    # fresh buffers (the steps donate them), one copy on every device
    state = jax.device_put(jax.device_get(state), replicated)
    train_batches = backend.input_pipeline(train, True, num_batches(
        c.trainer.limit_train_batches, math.ceil(len(train) / c.data.batch_size)))
    val_batches = backend.input_pipeline(val, False, num_batches(
        c.trainer.limit_val_batches, math.ceil(len(val) / c.data.batch_size)))
    protocol = TrainingProtocol(c, backend.run_dir, backend.name, len(train_batches),
                                checkpoint_file=checkpoint.STATE_FILE,
                                hooks=backend.epoch_end_hooks)
    per_epoch = len(train_batches)
    try:
        for epoch in range(resume.epoch if resume is not None else 0, c.trainer.max_epochs):
            key = jax.device_put(jax.random.PRNGKey(protocol.start_epoch(epoch)), replicated)
            train_batches.set_epoch(epoch)
            state, sums, seen = train_epoch(steps, state, train_batches, protocol, key,
                                            epoch * per_epoch, backend)
            total = np.asarray(sums, np.float64)  # the epoch's one read of the training sums
            loss, acc = total[0] / max(seen, 1), total[1] / max(seen, 1)
            bad = None if math.isfinite(loss) else FirstBadStep(int(total[2]) + 1, loss)
            variables = {PARAMS: state[PARAMS], BATCH_STATS: state[BATCH_STATS]}
            protocol.begin_validation()
            val_loss, val_acc = evaluate_batches(steps, variables, val_batches, backend)
            protocol.end_validation()
            model.variables = jax.device_get(variables)  # host copies: the next step donates
            # a diverged epoch raises here, before anything is written
            protocol.end_epoch(epoch, {"train_loss": loss, "train_acc": acc,
                                       "val_loss": val_loss, "val_acc": val_acc}, seen, bad,
                               functools.partial(checkpoint.write_state, state, model.spec))
            if protocol.stop_reason:
                break
    finally:
        protocol.close()
    names = [f"{d.platform}:{d.id}" for d in backend.devices]
    return protocol.report({"device": ", ".join(names), "replicas": len(names),
                            "platform": backend.devices[0].platform},
                           checkpoint=resume.file(checkpoint.STATE_FILE) if resume else None)


def train_epoch(steps: Steps, state, batches: EpochBatches, protocol, key, first_step: int,
                backend):
    """One epoch's steps at the schedule's rates (step ``first_step`` onwards), each batch
    split over the backend's devices; returns the state, the device-side sums and the images
    seen. Python runs at most two steps ahead of the devices (each queued step holds its
    batch)."""
    sums = jax.device_put(jnp.zeros(3, jnp.float32), backend.replicated)
    seen, pending = 0, []
    rate = protocol.schedule.rate
    for i, (x, y) in enumerate(batches):
        state, sums = steps.train(state, sums, x, y,
                                  np.float32(rate(first_step + i)), key, np.int32(i))
        seen += len(y)
        pending.append(sums)
        if len(pending) > 2:
            pending.pop(0).block_until_ready()
        # running values are read only when a terminal display refreshes (a few times/s)
        protocol.step(1, lambda sums=sums, seen=seen: {"loss": float(sums[0]) / seen,
                                                       "acc": float(sums[1]) / seen})
    return state, sums, seen


def evaluate_batches(steps: Steps, variables, batches: EpochBatches, backend):
    """Mean cross-entropy and accuracy in inference mode, on the backend's devices."""
    sums, seen = jax.device_put(jnp.zeros(2, jnp.float32), backend.replicated), 0
    for x, y in batches:
        sums = steps.evaluate(variables, sums, x, y)
        seen += len(y)
    total = np.asarray(sums, np.float64)
    return float(total[0] / max(seen, 1)), float(total[1] / max(seen, 1))
