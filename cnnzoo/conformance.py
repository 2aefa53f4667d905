"""The backend conformance suite: what every backend must do, as pytest tests.

A backend package runs it against itself from its own tests:

    # tests/test_conformance.py of the plugin
    import pytest
    from cnnzoo.conformance import *  # noqa: F401,F403  (the suite's tests)

    @pytest.fixture(params=["flax"])
    def backend_name(request):
        return request.param

cnnzoo's own tests/test_conformance.py runs it for every installed backend whose framework is
installed. Each test trains LeNet-5 for at most two epochs on a few synthetic images, so the
whole suite takes seconds per backend. What it checks is the contract of
``cnnzoo.core.backend``: the declaration and its config file, parameter counts, canonical
weights, inference, the training protocol's files, seeded determinism, exact resume, the
divergence stop, safe checkpoint loading, the learning-rate range test (task=lr_find) and an
ONNX export that onnxruntime reproduces. (That every backend applies a recipe's schedule, label
smoothing and clipping step for step as the torch backend does is checked by cnnzoo's
tests/test_recipes.py.)
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest

import architectures
from architectures.spec import INPUT, GlobalAvgPool, GraphBuilder, Scale
from cnnzoo.core.backend import Backend, backend_info
from cnnzoo.core.checkpoints import CheckpointDir, weights_sha256
from cnnzoo.core.errors import CheckpointError, ConfigError, TrainingDiverged, WeightsError
from cnnzoo.core.rundir import METRIC_COLUMNS, MetricsLog
from cnnzoo.core.training import TrainingProtocol
from cnnzoo.core.weights import expected_shapes

EPOCHS, STEPS = 2, 3  # 64 synthetic images: 48 to train in 3 batches of 16, 16 to validate
SMALL = ("arch=lenet5", "data=synthetic", "data.num_samples=64", "data.image_size=32",
         "data.channels=1", "data.num_classes=4", "data.batch_size=16", "data.val_fraction=0.25",
         f"trainer.max_epochs={EPOCHS}", "trainer.progress_bar=false", "hardware=cpu",
         "optim=adam", "optim.lr=0.001")


def compose(backend_name: str, *overrides: str):
    """The composed and validated config of a small run of ``backend_name``."""
    from cnnzoo.app.experiment import compose as compose_config

    return compose_config(f"backend={backend_name}", *SMALL, *overrides)


def small_run(backend_name: str, run_dir: Path, *overrides: str):
    """(backend, model, train split, val split) of a small run."""
    from cnnzoo.app.experiment import build_model, prepare

    cfg = compose(backend_name, *overrides)
    exp = prepare(cfg)
    backend, model, _ = build_model(cfg, run_dir, exp)
    return backend, model, exp.train_split, exp.val_split


def train(backend_name: str, run_dir: Path, *overrides: str, resume=None):
    """Train a small run; (backend, model, TrainReport)."""
    backend, model, train_split, val_split = small_run(backend_name, run_dir, *overrides)
    return backend, model, backend.train(model, train_split, val_split, resume)


def toy_spec(num_classes=5, in_channels=3):
    """Inception branches, a residual addition, grouped and depthwise-separable convolutions."""
    g = GraphBuilder("toy", in_channels, num_classes, 32)
    x = g.act(g.bn(g.conv(INPUT, 16, 3, stride=2, padding=1, bias=False, name="stem.conv"),
                   eps=1e-3, name="stem.bn"), name="stem.relu")
    b1 = g.conv(x, 8, 1, name="mixed.b1")
    b2 = g.conv(g.conv(x, 8, 1, name="mixed.b2a"), 12, (1, 3), padding=(0, 1), name="mixed.b2b")
    b3 = g.conv(g.max_pool(x, 3, 1, 1, name="mixed.b3pool"), 4, 1, name="mixed.b3")
    x = g.concat(b1, b2, b3, name="mixed")                       # 8 + 12 + 4 = 24 channels
    r = g.conv(x, 24, 3, padding=1, groups=4, bias=False, name="res.grouped")
    r = g.add(Scale(0.17), r, name="res.scale")                  # Inception-ResNet style
    x = g.act(g.sum(x, r, name="res.add"), name="res.relu")
    x = g.conv(x, 24, 3, padding=1, groups=24, bias=False, name="sep.depthwise")
    x = g.conv(x, 32, 1, bias=False, name="sep.pointwise")
    x = g.avg_pool(x, 3, 2, 1, count_include_pad=False, name="pool")
    x = g.flatten(g.add(GlobalAvgPool(), x, name="gap"), name="flat")
    x = g.dropout(x, 0.2, name="drop")
    g.dense(x, num_classes, name="fc")
    return g.build()


def small_spec():
    """The spec of the small run (LeNet-5 for SMALL's 4 classes of 1-channel 32x32 images)."""
    return architectures.build_spec("lenet5", 4, 1)


@pytest.fixture
def trained(backend_name, tmp_path):
    """(backend, model, TrainReport, validation split) of a small run."""
    backend, model, train_split, val = small_run(backend_name, tmp_path / "run")
    return backend, model, backend.train(model, train_split, val), val


# --------------------------------------------------------------------------- the declaration
def test_declaration_loads_a_backend_of_that_name(backend_name):
    info = backend_info(backend_name)
    assert info.name == backend_name and not info.missing_modules()
    cls = info.load()
    assert issubclass(cls, Backend) and cls.name == backend_name
    assert cls.onnx_layout in ("NCHW", "NHWC")


def test_config_file_is_found_and_its_options_pass_their_declared_rules(backend_name):
    cfg = compose(backend_name)
    assert cfg.backend.name == backend_name
    info = backend_info(backend_name)
    for key, rule in info.options.items():
        assert key in cfg.backend, f"backend.{key} is declared but not in its config file"
        assert rule.accepts(cfg.backend[key]), f"backend.{key}={cfg.backend[key]!r}"


# --------------------------------------------------------------------------- models and weights
@pytest.mark.parametrize("arch, size", [("lenet5", 32), ("xception", 71)])
def test_native_params_equal_the_spec(backend_name, tmp_path, arch, size):
    cfg = compose(backend_name)
    backend = backend_info(backend_name).load()(cfg, tmp_path)
    spec = architectures.build_spec(arch, num_classes=10)
    assert backend.count_params(backend.build(spec, size)) == spec.analyze(size).params


def _init_spec(init: str):
    """Layers big enough for their weights' statistics: a 64 -> 128 3x3 convolution (fan-in
    576, fan-out 1152) and a 512 -> 256 dense layer."""
    g = GraphBuilder("init", 64, 256, 8)
    x = g.act(g.conv(INPUT, 128, 3, padding=1, name="conv"), name="relu")
    x = g.flatten(g.add(GlobalAvgPool(), x, name="gap"), name="flat")
    g.dense(g.dense(x, 512, name="hidden"), 256, name="fc")
    return g.build(init=init)


@pytest.mark.parametrize("init", ["default", "kaiming_fan_out"])
def test_initial_weights_follow_the_specs_init(backend_name, tmp_path, init):
    """``Spec.init``: "default" is PyTorch's U(+-1/sqrt(fan_in)) for weights (biases: the
    backend's choice within that bound); "kaiming_fan_out" is N(0, 2/fan_out) for conv weights,
    N(0, 0.01^2) for dense ones and zero biases. Checked on ~74k and ~131k draws, within 5%."""
    backend = backend_info(backend_name).load()(compose(backend_name), tmp_path)
    w = backend.get_weights(backend.build(_init_spec(init), 8))
    conv, fc = w["conv/weight"], w["fc/weight"]
    if init == "default":
        for weights, fan_in in ((conv, 64 * 9), (fc, 512)):
            bound = 1 / np.sqrt(fan_in)
            assert np.abs(weights).max() <= bound
            assert weights.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)
        assert np.abs(w["conv/bias"]).max() <= 1 / np.sqrt(64 * 9)
    else:
        assert conv.std() == pytest.approx(np.sqrt(2 / (128 * 9)), rel=0.05)
        assert fc.std() == pytest.approx(0.01, rel=0.05)
        assert not any(w[k].any() for k in ("conv/bias", "hidden/bias", "fc/bias"))
    assert abs(conv.mean()) < 0.1 * conv.std()


