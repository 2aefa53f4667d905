"""task=lr_find's steps (``Backend.lr_range_test``): the training loop's own jitted step
(``train.Steps``: its loss and the configured optimizer) on the training devices, with the
schedule's rate replaced by each rate of the test."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cnnzoo.core.checkpoints import epoch_seed
from cnnzoo.core.lr_range import consecutive_batches, range_test

from .model import BATCH_STATS, PARAMS
from .train import fine_tuned_steps


def lr_range_test(backend, model, train, rates, stop) -> list[float]:
    """One training step per rate on the backend's training input pipeline, epoch after
    epoch (dropout keys as in training: the epoch's seed and the batch's index); each step's
    mean loss read back to the host. The model ends with the trained variables (host arrays),
    as after training."""
    seed = backend.cfg.seed
    steps = fine_tuned_steps(backend, model)
    state = jax.device_put(jax.device_get(steps.init_state(model.variables)),
                           backend.replicated)
    batches = backend.input_pipeline(train, True)
    zeros = jax.device_put(jnp.zeros(3, jnp.float32), backend.replicated)

    def numbered():  # (batch, its epoch's key, its index in the epoch)
        for i, batch in enumerate(consecutive_batches(batches, batches.set_epoch)):
            yield batch, jax.random.PRNGKey(epoch_seed(seed, batches.epoch)), i % len(batches)

    def step(rate: float, item) -> float:
        nonlocal state
        (x, y), key, index = item
        state, sums = steps.train(state, zeros, x, y, np.float32(rate), key, np.int32(index))
        return float(sums[0]) / len(y)

    try:
        return range_test(rates, numbered(), step, stop)
    finally:
        model.variables = jax.device_get({PARAMS: state[PARAMS],
                                          BATCH_STATS: state[BATCH_STATS]})
