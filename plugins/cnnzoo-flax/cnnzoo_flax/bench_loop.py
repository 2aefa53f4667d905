"""The hand-written baseline of cnnzoo's ``python -m bench`` for this backend (entry point
group ``cnnzoo.bench_loops``): what a JAX user writes by hand on the model the backend builds.

One ``jax.jit`` step over (params, batch statistics, optax state), buffers donated, with
``optax.sgd`` (momentum) after ``optax.add_decayed_weights`` (torch's L2 weight decay), the
cross-entropy of ``optax``, all batches preloaded on the backend's first device in NHWC, in
the backend's compute precision (``training_module``: bfloat16 under ``bf16-mixed``). Nothing
else runs per step: no metrics, no schedule, no progress."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .model import BATCH_STATS, PARAMS

# bench/training.py's constant-rate SGD (conf/optim/sgd.yaml)
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
DESCRIPTIONS = {"nhwc": "hand-written: jax.jit step, optax.sgd, batches preloaded on the device"}


def loop(backend_and_model, x: np.ndarray, y: np.ndarray, args: dict):
    """Yields ``("nhwc", seconds of each repetition)``: ``args["steps"]`` batches per
    repetition after ``args["warmup_steps"]`` untimed ones (the first compiles the step)."""
    backend, model = backend_and_model()
    module, device, bs = backend.training_module(model), backend.devices[0], args["batch"]
    tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))
    xs = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    batches = [jax.device_put((xs[i:i + bs], y[i:i + bs]), device)
               for i in range(0, len(y), bs)]
    params = model.variables[PARAMS]
    state = jax.device_put({PARAMS: params, BATCH_STATS: model.variables[BATCH_STATS],
                            "opt": tx.init(params)}, device)
    dropout = jax.device_put(jax.random.PRNGKey(0), device)

    def loss_fn(p, stats, xb, yb):
        outs, updates = module.apply({PARAMS: p, BATCH_STATS: stats}, xb, train=True,
                                     mutable=[BATCH_STATS], rngs={"dropout": dropout})
        logits = outs[0] if isinstance(outs, tuple) else outs
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), yb)
        return loss.mean(), updates.get(BATCH_STATS, stats)

    def train_step(state, xb, yb):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state[PARAMS], state[BATCH_STATS], xb, yb)
        updates, opt = tx.update(grads, state["opt"], state[PARAMS])
        return {PARAMS: optax.apply_updates(state[PARAMS], updates), BATCH_STATS: stats,
                "opt": opt}, loss

    step = jax.jit(train_step, donate_argnums=(0,))

    def run(n: int):
        nonlocal state
        loss = None
        for i in range(n):
            state, loss = step(state, *batches[i % len(batches)])
        loss.block_until_ready()

    run(args["warmup_steps"])
    seconds = []
    for _ in range(args["reps"]):
        t0 = time.perf_counter()
        run(args["steps"])
        seconds.append(time.perf_counter() - t0)
    yield "nhwc", seconds