def test_canonical_weights_round_trip_exactly(backend_name, tmp_path):
    backend, model, _, _ = small_run(backend_name, tmp_path)
    weights = backend.get_weights(model)
    assert {k: v.shape for k, v in weights.items()} == expected_shapes(small_spec(), 32)
    rng = np.random.default_rng(0)
    new = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in weights.items()}
    backend.set_weights(model, new)
    got = backend.get_weights(model)
    assert all(np.array_equal(got[k], new[k]) and got[k].dtype == np.float32 for k in new)
    broken = dict(new)
    broken.pop(sorted(broken)[0])
    with pytest.raises(WeightsError, match="missing 1 key"):
        backend.set_weights(model, broken)
    assert all(np.array_equal(backend.get_weights(model)[k], new[k]) for k in new)


def test_any_node_name_builds(backend_name, tmp_path):
    """Spec node names are free text: names that are attributes of the framework's own module
    classes (``half``, ``train``, ``forward``, ``call``, ``weights``...) build, predict and
    round-trip their weights like any other."""
    g = GraphBuilder("names", 3, 4, 8)
    x = g.act(g.conv(INPUT, 4, 3, name="half"), name="train")
    for name in ("forward", "training", "hybridize", "call", "weights", "name"):
        x = g.conv(x, 4, 1, name=name)
    g.dense(g.flatten(x, name="params"), 4, name="layers")
    spec = g.build()
    backend = backend_info(backend_name).load()(compose(backend_name), tmp_path)
    model = backend.build(spec, 8)
    assert backend.count_params(model) == spec.analyze(8).params
    weights = {k: np.full(v.shape, 0.01, np.float32) for k, v in backend.get_weights(model).items()}
    assert set(weights) == set(expected_shapes(spec, 8))
    backend.set_weights(model, weights)
    out = backend.predict(model, np.ones((2, 3, 8, 8), np.float32))
    assert out.shape == (2, 4) and np.isfinite(out).all()


