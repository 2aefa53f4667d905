"""Training: the backend's own loop over ``gluon.Trainer`` steps, epoch by epoch through
``cnnzoo.core.training.TrainingProtocol`` (seeding, metrics, checkpoints, divergence stop).

- Hardware: one context, or several in this one process (each batch split over them, gradients
  summed by a kvstore, batch-norm running statistics averaged after every epoch).
- Optimizers mean what torch's do (``cnnzoo.core.optim``): SGD (momentum, Nesterov) and Adam
  add the weight decay to the gradient (MXNet's own ``sgd``/``nag``/``adam``); AdamW decays the
  weights directly and RMSProp follows ``torch.optim.RMSprop`` (decay ``alpha``, ``eps`` outside
  the square root, momentum), both implemented below. Two details of MXNet's fused updates
  remain: the SGD momentum buffer holds ``lr * gradient`` (same steps as torch while the rate is
  constant; a rate that changes per step makes them drift slightly), and Adam adds ``eps`` to
  the square root of the second moment before its bias correction, torch after it (the two
  differ only while ``sqrt(v)`` ~ ``eps``).
- The rate of each step is the run's ``Schedule`` (``trainer.set_learning_rate`` before the
  step); ``clip_grad_norm`` clips each context's summed gradient (after the kvstore's
  reduction) before the update adds the weight decay, as torch does.
- Exact resume: MXNet cannot save its generators' state, so they are reseeded at every epoch
  start (``mx.random.seed(s, ctx="all")``); a divergence is found from device-side counts of
  the steps whose running loss sum is finite, read with the epoch's loss.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from architectures import spec as S
from cnnzoo.core.finetune import FineTuning
from cnnzoo.core.optim import Optimizer, num_batches
from cnnzoo.core.training import FirstBadStep, TrainingProtocol, TrainReport
from cnnzoo.core.weights import parametrised

from . import state
from .compat import import_mxnet


# --------------------------------------------------------------------------- optimizers
@functools.cache
def _optimizer_classes() -> dict:
    """torch-equivalent AdamW and RMSprop as MXNet optimizers. They subclass MXNet's classes,
    which exist only once MXNet is imported (after the thread settings), hence this function."""
    mx = import_mxnet()
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


def make_optimizer(opt: Optimizer):
    """``gluon.Trainer``'s optimizer arguments for ``opt``: (name, params) or (instance, None)."""
    if opt.name == "sgd":
        return ("nag" if opt.nesterov else "sgd"), {
            "learning_rate": opt.lr, "momentum": opt.momentum, "wd": opt.weight_decay}
    if opt.name == "adam":  # torch's betas
        return "adam", {"learning_rate": opt.lr, "beta1": 0.9, "beta2": 0.999,
                        "epsilon": opt.eps, "wd": opt.weight_decay}
    classes = _optimizer_classes()
    if opt.name == "rmsprop":
        return classes["RMSprop"](learning_rate=opt.lr, alpha=opt.alpha, epsilon=opt.eps,
                                  momentum=opt.momentum, wd=opt.weight_decay), None
    # adamw (Optimizer.from_config refuses any other name)
    return classes["AdamW"](learning_rate=opt.lr, weight_decay=opt.weight_decay,
                            epsilon=opt.eps), None


def make_trainer(model, model_cfg, kvstore: str | None = None):
    """The ``gluon.Trainer`` of ``model``'s parameters with the configured optimizer
    (``model_cfg``: the run's config, its ``optim`` and ``finetune``; ``kvstore``: how several
    contexts sum their gradients)."""
    from mxnet import gluon

    optim = Optimizer.from_config(model_cfg.optim)
    fine_tune(model, FineTuning.from_config(model_cfg, model.spec))
    # clipping needs the reduced gradient before the update: updates out of the kvstore
    return gluon.Trainer(model.collect_params(), *make_optimizer(optim),
                         kvstore=kvstore or "device",
                         update_on_kvstore=False if optim.clip_grad_norm else None)


def fine_tune(model, ft: FineTuning) -> None:
    """``finetune.*``: a frozen node's parameters get no gradient and its batch norm uses and
    keeps its running statistics; the others learn at ``lr_mult`` times the rate (Gluon's
    per-parameter multiple, which its optimizers apply)."""
    if not ft.active:
        return
    for node, _, _ in parametrised(model.spec):
        block, scale = model.layer(node.name), ft.lr_scale(node.name)
        for param in block.collect_params().values():
            if scale == 0.0:
                param.grad_req = "null"
            else:
                param.lr_mult = scale
        if scale == 0.0 and isinstance(node.layer, S.BatchNorm):
            block._kwargs["use_global_stats"] = True  # read by its forward (F.BatchNorm)
    for graph in {model, model.inference_graph}:  # traced graphs are made again
        graph._clear_cached_op()


