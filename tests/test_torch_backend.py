"""The PyTorch backend builds exactly the spec, predicts, saves and loads weights; its training
state goes to ``checkpoints/epoch-NNNN/model.ckpt``, resumes exactly, and loading never runs code
from a file."""
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg, toy_spec

import architectures
from cnnzoo.core.backend import available_backends, load_backend
from cnnzoo.core.checkpoints import CheckpointDir, weights_sha256
from cnnzoo.core.errors import CheckpointError, ConfigError
from runners.torch.backend import TorchBackend
from runners.torch.state import CHECKPOINT


@pytest.fixture
def backend(tmp_path):
    return TorchBackend(compose_cfg("hardware=cpu"), tmp_path)


@pytest.mark.parametrize("name, num_classes, in_channels", [
    ("lenet5", None, None), ("vgg16", None, None), ("vgg16", 10, 1)])
def test_native_params_equal_spec(backend, name, num_classes, in_channels):
    spec = architectures.build_spec(name, num_classes, in_channels)
    model = backend.build(spec, spec.input_size)
    assert backend.count_params(model) == spec.analyze().params


def test_every_layer_output_shape_matches_shape_inference(backend):
    spec = toy_spec()
    model = backend.build(spec, 32)
    assert backend.count_params(model) == spec.analyze(32).params
    shapes = {}
    for key, module in model.layers.items():
        module.register_forward_hook(lambda m, i, o, key=key: shapes.__setitem__(key, o.shape))
    backend.predict(model, np.zeros((2, 3, 32, 32), np.float32))
    for row in spec.analyze(32).layers:
        assert tuple(shapes[model.key(row.node.name)][1:]) == row.out_shape, row.node.name


def test_layer_hyperparameters_are_carried_over(backend):
    model = backend.build(toy_spec(), 32)
    bn = model.layers[model.key("stem.bn")]
    assert bn.eps == 1e-3 and bn.momentum == 0.1
    assert model.layers[model.key("res.grouped")].groups == 4
    assert model.layers[model.key("pool")].count_include_pad is False


def test_checkpoint_round_trip(backend, tmp_path):
    spec = toy_spec()
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    model = backend.build(spec, 32)
    path = tmp_path / "weights.pt"
    backend.save_checkpoint(model, path)
    other = backend.build(spec, 32)  # seeded: starts equal to model, so change it
    torch.nn.init.zeros_(other.layers[other.key("fc")].weight)
    assert not np.allclose(backend.predict(model, x), backend.predict(other, x))
    backend.load_checkpoint(other, path)
    np.testing.assert_array_equal(backend.predict(model, x), backend.predict(other, x))


def test_third_party_backend_registers_by_installing_a_package(tmp_path, monkeypatch):
    """A distribution on sys.path with a cnnzoo.backends entry point (its BackendInfo) is
    found and its Backend class loaded."""
    (tmp_path / "mybackend.py").write_text(
        "from cnnzoo.core.backend import BackendInfo\n"
        "from runners.torch.backend import TorchBackend\n"
        "class MyBackend(TorchBackend):\n    name = 'mine'\n"
        "INFO = BackendInfo(name='mine', implementation='mybackend:MyBackend',\n"
        "                   install='pip install mybackend', modules=('torch',))\n")
    dist = tmp_path / "mybackend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mybackend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[cnnzoo.backends]\nmine = mybackend:INFO\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "mine" in available_backends()
    assert load_backend("mine").name == "mine"


def test_auxiliary_classifiers_join_the_training_loss():
    from runners.torch.train import Classifier

    spec = architectures.build_spec("inception_v1", num_classes=4, aux_logits=True)
    cfg = compose_cfg("arch=inception_v1")
    net = TorchBackend(cfg, ".").build(spec, 32)
    clf = Classifier(net, channels_last=False)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    net.train()
    torch.manual_seed(0)  # same dropout masks in both forward passes
    main, aux1, aux2 = net(x)
    ce = torch.nn.functional.cross_entropy
    expected = ce(main, y) + 0.3 * (ce(aux1, y) + ce(aux2, y))
    torch.manual_seed(0)
    loss, _ = clf(x, y)
    assert torch.allclose(loss, expected) and loss > ce(main, y)