def test_predict_is_deterministic_float32_logits(backend_name, tmp_path):
    """Every layer type of the spec (``toy_spec``), in inference mode: dropout off, batch norm
    with its running statistics, so two calls agree bitwise; ``evaluate`` scores from it."""
    backend, _, _, val = small_run(backend_name, tmp_path, "arch.in_channels=3")
    model = backend.build(toy_spec(), 32)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    a, b = backend.predict(model, x), backend.predict(model, x)
    assert a.shape == (4, 5) and a.dtype == np.float32 and np.array_equal(a, b)
    scores = backend.evaluate(model, val)
    assert scores["loss"] > 0 and 0 <= scores["acc"] <= 1


# --------------------------------------------------------------------------- training
def test_training_writes_the_protocols_files(trained, tmp_path):
    backend, model, report, val = trained
    run = tmp_path / "run"
    rows = MetricsLog(run / "metrics.csv").rows()
    assert [r["epoch"] for r in rows] == [1, 2] == [r["epoch"] for r in report.history]
    assert set(METRIC_COLUMNS) <= set(rows[0])
    assert all(np.isfinite(r[c]) for r in rows for c in METRIC_COLUMNS)
    assert any((run / "tensorboard").iterdir())
    latest = CheckpointDir(run).latest()
    assert latest.epoch == EPOCHS and latest.state["backend"] == backend.name
    assert report.checkpoint is not None and Path(report.checkpoint).exists()
    assert report.images_per_s > 0 and report.train_time_s > 0
    scores = backend.evaluate(model, val)
    assert {"loss", "acc", "per_class_acc", "confusion_matrix"} <= set(scores)


def test_seeded_training_is_reproducible(backend_name, tmp_path):
    hashes = {weights_sha256(b.get_weights(m)) for b, m, _ in
              (train(backend_name, tmp_path / f"run{i}") for i in range(2))}
    assert len(hashes) == 1


class _Killed(Exception):
    """Stands for a process killed right after an epoch's checkpoint was written."""


# a schedule that changes the rate at every step, over the small run's Adam
SCHEDULED = ("optim.name=sgd", "+optim.momentum=0.9", "optim.reference_batch=32",
             "optim.warmup_epochs=1", "optim.scheduler=cosine", "optim.label_smoothing=0.1",
             "optim.clip_grad_norm=1.0")


@pytest.mark.parametrize("recipe", [(), SCHEDULED], ids=["adam", "sgd-warmup-cosine"])
def test_resume_continues_to_the_uninterrupted_weights(backend_name, tmp_path, monkeypatch,
                                                       recipe):
    backend, model, _ = train(backend_name, tmp_path / "straight", *recipe)
    straight = weights_sha256(backend.get_weights(model))
    end_epoch = TrainingProtocol.end_epoch

    def killed_after_epoch_1(self, epoch, *args, **kwargs):
        row = end_epoch(self, epoch, *args, **kwargs)
        if epoch == 0:
            raise _Killed
        return row

    run = tmp_path / "resumed"
    with monkeypatch.context() as m:
        m.setattr(TrainingProtocol, "end_epoch", killed_after_epoch_1)
        with pytest.raises(_Killed):
            train(backend_name, run, *recipe)
    first = CheckpointDir(run).latest()
    assert first.epoch == 1 and first.state["backend"] == backend_name
    backend, model, report = train(backend_name, run, *recipe, resume=first)
    assert [r["epoch"] for r in report.history] == [2]
    assert weights_sha256(backend.get_weights(model)) == straight