# --------------------------------------------------------------------------- one step
@functools.cache
def _cross_entropy():
    """One loss block for every step (building a Gluon block costs ~50 us of Python)."""
    from mxnet import gluon
    return gluon.loss.SoftmaxCrossEntropyLoss()


def smoothed_cross_entropy(logits, labels, label_smoothing: float):
    """Per-image softmax cross-entropy with label smoothing, torch's formula
    ``(1 - s) * -log p[y] + s * mean_k(-log p[k])``."""
    from mxnet import nd

    logp = nd.log_softmax(logits, axis=1)
    return -(1 - label_smoothing) * nd.pick(logp, labels, axis=1) \
        - label_smoothing * nd.mean(logp, axis=1)


def training_loss(outputs, labels, aux_weight: float, label_smoothing: float = 0.0):
    """Per-image softmax cross-entropy of the training graph's outputs (label-smoothed if
    asked), and the main logits. With auxiliary classifiers (``(logits, *aux)``) their losses
    join, weighted as in the papers: ``main + aux_weight * sum(aux)``."""
    from mxnet import nd

    ce = _cross_entropy() if not label_smoothing else functools.partial(
        smoothed_cross_entropy, label_smoothing=label_smoothing)
    logits, *aux = outputs if isinstance(outputs, (list, tuple)) else (outputs,)
    loss = ce(logits, labels)
    if aux:
        loss = loss + aux_weight * nd.add_n(*[ce(a, labels) for a in aux])
    return loss, logits


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


# --------------------------------------------------------------------------- the loop
def fit(backend, model, train, val, resume=None) -> TrainReport:
    """``Backend.train`` of the MXNet backend (``backend``: its ``MXNetBackend``)."""
    c, mx, ctxs = backend.cfg, backend.mx, backend.contexts
    hybridize = bool(c.backend.get("hybridize", True))
    kvstore = c.backend.get("kvstore", "device") if len(ctxs) > 1 else None
    if len(ctxs) > 1 and c.hardware.strategy not in ("auto", None):
        print(f"mxnet: hardware.strategy={c.hardware.strategy} is a torch concept; training "
              f"data-parallel in this process on {', '.join(map(str, ctxs))} with kvstore "
              f"'{kvstore}'", flush=True)
    if resume is not None:
        backend.load_checkpoint(model, resume.file(state.WEIGHTS_FILE))
    model.collect_params().reset_ctx(ctxs)
    trainer = make_trainer(model, c, kvstore)
    if resume is not None:
        state.restore_trainer_state(mx, trainer, resume.path)
    train_batches = backend.input_pipeline(train, True, num_batches(
        c.trainer.limit_train_batches, math.ceil(len(train) / c.data.batch_size)))
    val_batches = backend.input_pipeline(val, False, num_batches(
        c.trainer.limit_val_batches, math.ceil(len(val) / c.data.batch_size)))

    protocol = TrainingProtocol(c, backend.run_dir, backend.name, len(train_batches),
                                checkpoint_file=state.WEIGHTS_FILE, hooks=backend.epoch_end_hooks)
    sums_block, steps = step_sums(hybridize), len(train_batches)
    try:
        for epoch in range(resume.epoch if resume is not None else 0, c.trainer.max_epochs):
            mx.random.seed(protocol.start_epoch(epoch), ctx="all")
            train_batches.set_epoch(epoch)
            rates = protocol.schedule.rates(epoch * steps, (epoch + 1) * steps)
            loss, acc, seen, bad = train_epoch(model, trainer, train_batches, ctxs, protocol,
                                               sums_block, rates, protocol.optim)
            sync_running_stats(mx, model, ctxs)
            protocol.begin_validation()
            val_loss, val_acc = evaluate_batches(mx, model, val_batches, ctxs)
            protocol.end_validation()
            # a diverged epoch raises here, before anything is written
            protocol.end_epoch(epoch, {"train_loss": loss, "train_acc": acc, "val_loss": val_loss,
                                       "val_acc": val_acc}, seen,
                               None if bad is None else FirstBadStep(bad, loss),
                               functools.partial(state.write_state, mx, model, trainer))
            if protocol.stop_reason:
                break
    finally:
        protocol.close()
    model.collect_params().reset_ctx(mx.cpu())  # predict and export run on the CPU
    return protocol.report(
        {"device": ", ".join(map(str, ctxs)), "contexts": [str(x) for x in ctxs],
         "kvstore": kvstore, "hybridize": hybridize},
        checkpoint=resume.file(state.WEIGHTS_FILE) if resume is not None else None)