@pytest.mark.parametrize("overrides, cls, expected", [
    (("optim=rmsprop",), torch.optim.RMSprop, {"alpha": 0.9, "eps": 1.0}),  # Inception defaults
    (("optim=adam",), torch.optim.Adam, {"eps": 1e-8}),
    (("optim=adamw", "optim.weight_decay=0.05"), torch.optim.AdamW, {"weight_decay": 0.05}),
    (("optim=sgd", "optim.momentum=0.9", "optim.nesterov=true"), torch.optim.SGD,
     {"momentum": 0.9, "nesterov": True})])
def test_optimizers_map_onto_torch_optim(overrides, cls, expected):
    """Each ``optim.name`` is its torch.optim class with the defaults cnnzoo.core.optim states;
    an unknown name is a ConfigError (it used to train with AdamW silently)."""
    from cnnzoo.core.optim import Optimizer
    from runners.torch.train import torch_optimizer

    cfg = compose_cfg(*overrides)
    opt = torch_optimizer(Optimizer.from_config(cfg.optim), [torch.nn.Parameter(torch.zeros(1))])
    assert type(opt) is cls
    assert {k: opt.defaults[k] for k in expected} == expected
    with pytest.raises(ConfigError, match="optim.name='lion'"):
        Optimizer.from_config(compose_cfg("optim.name=lion").optim)

@pytest.mark.parametrize("augment, workers", [(False, 0), (True, 0), (True, 2)],
                         ids=["plain", "augmented", "augmented-2-workers"])
