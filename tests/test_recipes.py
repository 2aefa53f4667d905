"""Recipes: the rate scaled to the global batch, the per-step schedule (warm-up, cosine, step
decay), label smoothing and gradient clipping, the same in every backend."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import compose_cfg, run_cli

from cnnzoo.app.validate import validate
from cnnzoo.conformance import compose, small_run
from cnnzoo.core.backend import usable_backends
from cnnzoo.core.errors import ConfigError
from cnnzoo.core.optim import Optimizer, Schedule
from cnnzoo.core.rundir import MetricsLog


# --------------------------------------------------------------------------- the schedule
def test_warmup_then_cosine_is_the_reference_sequence():
    s = Schedule(lr=0.4, scheduler="cosine", steps_per_epoch=2, max_epochs=3, warmup_steps=2)
    # warm-up 0.4 x 1/2, 0.4 x 2/2; then 0.4 x (1 + cos(pi k / 4)) / 2 for k = 0..3
    expected = [0.2, 0.4, 0.4, 0.4 * (1 + math.sqrt(0.5)) / 2, 0.2, 0.4 * (1 - math.sqrt(0.5)) / 2]
    assert s.rates() == pytest.approx(expected, abs=1e-15)
    assert [s.epoch_rate(e) for e in range(3)] == pytest.approx(expected[1::2], abs=1e-15)
    assert s.rates(3, 5) == s.rates()[3:5]  # a resumed run continues the same sequence


def test_step_decay_counts_epochs_from_the_start():
    s = Schedule(lr=1.0, scheduler="step", steps_per_epoch=3, max_epochs=4, warmup_steps=1,
                 decay_steps=6, gamma=0.5)
    assert s.rates() == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert Schedule(2.0, "none", 5, 2).rates() == [2.0] * 10


@pytest.mark.parametrize("name, scaling, expected", [
    ("sgd", "auto", 0.1 * 32 / 256), ("rmsprop", "auto", 0.1 * 32 / 256),
    ("adam", "auto", 0.1 * math.sqrt(32 / 256)), ("adamw", "linear", 0.1 * 32 / 256),
    ("sgd", "sqrt", 0.1 * math.sqrt(32 / 256)), ("sgd", "none", 0.1)])
def test_the_rate_follows_the_global_batch(name, scaling, expected):
    optim = Optimizer(name, 0.1, reference_batch=256, scaling=scaling)
    assert optim.scaled_lr(32) == pytest.approx(expected, rel=1e-12)
    assert Optimizer(name, 0.1, reference_batch=None, scaling=scaling).scaled_lr(32) == 0.1


def test_the_paper_recipe_is_stated_at_the_papers_batch():
    cfg = compose_cfg("arch=resnet50", "data.batch_size=64")
    optim = Optimizer.from_config(cfg.optim)
    assert (optim.lr, optim.reference_batch, optim.warmup_epochs) == (0.1, 256, 2.0)
    schedule = optim.schedule(64, 10, 15)
    assert optim.recipe_line(64, schedule) == (
        "lr 0.025 = 0.1 x 64/256 (linear scaling) at a global batch of 64, 2 warm-up epochs "
        "(20 steps), cosine to 0 over 15 epochs, gradient norm clipped at 2")
    v3 = Optimizer.from_config(compose_cfg("arch=inception_v3").optim)
    assert (v3.label_smoothing, v3.clip_grad_norm, v3.gamma, v3.step_epochs) == (0.1, 2.0, 0.94, 2)


def test_a_recipes_warmup_longer_than_a_short_run_is_cut_to_half_of_it():
    cfg = compose_cfg("arch=vgg", "trainer.max_epochs=1")
    validate(cfg)  # VGG's 2 warm-up epochs in a 1-epoch try: not a mistake of the user's
    optim = Optimizer.from_config(cfg.optim)
    schedule = optim.schedule(32, 45, 1)
    assert schedule.warmup_steps == 22 and schedule.rates()[21] == schedule.lr
    assert "the recipe's 2 warm-up epochs cut to 0.5, half the run (22 steps)" in \
        optim.recipe_line(32, schedule)
    assert optim.effective(32, schedule)["warmup_epochs"] == 0.5  # what results.json records


@pytest.mark.parametrize("override, message", [
    ("optim.warmup_epochs=10", "optim.warmup_epochs=10 is not shorter than the run "
     "(trainer.max_epochs=10): lower optim.warmup_epochs or raise trainer.max_epochs"),
    ("optim.scaling=cubic", "optim.scaling='cubic' is invalid: expected one of auto, linear, "
     "sqrt, none"),
    ("optim.reference_batch=0", "optim.reference_batch=0 is invalid: expected a positive "
     "integer or null")])
def test_a_bad_recipe_is_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(override))
    assert str(err.value) == message


@pytest.mark.slow
def test_a_warmup_as_long_as_the_run_is_refused_before_training(tmp_path):
    r = run_cli(tmp_path / "run", "trainer.max_epochs=2", "optim.warmup_epochs=2.5")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: optim.warmup_epochs=2.5 is not shorter than the run (trainer.max_epochs=2): "
        "lower optim.warmup_epochs or raise trainer.max_epochs"]
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- every backend
# plain SGD (its momentum buffer would hold lr x gradient in Keras and MXNet, see their
# train.py) and no weight decay (Keras clips with the L2 term), so that the weights after six
# steps depend only on the rates, the loss and the clipping, which must match step for step
RECIPE = ("optim.name=sgd", "optim.lr=0.2", "optim.weight_decay=0.0", "optim.reference_batch=32",
          "optim.warmup_epochs=1", "optim.scheduler=cosine", "optim.label_smoothing=0.4",
          "optim.clip_grad_norm=0.15")  # over the small run's optim=adam: no momentum
TOLERANCE = 1e-5  # of the weights after six steps: float32 kernels differ between frameworks


def _trained(backend_name, run_dir, start, *overrides):
    """The canonical weights after the small run from weights ``start``, and its rows."""
    backend, model, train, val = small_run(backend_name, run_dir, *overrides)
    backend.set_weights(model, start)
    backend.train(model, train, val)
    return backend.get_weights(model), MetricsLog(run_dir / "metrics.csv").rows()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """torch: the start weights, the recipe's result and rows, and two changed recipes'."""
    backend, model, _, _ = small_run("torch", tmp_path_factory.mktemp("init"))
    start = backend.get_weights(model)
    runs = {name: _trained("torch", tmp_path_factory.mktemp(name), start, *RECIPE, *extra)
            for name, extra in {"recipe": (), "no-warmup": ("optim.warmup_epochs=0",),
                                "no-clip": ("optim.clip_grad_norm=null",),
                                "no-smoothing": ("optim.label_smoothing=0.0",)}.items()}
    return start, runs


def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_each_ingredient_changes_the_reference_run(reference):
    """What the cross-backend test can tell apart: each ingredient moves the weights far more
    than its tolerance."""
    _, runs = reference
    weights, rows = runs["recipe"]
    schedule = Optimizer.from_config(compose("torch", *RECIPE).optim).schedule(16, 3, 2)
    assert schedule.lr == 0.1 and schedule.warmup_steps == 3  # 0.2 x 16/32, one epoch
    assert [r["lr"] for r in rows] == pytest.approx([schedule.epoch_rate(e) for e in (0, 1)])
    for other in ("no-warmup", "no-clip", "no-smoothing"):
        assert _max_diff(weights, runs[other][0]) > 10 * TOLERANCE, other


@pytest.mark.parametrize("backend_name", [b for b in usable_backends() if b != "torch"])
def test_every_backend_applies_the_same_recipe_step_for_step(reference, backend_name, tmp_path):
    start, runs = reference
    weights, rows = _trained(backend_name, tmp_path, start, *RECIPE)
    torch_weights, torch_rows = runs["recipe"]
    assert _max_diff(weights, torch_weights) < TOLERANCE
    for row, expected in zip(rows, torch_rows):
        assert row["lr"] == pytest.approx(expected["lr"], rel=1e-12)
        assert row["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-5)
        assert row["val_loss"] == pytest.approx(expected["val_loss"], abs=1e-5)