def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(backend_name, tmp_path):
    backend, model, train_split, val_split = small_run(backend_name, tmp_path)
    take = train_split.take

    def nan_in_epoch_2(indices, epoch=0):
        x, y = take(indices, epoch)
        return (np.full_like(x, np.nan) if epoch == 1 else x), y

    train_split.take = nan_in_epoch_2
    with pytest.raises(TrainingDiverged) as err:
        backend.train(model, train_split, val_split)
    found = re.fullmatch(r"training diverged: train_loss is (nan|inf) at step (\d+) \(epoch 2, "
                         rf"batch (\d+) of {STEPS}\); lower optim.lr", str(err.value))
    assert found and int(found.group(2)) == STEPS + int(found.group(3)), str(err.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0001"]
    assert [r["epoch"] for r in MetricsLog(tmp_path / "metrics.csv").rows()] == [1]


def test_an_epoch_end_hook_sees_each_row_and_can_stop_training(backend_name, tmp_path):
    """``Backend.epoch_end_hooks`` (a sweep's pruning): called after each epoch's checkpoint with
    its row; a returned reason ends training after that epoch."""
    backend, model, train_split, val_split = small_run(backend_name, tmp_path)
    seen = []

    def stop_after_epoch_1(row):
        seen.append(row)
        return "enough" if row["epoch"] == 1 else None

    backend.epoch_end_hooks.append(stop_after_epoch_1)
    report = backend.train(model, train_split, val_split)
    assert [r["epoch"] for r in seen] == [1] and np.isfinite(seen[0]["val_acc"])
    assert report.stopped == "enough" and [r["epoch"] for r in report.history] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0001"]


# --------------------------------------------------------------------------- lr range test
def test_lr_range_test_gives_one_finite_loss_per_rate(backend_name, tmp_path):
    """Tiny rates, more of them than an epoch has batches (3): one host float per step, and
    ``stop`` asked after every step with the losses so far."""
    backend, model, train_split, _ = small_run(backend_name, tmp_path)
    rates = [1e-7, 2e-7, 5e-7, 1e-6, 2e-6]
    seen = []

    def never(so_far):
        seen.append(list(so_far))
        return False

    losses = backend.lr_range_test(model, train_split, rates, never)
    assert len(losses) == len(rates) and all(type(v) is float for v in losses)
    assert np.isfinite(losses).all() and 0 < min(losses), losses
    assert seen == [losses[:i] for i in range(1, len(rates) + 1)]


def test_lr_range_test_blows_up_at_huge_rates_and_stop_ends_it(backend_name, tmp_path):
    """Adam at rates from 1 up: the loss explodes within a few steps (from lower rates it first
    fits SMALL's 48 images perfectly, and a zero loss has nothing left to explode)."""
    from cnnzoo.app.lr_find import EarlyStop  # the rule task=lr_find stops with

    backend, model, train_split, _ = small_run(backend_name, tmp_path)
    rates = list(np.geomspace(1.0, 1e4, 20))
    stop = EarlyStop(4.0)
    losses = backend.lr_range_test(model, train_split, rates, stop)
    assert stop.reason is not None and len(losses) < len(rates), (stop.reason, losses)
    assert not np.isfinite(losses[-1]) or max(losses) > 4 * losses[0], losses


def test_lr_range_test_at_a_small_constant_rate_trains(backend_name, tmp_path):
    """SMALL's optimizer (Adam) at a constant rate for 8 epochs of 3 batches: the loss falls."""
    backend, model, train_split, _ = small_run(backend_name, tmp_path)
    losses = backend.lr_range_test(model, train_split, [3e-3] * 24, lambda _: False)
    assert len(losses) == 24 and np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6]), losses


# --------------------------------------------------------------------------- checkpoint files
def test_checkpoint_loads_into_a_fresh_model(trained):
    backend, model, report, val = trained
    fresh = backend.build(small_spec(), 32)
    backend.load_checkpoint(fresh, report.checkpoint)
    x, _ = val.batch(0, 8)
    assert np.array_equal(backend.predict(fresh, x), backend.predict(model, x))


