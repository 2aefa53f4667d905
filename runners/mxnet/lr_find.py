"""task=lr_find's steps (``Backend.lr_range_test``): the training loop's own step
(``train.train_step``: its training loss and ``gluon.Trainer`` with the configured optimizer)
on one context, with the trainer's rate replaced before each step."""
from __future__ import annotations

from cnnzoo.core.lr_range import consecutive_batches, range_test
from cnnzoo.core.optim import Optimizer

from .train import make_trainer, train_step


def lr_range_test(backend, model, train, rates, stop) -> list[float]:
    """One ``train_step`` per rate on the backend's training input pipeline, epoch after
    epoch, on its first context (one device: more is refused before the backend starts);
    each step's mean loss read back to the host. The model is back on the CPU afterwards, as
    after training."""
    mx, ctxs = backend.mx, backend.contexts[:1]
    batches = backend.input_pipeline(train, True)
    model.collect_params().reset_ctx(ctxs)
    trainer = make_trainer(model, backend.cfg)
    optim = Optimizer.from_config(backend.cfg.optim)

    def step(rate: float, batch) -> float:
        trainer.set_learning_rate(rate)
        losses, _, _ = train_step(model, trainer, *batch, ctxs, optim)  # per image, one ctx
        return losses[0].mean().asscalar()

    try:
        return range_test(rates, consecutive_batches(batches, batches.set_epoch), step, stop)
    finally:
        model.collect_params().reset_ctx(mx.cpu())  # predict and export run on the CPU
