"""The optimizers mean what torch's do: the same start, gradients and per-step rates give
torch.optim's weights, for every optimizer and setting the config offers (momentum, Nesterov,
coupled and decoupled weight decay, RMSprop's eps and momentum, torch's gradient clipping)."""
import pytest

# cnnzoo's own `pytest` collects these too; without JAX there is nothing to test
pytest.importorskip("jax", reason="the flax plugin's framework is not installed")
import jax
import jax.numpy as jnp
import numpy as np
import torch
from cnnzoo_flax.train import cross_entropy, update_direction

from cnnzoo.core.optim import Optimizer

RATES = [0.05, 0.2, 0.1, 0.02, 0.3, 0.07]  # a schedule that changes at every step


@pytest.mark.parametrize("settings", [
    dict(name="sgd"),
    dict(name="sgd", momentum=0.9, weight_decay=0.01),
    dict(name="sgd", momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(name="adam", eps=1e-8, weight_decay=0.01),
    dict(name="adamw", eps=1e-8, weight_decay=0.05),
    dict(name="rmsprop", alpha=0.9, eps=1.0, weight_decay=0.01),
    dict(name="rmsprop", alpha=0.9, eps=1e-3, momentum=0.9),
    dict(name="sgd", momentum=0.9, weight_decay=0.01, clip_grad_norm=0.5),
    dict(name="adamw", eps=1e-8, weight_decay=0.05, clip_grad_norm=0.5),
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_optax_chain_steps_like_torch_optim(settings):
    optim = Optimizer(lr=1.0, **settings)
    rng = np.random.default_rng(0)
    start = {"w": rng.standard_normal((4, 3)).astype(np.float32),
             "b": rng.standard_normal(3).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()}
             for _ in RATES]

    params = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
            "rmsprop": torch.optim.RMSprop}[optim.name]
    extra = {"sgd": dict(momentum=optim.momentum, nesterov=optim.nesterov),
             "adam": dict(eps=optim.eps), "adamw": dict(eps=optim.eps),
             "rmsprop": dict(alpha=optim.alpha, eps=optim.eps, momentum=optim.momentum)}
    opt = kind(params.values(), lr=1.0, weight_decay=optim.weight_decay, **extra[optim.name])
    for rate, g in zip(RATES, grads):
        for k, p in params.items():
            p.grad = torch.tensor(g[k])
        if optim.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params.values(), optim.clip_grad_norm)
        for group in opt.param_groups:
            group["lr"] = rate
        opt.step()

    tx = update_direction(optim)
    state, ours = tx.init(start), {k: jnp.asarray(v) for k, v in start.items()}
    for rate, g in zip(RATES, grads):
        direction, state = tx.update(g, state, ours)
        ours = jax.tree_util.tree_map(lambda p, d: p - np.float32(rate) * d, ours, direction)
    # optax's Adam computes its bias corrections 1 - beta^t in float32 (torch: in float64):
    # 1 - float32(0.999) is 1.3e-5 off, so its first steps differ by that much
    rtol = 1e-4 if optim.name in ("adam", "adamw") else 1e-5
    for k, p in params.items():
        np.testing.assert_allclose(np.asarray(ours[k]), p.detach().numpy(), rtol=rtol,
                                   atol=1e-6, err_msg=k)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.4])
def test_cross_entropy_is_torchs_with_label_smoothing(smoothing):
    rng = np.random.default_rng(1)
    logits = (3 * rng.standard_normal((8, 5))).astype(np.float32)
    labels = rng.integers(0, 5, 8).astype(np.int32)
    want = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels).long(),
                                             label_smoothing=smoothing, reduction="none")
    got = cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6, atol=1e-6)
