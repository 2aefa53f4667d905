"""task=lr_find, the learning-rate range test: its rules (rates, smoothing, early stop,
suggestion), the same losses in every backend, and ``run.py task=lr_find`` as a user runs it.
What each backend's ``lr_range_test`` must do is in the conformance suite
(cnnzoo/conformance.py)."""
from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
from conftest import compose_cfg, run_cli

from cnnzoo.app.lr_find import (
    MIN_POINTS,
    SKIP_BEGIN,
    EarlyStop,
    describe,
    lr_find,
    rates,
    smooth,
    steepest_descent,
)
from cnnzoo.conformance import compose, small_run
from cnnzoo.core.backend import backend_info, usable_backends
from cnnzoo.core.errors import RunFailed

BACKENDS = usable_backends()
FRAMEWORK_MODULES = {"torch", "tensorflow", "keras", "mxnet"}


# --------------------------------------------------------------------------- the rules
def test_rates_rise_by_a_constant_factor_from_min_to_max():
    lrs = rates(1e-7, 10.0, 100)
    assert len(lrs) == 100 and lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(10.0)
    factors = np.array(lrs[1:]) / np.array(lrs[:-1])
    assert np.allclose(factors, 1e8 ** (1 / 99), rtol=1e-9)


def test_smoothing_is_a_bias_corrected_moving_average():
    # beta 0.5: averages 1.0 then 2.5, divided by 1 - 0.5 and 1 - 0.25
    assert smooth([2.0, 4.0], beta=0.5) == pytest.approx([2.0, 2.5 / 0.75])
    assert smooth([3.0] * 50) == pytest.approx([3.0] * 50)  # no pull towards the zero start


def test_the_suggestion_is_the_steepest_descent_against_log_lr():
    lrs = rates(1e-6, 1.0, 61)  # 10 points per decade: lrs[30] is 1e-3
    curve = [2 - math.tanh(2 * (math.log10(lr) + 3)) for lr in lrs]  # falls fastest at 1e-3
    assert steepest_descent(lrs, curve) == 30
    steep_start = [v - (5 if i < 3 else 0) for i, v in enumerate(curve)]  # a cliff at step 3
    assert steepest_descent(lrs, steep_start) == 30  # the first SKIP_BEGIN points are left out
    with_nan = curve[:45] + [math.nan] + curve[46:]
    assert steepest_descent(lrs, with_nan) == 30  # non-finite points are left out
    assert steepest_descent(lrs[:MIN_POINTS - 1], curve[:MIN_POINTS - 1]) is None
    assert steepest_descent(lrs[:MIN_POINTS], curve[:MIN_POINTS]) == SKIP_BEGIN


def test_early_stop_at_the_threshold_or_a_non_finite_loss():
    stop = EarlyStop(4.0)
    losses = []
    for loss in [1.0] * 20 + [1000.0] * 5:
        losses.append(loss)
        if stop(losses):
            break
    # the first 1000 lifts the smoothed loss from 1 to ~59: more than 4 x its best
    assert len(losses) == 21 and stop.smoothed == pytest.approx(smooth(losses))
    assert stop.reason == f"the smoothed loss {stop.smoothed[-1]:.4g} exceeded 4 x its best 1 at " \
                          "step 21"
    never = EarlyStop(None)
    assert not never([1.0, 1000.0, 1e6]) and never.reason is None
    assert never([1.0, 1000.0, 1e6, math.nan]) and never.reason == "the loss became nan at step 4"


# --------------------------------------------------------------------------- across backends
PLAIN_SGD = ("optim=sgd", "optim.momentum=0.0", "optim.weight_decay=0.0", "optim.scheduler=none")


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs two backends whose frameworks are installed")
def test_the_same_weights_and_rates_give_the_same_losses_in_every_backend(tmp_path):
    """Plain SGD from the same weights over 8 steps of SMALL's 3-batch epochs: every backend
    takes the same batches (the data layer's ``epoch_order``, epoch after epoch) and the same
    steps. (SGD with momentum agrees only at a constant rate: Keras and MXNet keep
    rate x gradient in the momentum buffer, torch the gradient; see README.)"""
    lrs = rates(0.01, 0.5, 8)
    weights, losses = None, {}
    for name in BACKENDS:
        backend, model, train_split, _ = small_run(name, tmp_path / name, *PLAIN_SGD)
        if weights is None:
            weights = backend.get_weights(model)
        else:
            backend.set_weights(model, weights)
        losses[name] = backend.lr_range_test(model, train_split, lrs, lambda _: False)
    first = losses[BACKENDS[0]]
    assert len(set(np.round(first, 3))) > 3, first  # the rates change the loss step by step
    for name in BACKENDS[1:]:
        assert np.allclose(losses[name], first, rtol=1e-5, atol=0), losses