def train_epoch(model, trainer, batches, ctxs, protocol, sums_block, rates: list[float],
                optim: Optimizer):
    """One epoch at ``rates`` (one per batch); loss and accuracy are summed on the devices
    (``step_sums``) and read once at the end. Returns loss, accuracy, images and the 1-based
    batch where the loss sum stopped being finite (None if it stayed finite). That batch is
    counted on the devices too: the number of steps after which each context's running sum is
    still finite (NaN and Inf stay)."""
    mx = import_mxnet()
    sums = [mx.nd.zeros(2, ctx=ctx) for ctx in ctxs]  # per context: loss sum, correct
    finite = [mx.nd.zeros(2, ctx=ctx) for ctx in ctxs]  # steps with a finite sum, steps
    seen, pending = 0, []
    for (x, y), rate in zip(batches, rates):
        n = len(y)
        if n < len(ctxs):  # cannot be split over every context (at most one per epoch)
            continue
        trainer.set_learning_rate(rate)
        losses, outputs, ys = train_step(model, trainer, x, y, ctxs, optim)
        for i, (loss, logits, yi) in enumerate(zip(losses, outputs, ys)):
            sums[i], finite[i] = sums_block(loss, logits, yi, sums[i], finite[i])
        seen += n
        # bound how far Python runs ahead of the engine without reading any value
        pending.append(losses[0])
        if len(pending) > 2:
            pending.pop(0).wait_to_read()
        # running values are read only when a terminal display refreshes (a few times/s)
        protocol.step(1, lambda seen=seen: _running(sums, seen))
    total = sum(s.asnumpy().astype(np.float64) for s in sums)  # the one host read
    loss = float(total[0] / max(seen, 1))
    bad = None if math.isfinite(loss) else \
        int(min(f.asnumpy()[0] for f in finite)) + 1  # (computed already)
    return loss, float(total[1] / max(seen, 1)), seen, bad


def train_step(model, trainer, x, y, ctxs, optim: Optimizer) -> tuple[list, list, list]:
    """One optimizer step on the batch ``x, y`` split over ``ctxs``, with the recipe's label
    smoothing and gradient clipping; per context, the per-image training losses
    (``training_loss``), the main logits and the labels (nothing read back to the host)."""
    from mxnet import autograd, gluon

    xs = gluon.utils.split_and_load(x, ctxs, even_split=False)
    ys = gluon.utils.split_and_load(y, ctxs, even_split=False)
    losses, outputs = [], []
    with autograd.record():
        for xi, yi in zip(xs, ys):
            loss, logits = training_loss(model(xi), yi, model.aux_weight, optim.label_smoothing)
            losses.append(loss)
            outputs.append(logits)
    autograd.backward(losses)
    if optim.clip_grad_norm is None:
        trainer.step(len(y))  # gradients of the summed loss / n: the batch mean, as in torch
    else:
        clip_and_step(trainer, model, ctxs, len(y), optim.clip_grad_norm)
    return losses, outputs, ys


def clip_and_step(trainer, model, ctxs, n: int, max_norm: float) -> None:
    """``trainer.step(n)`` with the batch-mean gradient's global norm clipped at ``max_norm``:
    the gradients (of the summed loss: n times the mean) are reduced over the contexts, each
    context's copy is clipped at ``max_norm * n``, then the update runs (``make_trainer`` keeps
    the updates out of the kvstore for this)."""
    from mxnet import gluon

    trained = [p for p in model.collect_params().values() if p.grad_req != "null"]
    trainer.allreduce_grads()
    for ctx in ctxs:  # no host read: the norm stays on the device
        gluon.utils.clip_global_norm([p.grad(ctx) for p in trained], max_norm * n,
                                     check_isfinite=False)
    trainer.update(n)


def evaluate_batches(mx, model, batches, ctxs) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in inference mode, over ``ctxs``."""
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


def _running(sums, seen: int) -> dict:
    total = sum(s.asnumpy().astype(np.float64) for s in sums)
    return {"loss": total[0] / max(seen, 1), "acc": total[1] / max(seen, 1)}


def sync_running_stats(mx, model, ctxs) -> None:
    """Average batch-norm running statistics over the contexts (each updates its own copy from
    its share of the batch) so that every context, and the saved model, holds the same values."""
    if len(ctxs) < 2:
        return
    for p in model.collect_params().values():
        if p.grad_req == "null":
            copies = p.list_data()
            p.set_data(mx.nd.add_n(*[d.as_in_context(ctxs[0]) for d in copies]) / len(copies))
