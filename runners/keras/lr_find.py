"""task=lr_find's steps (``Backend.lr_range_test``): the model compiled as training compiles
it (``train.compile_for_training``: its losses and configured optimizer), one
``train_on_batch`` per rate on the training input pipeline's batches, with the optimizer's
rate replaced before each step."""
from __future__ import annotations

import math

from cnnzoo.core.lr_range import range_test
from cnnzoo.core.optim import Optimizer

from .data import input_pipeline
from .train import compile_for_training, labels_per_output, metric_keys, training_loss


def lr_range_test(model, spec, train, rates, stop, *, cfg, strategy, policy) -> list[float]:
    """One training step per rate; each step's loss as training reports it (``training_loss``:
    the cross-entropies without the weight decay's L2 penalty)."""
    outputs, bs = list(model.output_names), cfg.data.batch_size
    epochs = math.ceil(len(rates) / max(1, math.ceil(len(train) / bs)))  # a batch for each rate
    batches = labels_per_output(input_pipeline(train, bs, cfg.seed, True, epochs), outputs)
    # one batch per compiled call: the loss of every step is read, and the rate changes
    compile_for_training(model, spec, cfg, strategy, policy, steps_per_call=1)
    # the loss training optimizes: label-smoothed where the recipe smooths
    _, _, train_keys = metric_keys(outputs, Optimizer.from_config(cfg.optim).label_smoothing > 0)

    def step(rate: float, batch) -> float:
        model.optimizer.learning_rate = rate  # assigns the optimizer's variable: no new trace
        logs = model.train_on_batch(*batch, return_dict=True)  # this batch's metrics alone
        return training_loss(logs, train_keys, spec.aux_weight)

    return range_test(rates, batches, step, stop)