# --------------------------------------------------------------------------- run.py
@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_find_suggests_a_rate_writes_its_files_and_stops_when_the_loss_explodes(
        backend, tmp_path):
    r = run_cli(tmp_path / "run", "task=lr_find", f"backend={backend}", "lr_find.num_steps=60",
                "lr_find.max_lr=1000")
    assert r.returncode == 0, r.stderr[-3000:]
    only_its_own = FRAMEWORK_MODULES & set(backend_info(backend).modules)  # flax: none of them
    assert r.frameworks & FRAMEWORK_MODULES == only_its_own, r.frameworks
    out = json.loads((r.run_dir / "lr_find.json").read_text())
    with open(r.run_dir / "lr_find.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = [float(row["lr"]) for row in rows]
    assert [int(row["step"]) for row in rows] == list(range(1, len(rows) + 1))
    assert lrs[0] == pytest.approx(1e-7) and all(a < b for a, b in zip(lrs, lrs[1:]))
    assert np.isfinite([float(row["smoothed_loss"]) for row in rows[:-1]]).all()
    # the loss explodes long before 1000: stopped early, saying why
    assert out["stopped_early"] and MIN_POINTS <= out["steps_run"] == len(rows) < 60, out
    assert re.fullmatch(r"the smoothed loss [\d.]+ exceeded 4 x its best [\d.]+ at step \d+|"
                        r"the loss became (nan|inf) at step \d+", out["stop_reason"]), out
    assert f"stopped: {out['stop_reason']}" in r.stdout
    suggested = out["suggested_lr"]
    assert 1e-7 <= suggested <= 1000 and suggested == lrs[out["suggested_step"] - 1]
    assert (out["global_batch_size"], out["backend"], out["arch"]) == (32, backend, "lenet5")
    assert (f"suggested learning rate: {suggested:.3g} (steepest descent of the smoothed loss; "
            "at a global batch of 32)") in r.stdout.splitlines()
    assert (r.run_dir / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    assert r.results()["status"] == "ok" and r.results()["task"] == "lr_find"
    assert not (r.run_dir / "checkpoints").exists() and not (r.run_dir / "model.onnx").exists()


def test_a_stop_before_enough_steps_fails_without_a_suggestion(tmp_path):
    """Rates that explode from the first steps: the files are written, then RunFailed (exit 1)
    says why there is no suggestion."""
    cfg = compose(BACKENDS[0], "task=lr_find", "lr_find.min_lr=10", "lr_find.max_lr=1e5",
                  "lr_find.num_steps=20")
    with pytest.raises(RunFailed, match=r"^lr_find: no suggestion: \d+ steps ran before .* at "
                                        rf"least {MIN_POINTS} finite ones; raise "
                                        r"lr_find.num_steps or lower lr_find.max_lr$"):
        lr_find(cfg, tmp_path)
    out = json.loads((tmp_path / "lr_find.json").read_text())
    assert out["suggested_lr"] is None and out["stopped_early"] and out["steps_run"] < MIN_POINTS
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("override, line", [
    ("lr_find.min_lr=0", "lr_find.min_lr=0 is invalid: expected a positive number"),
    ("lr_find.max_lr=1e-8", "lr_find.max_lr=1e-08 is invalid: expected a number above "
                            "lr_find.min_lr"),
    ("lr_find.num_steps=10", "lr_find.num_steps=10 is invalid: expected an integer >= 20 "
                             "(fewer leave too few steps for a suggestion)"),
    ("lr_find.early_stop_threshold=1", "lr_find.early_stop_threshold=1 is invalid: expected a "
                                       "number above 1 or null"),
    ("hardware=ddp_cpu", "hardware.devices=2: task=lr_find runs on one device: use "
                         "hardware.devices=1"),
], ids=["min_lr", "max_lr", "num_steps", "early_stop_threshold", "devices"])
def test_bad_lr_find_settings_are_refused_in_one_line(override, line, tmp_path):
    r = run_cli(tmp_path / "run", "task=lr_find", override)
    assert r.returncode == 2 and r.error_lines == [f"error: {line}"], r.stderr[-2000:]
    assert not r.frameworks & FRAMEWORK_MODULES
    assert {p.name for p in (tmp_path / "run").glob("**/*")} <= {"run.log"}  # Hydra's log only


def test_the_suggestion_is_also_given_as_the_recipes_optim_lr():
    """optim=paper states optim.lr at the paper's batch and scales it: the suggestion at this
    run's batch of 32 is ResNet-50's optim.lr (at 256, linear) divided by 8."""
    result = describe(compose_cfg("arch=resnet50"), "resnet50", [0.01, 0.02], 1, None, 1.0)
    assert result["suggested_lr"] == 0.02
    assert result["suggested_optim_lr"] == pytest.approx(0.16, rel=1e-12)