def test_input_pipeline_yields_the_data_layers_batches(tmp_path, augment, workers):
    """Every batch of an epoch equals ``split.take`` of the next ``batch_size`` positions of
    ``epoch_order``, with that epoch's augmentation (also from worker processes, which never
    see set_epoch), the last batch short; without shuffling, the split's own order."""
    from cnnzoo.core.data import Augment, Preprocess, epoch_order, load_digits

    bs, seed = 24, 3
    backend = TorchBackend(compose_cfg("hardware=cpu", f"data.batch_size={bs}", f"seed={seed}",
                                       f"backend.num_workers={workers}"), tmp_path)
    pre = Preprocess(32, 1, (0.5,), (0.5,), augment=Augment(4 * augment, augment))
    train, val = load_digits().split(pre, 0.9, seed=seed)  # 180 images: 8 batches, 12 in the last
    assert train.augments == augment and len(train) % bs
    loader = backend.input_pipeline(train, shuffle=True)
    assert len(loader) == -(-len(train) // bs)
    for epoch in (0, 1, 2):
        loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch start
        order = epoch_order(len(train), seed, epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        for k, (x, y) in enumerate(batches):
            want_x, want_y = train.take(order[k * bs:(k + 1) * bs], epoch)
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.numpy().tobytes() == want_x.tobytes(), (epoch, k)
            np.testing.assert_array_equal(y.numpy(), want_y)
    if augment:  # the epochs' images differ: the augmentation follows the epoch
        assert not np.array_equal(train.take(order[:bs], 1)[0], train.take(order[:bs], 2)[0])
    plain = backend.input_pipeline(val, shuffle=False)
    for k, (x, y) in enumerate(plain):
        want_x, want_y = val.batch(k * bs, (k + 1) * bs)
        assert x.numpy().tobytes() == want_x.tobytes()
        np.testing.assert_array_equal(y.numpy(), want_y)


@pytest.mark.parametrize("preset, batch, workers, on_cuda", [
    ("hardware=cpu", 256, "auto", False),      # the steps use every core: no workers
    ("hardware=gpu", 8, "auto", True),         # 8 x 16 KB batches: cheaper than a hand-off
    ("hardware=gpu", 256, "auto", True),       # 4 MiB batches: workers, pinned
    ("hardware=gpu", 8, 2, True),              # an explicit count is kept
    ("hardware=cpu", 256, 1, False),
])
def test_loader_workers_and_pinning_follow_the_device_and_batch_size(tmp_path, preset, batch,
                                                                     workers, on_cuda):
    """``backend.num_workers: auto`` gives DataLoader workers only where batches go to a CUDA
    GPU and are large enough (``AUTO_WORKERS_MIN_BATCH_BYTES``): one per core this process may
    use, less its own, at most ``MAX_AUTO_WORKERS``; batches for a GPU are pinned."""
    from cnnzoo.core.data import Preprocess, load_digits
    from runners.torch.backend import AUTO_WORKERS_MIN_BATCH_BYTES, MAX_AUTO_WORKERS

    cfg = compose_cfg(preset, f"data.batch_size={batch}", f"backend.num_workers={workers}")
    pre = Preprocess(64, 1, (0.5,), (0.5,))  # 16 KB per image
    train, _ = load_digits().split(pre, 0.5, seed=0)
    loader = TorchBackend(cfg, tmp_path).input_pipeline(train, shuffle=True)
    cores = len(os.sched_getaffinity(0))
    big = batch * pre.image_bytes >= AUTO_WORKERS_MIN_BATCH_BYTES
    want = workers if workers != "auto" else \
        min(MAX_AUTO_WORKERS, cores - 1) if on_cuda and big else 0
    assert loader.num_workers == want
    assert loader.pin_memory is on_cuda


def test_compiled_network_trains_like_the_eager_one_and_saves_the_same_files(tmp_path):
    """``backend.compile=true``: torch.compile (inductor, on the CPU) of the network trains to
    the eager run's weights and metrics within float tolerance; the checkpoint holds the same
    keys, and the model exports to ONNX as without it."""
    from torch._dynamo.utils import counters

    from cnnzoo.app.experiment import build_model, prepare

    runs = {}
    counters.clear()
    for compiled in (False, True):
        # no dropout: compiled code draws its masks from a generator of its own
        cfg = compose_cfg(*SMALL, "data.limit=96", "trainer.max_epochs=1",
                          "arch.options.dropout=0.0", f"backend.compile={str(compiled).lower()}")
        exp, run_dir = prepare(cfg), tmp_path / str(compiled)
        run_dir.mkdir()
        backend, model, _ = build_model(cfg, run_dir, exp)
        report = backend.train(model, exp.train_split, exp.val_split)
        keys = torch.load(report.checkpoint, weights_only=True)["state_dict"].keys()
        runs[compiled] = (report.history[-1], list(keys), backend.get_weights(model))
        assert (counters["stats"]["unique_graphs"] > 0) is compiled  # dynamo made graphs
        if compiled:
            backend.export_onnx(model, run_dir / "model.onnx", exp.val_split.take([0])[0], 18)
            assert (run_dir / "model.onnx").stat().st_size > 0
    (eager, eager_keys, eager_w), (comp, comp_keys, comp_w) = runs[False], runs[True]
    assert comp_keys == eager_keys and not any("_orig_mod" in k for k in comp_keys)
    for k in ("train_loss", "val_loss", "train_acc", "val_acc"):
        assert comp[k] == pytest.approx(eager[k], rel=1e-3, abs=1e-3), k
    for name in eager_w:
        np.testing.assert_allclose(comp_w[name], eager_w[name], atol=1e-5, err_msg=name)


# LeNet-5 with dropout, SGD momentum and a cosine schedule on 160 digits: a resume matches only
# if weights, optimizer and schedule state, generators and data order all continue exactly
SMALL = ("hardware=cpu", "data.limit=200", "arch.options.dropout=0.3", "optim=sgd",
         "optim.lr=0.02", "optim.momentum=0.9", "optim.scheduler=cosine", "export.enabled=false",
         "trainer.progress_bar=false")


def _model(run_dir, *overrides):
    from cnnzoo.app.experiment import build_model, prepare

    cfg = compose_cfg(*SMALL, *overrides)
    exp = prepare(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    backend, model, _ = build_model(cfg, run_dir, exp)
    return backend, model, exp


def _train(run_dir, epochs, resume=None, *overrides):
    backend, model, exp = _model(run_dir, f"trainer.max_epochs={epochs}", *overrides)
    report = backend.train(model, exp.train_split, exp.val_split, resume)
    return backend, model, report


class _Crash(Exception):
    pass


@pytest.mark.parametrize("options", [(), ("backend.num_workers=2", "backend.channels_last=true")])
def test_epoch_folders_resume_to_the_uninterrupted_weights(tmp_path, monkeypatch, options):
    """A crash inside epoch 2, then a resume: the weights equal an uninterrupted run's (with
    DataLoader workers too, which prefetch the resumed epoch's first batches)."""
    from cnnzoo.core.training import TrainingProtocol

    backend, model, first = _train(tmp_path / "straight", 2, None, *options)
    straight = weights_sha256(backend.get_weights(model))
    assert first.checkpoint == tmp_path / "straight" / "checkpoints" / "epoch-0002" / CHECKPOINT

    real_start, real_step, at = TrainingProtocol.start_epoch, TrainingProtocol.step, {}

    def start(self, epoch, *args):
        at.update(epoch=epoch, step=0)
        return real_start(self, epoch, *args)

    def crash_in_epoch_2(self, *args):
        at["step"] += 1
        if at == {"epoch": 1, "step": 3}:  # after the third step of the second epoch
            raise _Crash
        return real_step(self, *args)
    run = tmp_path / "resumed"
    with monkeypatch.context() as m:
        m.setattr(TrainingProtocol, "start_epoch", start)
        m.setattr(TrainingProtocol, "step", crash_in_epoch_2)
        with pytest.raises(_Crash):
            _train(run, 2, None, *options)
    one = CheckpointDir(run).latest()
    assert one.epoch == 1 and one.state["backend"] == "torch"
    assert sorted(p.name for p in one.path.iterdir()) == [CHECKPOINT, "state.json"]
    backend, model, report = _train(run, 2, one, *options)
    assert [row["epoch"] for row in report.history] == [2]
    assert weights_sha256(backend.get_weights(model)) == straight
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0002"]
    assert report.checkpoint == run / "checkpoints" / "epoch-0002" / CHECKPOINT
    # a checkpoint at max_epochs: nothing left to train, the weights are the checkpoint's
    again, model, done = _train(run, 2, CheckpointDir(run).latest(), *options)
    assert done.history == [] and weights_sha256(again.get_weights(model)) == straight


def test_epoch_metrics_are_means_per_image_and_go_to_tensorboard(tmp_path):
    """train_loss/acc and val_loss/acc are means over the epoch's images (short last batches
    weigh by their size), summed on the device and read once per epoch; TensorBoard gets the
    metrics.csv columns once per epoch, step = epoch."""
    # lr 0 and no dropout: every step sees the same weights, so an epoch's means are those of
    # one pass over the split in eval mode
    backend, model, report = _train(tmp_path, 2, None, "optim.lr=0", "arch.options.dropout=0",
                                    "data.batch_size=24")  # 160 and 40 images: short batches
    c = backend.cfg
    from cnnzoo.app.experiment import prepare

    exp = prepare(c)
    net = model.cpu().float().eval()
    for stage, split in (("train", exp.train_split), ("val", exp.val_split)):
        x, y = split.take(np.arange(len(split)))
        with torch.no_grad():
            logits = net(torch.from_numpy(x))
        loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)))
        acc = float((logits.argmax(1).numpy() == y).mean())
        for row in report.history:
            assert row[f"{stage}_loss"] == pytest.approx(loss, rel=1e-5), stage
            assert row[f"{stage}_acc"] == pytest.approx(acc, abs=1e-9), stage
    assert not (tmp_path / "lightning_logs").exists()

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cnnzoo.core.rundir import MetricsLog
    rows = MetricsLog(tmp_path / "metrics.csv").rows()
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    assert set(board.Tags()["scalars"]) == set(rows[0]) - {"epoch"}
    for tag in board.Tags()["scalars"]:
        events = board.Scalars(tag)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([r[tag] for r in rows], rel=1e-5)