class _Payload:
    """Unpickling this runs ``Path.touch`` on a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("damage", ["pickle", "garbage", "truncated"])
def test_a_bad_checkpoint_file_is_refused_without_running_it(trained, tmp_path, damage):
    backend, model, report, _ = trained
    path, marker = Path(report.checkpoint), tmp_path / "payload-ran"
    data = path.read_bytes() if path.is_file() else b""
    path.unlink() if path.is_file() else None
    if damage == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all\n" * 8)
    else:
        path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        backend.load_checkpoint(model, path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


# --------------------------------------------------------------------------- export
def test_onnx_export_is_verified_by_onnxruntime(trained, tmp_path):
    from omegaconf import OmegaConf

    from export import export_and_verify

    backend, model, _, val = trained
    images, _ = val.batch(0, 8)
    export_cfg = OmegaConf.create({"opset": 18, "verify": True, "batch_sizes": [1, 8],
                                   "atol": 1e-4, "rtol": 1e-3, "min_top1_agreement": 1.0})
    block, report = export_and_verify(backend, model, images, export_cfg, tmp_path / "m.onnx",
                                      {"arch": "lenet5", "backend": backend.name}, None)
    assert all(r.passed for r in report), block
    assert (tmp_path / "m.onnx").exists()


def test_caffe_export_of_its_weights_runs_in_opencv(trained, tmp_path):
    """Caffe's files are written from ``get_weights`` (the canonical layout) and must compute
    what ``predict`` computes."""
    from omegaconf import OmegaConf

    from export import export_caffe

    pytest.importorskip("cv2", reason="OpenCV runs Caffe files: the deploy extra")
    backend, model, _, val = trained
    images, _ = val.batch(0, 8)
    export_cfg = OmegaConf.create({"verify": True, "batch_sizes": [1, 8], "atol": 1e-4,
                                   "rtol": 1e-3, "min_top1_agreement": 1.0})
    block, reports = export_caffe(small_spec(), images.shape[-1], backend.get_weights(model),
                                  images, lambda x: backend.predict(model, x), export_cfg,
                                  tmp_path, {"arch": "lenet5", "backend": backend.name})
    assert block["passed"] is True, [line for r in reports for line in r.lines()]


# --------------------------------------------------------------------------- fine-tuning
def _toy_training(backend_name, tmp_path, *overrides, weights=None):
    """The toy network (batch norm included) trained one epoch with ``overrides``, from
    ``weights`` (its seeded init, batch-norm statistics randomised, when None): (before,
    after) canonical weights."""
    backend, _, train_split, val = small_run(backend_name, tmp_path / "run",
                                             "trainer.max_epochs=1", *overrides)
    model = backend.build(toy_spec(4, 1), 32)
    if weights is None:
        from cnnzoo.app.crosscheck import randomize_batch_norm
        weights = randomize_batch_norm(backend.get_weights(model), 0)
    backend.set_weights(model, weights)
    backend.train(model, train_split, val)
    return weights, backend.get_weights(model)


def test_frozen_nodes_keep_their_weights_and_batch_statistics(backend_name, tmp_path):
    before, after = _toy_training(backend_name, tmp_path, "finetune.freeze=[stem,mixed.b2a]")
    for key, value in before.items():
        if key.startswith(("stem.", "mixed.b2a/")):  # its batch norm's statistics too
            assert np.array_equal(after[key], value), f"{key} changed though frozen"
        elif not key.endswith(("running_mean", "running_var")):
            assert not np.array_equal(after[key], value), f"{key} did not train"


def test_freeze_backbone_trains_the_classifier_alone(backend_name, tmp_path):
    before, after = _toy_training(backend_name, tmp_path, "finetune.freeze_backbone=true")
    changed = sorted(k for k in before if not np.array_equal(after[k], before[k]))
    assert changed == ["fc/bias", "fc/weight"]


def test_the_backbone_learns_at_its_multiple_of_the_rate(backend_name, tmp_path):
    """One plain SGD step: the backbone's change scales with finetune.backbone_lr, the
    classifier's does not (a backend that declares it cannot is refused in one line)."""
    sgd = ("optim=sgd", "optim.lr=1.0", "optim.momentum=0", "optim.weight_decay=0",
           "data.batch_size=48")  # the 48 training images in one step
    try:
        compose(backend_name, "finetune.backbone_lr=0.25")
    except ConfigError as err:  # the backend's declared limit
        pytest.skip(str(err))
    start, full = _toy_training(backend_name, tmp_path / "a", *sgd)
    _, quarter = _toy_training(backend_name, tmp_path / "b", *sgd, "finetune.backbone_lr=0.25",
                               weights=start)
    for key in start:
        if key.endswith(("running_mean", "running_var")):
            continue
        step_full, step_quarter = full[key] - start[key], quarter[key] - start[key]
        factor = 1.0 if key.startswith("fc/") else 0.25
        # float32 rounding of weight + step: a few units in the last place of the weights
        ulp = float(np.finfo(np.float32).eps) * float(np.abs(start[key]).max())
        np.testing.assert_allclose(step_quarter, factor * step_full, rtol=1e-3, atol=4 * ulp,
                                   err_msg=key)