def test_divergence_names_the_first_bad_step_and_writes_nothing(tmp_path):
    from cnnzoo.core.errors import TrainingDiverged

    plain = ("arch.options.activation=relu", "arch.options.dropout=0", "optim.scheduler=none")
    _train(tmp_path, 1, None, *plain)
    good = CheckpointDir(tmp_path).latest()
    files = {p.name: p.read_bytes() for p in good.path.iterdir()}
    with pytest.raises(TrainingDiverged) as err:
        _train(tmp_path, 3, good, *plain, "optim.lr=1e12")  # the config's lr wins on resume
    found = re.fullmatch(r"training diverged: train_loss is (nan|inf) at step (\d+) "
                         r"\(epoch 2, batch (\d+) of 5\); lower optim.lr", str(err.value))
    assert found and int(found.group(2)) == 5 + int(found.group(3)), str(err.value)
    kept = CheckpointDir(tmp_path).latest()
    assert kept.epoch == 1 and {p.name: p.read_bytes() for p in kept.path.iterdir()} == files
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0001"]
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 2  # header and epoch 1


class _Payload:
    """Unpickling it (if anything ever did) creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_without_running_it(backend, tmp_path, fmt):
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"net.layers.fc.weight": _Payload(marker)}}
    folder = tmp_path / "checkpoints" / "epoch-0001"  # where a resume would find it
    folder.mkdir(parents=True)
    evil = folder / CHECKPOINT
    if fmt == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    model = backend.build(toy_spec(), 32)
    with pytest.raises(CheckpointError) as err:
        backend.load_checkpoint(model, evil)
    message = str(err.value)
    assert message.startswith(f"{evil}: refused: ") and "\n" not in message, message
    assert "only checkpoints written by cnnzoo are loaded" in message
    assert not marker.exists()

    (folder / "state.json").write_text('{"epoch": 1, "backend": "torch"}')
    resume = CheckpointDir(tmp_path).latest()
    with pytest.raises(CheckpointError, match="refused: .*only checkpoints written by cnnzoo"):
        _train(tmp_path, 2, resume)
    assert not marker.exists()
    # the file is truly malicious: an unrestricted load runs it
    pickle.loads(evil.read_bytes()) if fmt == "pickle" else torch.load(evil, weights_only=False)
    assert marker.exists()


def test_damaged_checkpoint_is_a_one_line_error(backend, tmp_path):
    model = backend.build(toy_spec(), 32)
    path = tmp_path / "cut.ckpt"
    backend.save_checkpoint(model, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=f"^{path}: cannot be read: [^\n]*$"):
        backend.load_checkpoint(model, path)


def test_interrupted_checkpoint_write_keeps_the_previous_epoch(tmp_path, monkeypatch):
    from lightning_fabric.plugins.io import torch_io

    _train(tmp_path, 1)
    good = CheckpointDir(tmp_path).latest()
    before = {p.name: p.read_bytes() for p in good.path.iterdir()}

    real_save = torch_io._atomic_save

    def crash_halfway(checkpoint, path):  # the disk fills up half way through the file
        real_save(checkpoint, path)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[:len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch_io, "_atomic_save", crash_halfway)
    with pytest.raises(OSError, match="No space left"):
        _train(tmp_path, 2, good)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0001"]
    kept = CheckpointDir(tmp_path).latest()
    assert kept.epoch == 1 and {p.name: p.read_bytes() for p in kept.path.iterdir()} == before
    backend, model, _ = _model(tmp_path)
    backend.load_checkpoint(model, kept.file(CHECKPOINT))  # loadable
    _, _, report = _train(tmp_path, 2, kept)  # and resumable
    assert [row["epoch"] for row in report.history] == [2]
