"""The MXNet Gluon backend: exact parameter counts, layer-by-layer equality with the torch
backend, PyTorch's pooling rules in MXNet and in the exported ONNX model, training (aux losses,
determinism, data-parallel contexts, torch-equivalent optimizers), checkpoints (exact resume,
divergence, refusing pickles, interrupted writes), export and the compatibility shims; the slow
tests run ``python run.py backend=mxnet`` end to end."""
import csv
import json
import os
import pickle
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from runners.mxnet.compat import patch_mxnet

patch_mxnet()  # as the backend does, before MXNet is imported (here at collection, so the
# backend never sets the thread environment in this process)

import mxnet as mx  # noqa: E402
from conftest import compose_cfg, run_python, toy_spec  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

import architectures  # noqa: E402
from architectures import spec as S  # noqa: E402
from architectures.spec import INPUT, AdaptiveAvgPool, GraphBuilder  # noqa: E402
from cnnzoo.app.tasks import summary  # noqa: E402
from cnnzoo.core.checkpoints import CheckpointDir  # noqa: E402
from cnnzoo.core.data import Augment, Preprocess, epoch_order, load_digits, make_synthetic  # noqa: E402
from cnnzoo.core.errors import CheckpointError, ConfigError, TrainingDiverged  # noqa: E402
from cnnzoo.core.optim import Optimizer, Schedule  # noqa: E402
from cnnzoo.core.training import TrainingProtocol  # noqa: E402
from runners.mxnet.backend import MXNetBackend  # noqa: E402
from runners.mxnet.model import SpecGraph, key  # noqa: E402
from runners.mxnet.state import restore_trainer_state  # noqa: E402
from runners.mxnet.train import make_optimizer, step_sums, training_loss  # noqa: E402
from runners.torch.model import SpecModule  # noqa: E402

NOT_LOADED = {"torch", "tensorflow", "keras", "pytorch_lightning"}


def make_backend(run_dir, *overrides, hardware="cpu"):
    return MXNetBackend(compose_cfg("backend=mxnet", f"hardware={hardware}",
                                    "trainer.progress_bar=false", *overrides), run_dir)


@pytest.fixture
def backend(tmp_path):
    return make_backend(tmp_path)


def images(n, spec, size, seed=0):
    return np.random.default_rng(seed).standard_normal(
        (n, spec.in_channels, size, size)).astype(np.float32)


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("name", architectures.list_archs())
def test_summary_native_params_equal_spec_at_canonical_size(tmp_path, name):
    """``task=summary backend=mxnet``: the model at its canonical input and 1000 classes (no
    forward pass: every layer knows its input shape from the spec)."""
    cfg = compose_cfg(f"arch={name}", "backend=mxnet", "task=summary")
    summary(cfg, tmp_path, build_native=True)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["native_params"] == res["params"] == architectures.build_spec(name).analyze().params


@pytest.mark.parametrize("name, num_classes, in_channels, options, expected", [
    ("lenet5", 10, 1, {}, 61_706),
    ("vgg16", 10, 1, {}, None),
    ("resnext50", 7, 1, {}, None),
    ("inception_v1", None, None, {"aux_logits": True}, 13_004_888),
    ("inception_v3", None, None, {"aux_logits": True}, 27_161_264),
])
def test_native_params_equal_spec_for_other_heads(backend, name, num_classes, in_channels,
                                                  options, expected):
    spec = architectures.build_spec(name, num_classes, in_channels, **options)
    params = spec.analyze().params
    assert backend.count_params(backend.build(spec, spec.input_size)) == params
    assert expected in (None, params)


def test_layers_are_named_after_spec_nodes(backend):
    model = backend.build(toy_spec(), 32)
    assert model.layer("stem.conv").weight.name == "stem_conv_weight"
    assert model.layer("stem.bn").running_var.name == "stem_bn_running_var"
    assert model.layer("fc").bias.name == "fc_bias"
    bn = model.layer("stem.bn")
    assert bn._kwargs["eps"] == 1e-3 and bn._kwargs["momentum"] == pytest.approx(0.9)
    assert model.layer("res.grouped")._kwargs["num_group"] == 4


def test_checkpoint_round_trip(backend, tmp_path):
    spec, x = toy_spec(), images(2, toy_spec(), 32, seed=1)
    model = backend.build(spec, 32)
    backend.save_checkpoint(model, tmp_path / "weights.params")
    other = backend.build(spec, 32)  # seeded: starts equal to model, so change it
    other.layer("fc").weight.set_data(mx.nd.zeros(other.layer("fc").weight.shape))
    assert not np.allclose(backend.predict(model, x), backend.predict(other, x))
    backend.load_checkpoint(other, tmp_path / "weights.params")
    np.testing.assert_array_equal(backend.predict(model, x), backend.predict(other, x))
    lenet = backend.build(architectures.build_spec("lenet5", 5, 3), 32)
    with pytest.raises(CheckpointError, match="cannot be loaded into this lenet5 model"):
        backend.load_checkpoint(lenet, tmp_path / "weights.params")


# --------------------------------------------------------------------------- equal to torch
def copy_torch_weights(torch_net: SpecModule, mx_net, spec) -> None:
    """Test helper: the torch model's weights and BN statistics into the Gluon model."""
    for node in spec.nodes:
        t, m = torch_net.layers[torch_net.key(node.name)], mx_net.layer(node.name)
        if isinstance(node.layer, (S.Conv2d, S.Dense)):
            pairs = [(m.weight, t.weight)] + ([(m.bias, t.bias)] if node.layer.bias else [])
        elif isinstance(node.layer, S.BatchNorm):
            pairs = [(m.gamma, t.weight), (m.beta, t.bias), (m.running_mean, t.running_mean),
                     (m.running_var, t.running_var)]
        else:
            continue
        for dst, src in pairs:
            dst.set_data(mx.nd.array(src.detach().numpy()))


def torch_layer_outputs(net: SpecModule, x: np.ndarray) -> dict[str, np.ndarray]:
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: outs.__setitem__(k, o.numpy()))
             for k, m in net.layers.items()]
    with torch.no_grad():
        net(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    return outs


def mx_layer_outputs(model, spec, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every node's output, from a graph over the model's own layers that returns them all."""
    layers = {key(n.name): model.layer(n.name) for n in spec.nodes}
    every = SpecGraph(spec.nodes, layers, tuple(n.name for n in spec.nodes))
    with autograd.predict_mode():
        outs = every(mx.nd.array(x))
    return {key(n.name): o.asnumpy() for n, o in zip(spec.nodes, outs)}


EQUIVALENCE = [
    ("toy", 32),
    ("lenet5", 32),
    ("inception_v1", 15),   # ceil-mode 3x3 pools over 2x2 and 1x1 maps
    ("inception_v1", 23),   # ceil-mode windows hanging over the edge
    ("inception_v1", 32),
    ("inception_v3", 75),   # 3x3 average pools counting the padding
    ("inception_v4", 75),   # 3x3 average pools not counting the padding
    ("xception", 32),       # depthwise separable convolutions
    ("alexnet", 63),        # adaptive pooling of a 1x1 map to 6x6
    ("alexnet", 100),       # adaptive pooling of 2x2 to 6x6: overlapping bins
    ("resnext50", 32),      # grouped convolutions
]


@pytest.mark.parametrize("name, size", EQUIVALENCE, ids=[f"{n}-{s}" for n, s in EQUIVALENCE])
def test_every_layer_equals_the_torch_backend(backend, name, size):
    spec = toy_spec() if name == "toy" else architectures.build_spec(name, num_classes=10)
    torch.manual_seed(0)
    tnet = SpecModule(spec, size).eval()
    gen = torch.Generator().manual_seed(1)
    for m in tnet.modules():  # non-trivial batch norms: random affine and running statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for t, lo, hi in ((m.weight.data, 0.5, 1.5), (m.bias.data, -0.2, 0.2),
                              (m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0)):
                t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    model = backend.build(spec, size)
    copy_torch_weights(tnet, model, spec)
    x = images(2, spec, size)
    want, got = torch_layer_outputs(tnet, x), mx_layer_outputs(model, spec, x)
    for row in spec.analyze(size).layers:
        k = key(row.node.name)
        assert got[k].shape[1:] == row.out_shape, row.node.name
        scale = max(1.0, float(np.abs(want[k]).max()))
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=row.node.name)
    # and the hybridized inference path the product uses
    np.testing.assert_allclose(backend.predict(model, x), want[key(spec.output)], atol=1e-4)


# --------------------------------------------------------------------------- pooling and ONNX
def export_and_run(backend, model, x, tmp_path, opset=18):
    path = tmp_path / "model.onnx"
    backend.export_onnx(model, path, x[:2], opset)
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return onnx.load(str(path)), sess.run(None, {"input": x})[0]


def one_layer_spec(layer, size: int, channels: int = 2):
    """input -> layer -> flatten: the model's output is the layer's whole output."""
    g = GraphBuilder("one_layer", channels, 2, size)
    g.flatten(g.add(layer, INPUT, name="layer"), name="flat")
    return g.build()


# (type, input, kernel, stride, padding, ceil_mode, count_include_pad)
POOLS = [
    ("max", 5, 2, 2, 1, True, True),   # ceil: MXNet's "full" keeps a window starting in the padding
    ("max", 6, 2, 3, 0, True, True),   # ceil: "full" gives 3 windows, PyTorch and ONNX 2
    ("max", 2, 3, 2, 0, True, True),   # window wider than the input (GoogLeNet at 15)
    ("max", 7, 3, 2, 1, False, True),  # ResNet / Xception stem pool
    ("max", 5, 3, 1, 1, True, True),   # GoogLeNet's branch pool
    ("avg", 5, 3, 2, 1, True, True),   # ceil, hanging window, padding counted
    ("avg", 5, 3, 2, 1, True, False),  # ceil, hanging window, padding not counted
    ("avg", 6, 2, 3, 0, True, True),   # ceil: the dropped extra window
    ("avg", 8, 3, 1, 1, False, True),  # Inception-v3
    ("avg", 8, 3, 1, 1, False, False),  # Inception-v4 / Inception-ResNet-v2
    ("avg", 2, 5, 3, 1, True, True),   # window wider than the padded input
    ("avg", 2, 5, 3, 1, True, False),
    ("avg", 9, 5, 3, 0, False, True),  # Inception-v3's auxiliary head
]


@pytest.mark.parametrize("kind, size, k, s, p, ceil, include_pad", POOLS)
def test_pooling_matches_pytorch_in_mxnet_and_onnx(backend, tmp_path, kind, size, k, s, p, ceil,
                                                   include_pad):
    layer = (S.MaxPool(k, s, p, ceil) if kind == "max" else
             S.AvgPool(k, s, p, ceil, include_pad))
    spec = one_layer_spec(layer, size)
    x = images(3, spec, size, seed=size)
    t = torch.from_numpy(x)
    want = (torch.nn.functional.max_pool2d(t, k, s, p, ceil_mode=ceil) if kind == "max" else
            torch.nn.functional.avg_pool2d(t, k, s, p, ceil_mode=ceil,
                                           count_include_pad=include_pad)).numpy()
    assert want.shape[1:] == spec.analyze(size)["layer"].out_shape
    model = backend.build(spec, size)
    native = backend.predict(model, x)
    np.testing.assert_allclose(native, want.reshape(3, -1), atol=1e-6)
    _, exported = export_and_run(backend, model, x, tmp_path)
    np.testing.assert_allclose(exported, native, atol=1e-6)


@pytest.mark.parametrize("size, out", [(1, 6), (2, 6), (5, 3), (6, 3), (7, 7), (13, 6), (3, 4)])
def test_adaptive_avg_pool_matches_pytorch_in_mxnet_and_onnx(backend, tmp_path, size, out):
    spec = one_layer_spec(AdaptiveAvgPool(out), size)
    x = images(3, spec, size, seed=size)
    want = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), out).numpy()
    model = backend.build(spec, size)
    native = backend.predict(model, x)
    np.testing.assert_allclose(native, want.reshape(3, -1), atol=1e-6)
    _, exported = export_and_run(backend, model, x, tmp_path)
    np.testing.assert_allclose(exported, native, atol=1e-6)


@pytest.mark.parametrize("opset", [13, 18, 23])
def test_onnx_has_named_io_dynamic_batch_and_weights_only_as_initializers(backend, tmp_path,
                                                                          opset):
    spec = toy_spec()
    model = backend.build(spec, 32)
    x = images(7, spec, 32)
    exported, out = export_and_run(backend, model, x, tmp_path, opset)
    g = exported.graph
    initializers = {t.name for t in g.initializer}
    assert [i.name for i in g.input] == ["input"] and not initializers & {i.name for i in g.input}
    assert {"stem_conv_weight", "fc_weight", "stem_bn_running_mean"} <= initializers
    assert [o.name for o in g.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, 32, 32]
    assert [d.dim_param or d.dim_value for d in g.output[0].type.tensor_type.shape.dim] == ["N", 5]
    assert next(o.version for o in exported.opset_import if o.domain in ("", "ai.onnx")) == opset
    np.testing.assert_allclose(out, backend.predict(model, x), atol=1e-4, rtol=1e-3)
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        np.testing.assert_allclose(sess.run(None, {"input": x[:batch]})[0],
                                   backend.predict(model, x[:batch]), atol=1e-4, rtol=1e-3)


def test_auxiliary_heads_train_but_are_left_out_of_inference_and_export(backend, tmp_path):
    spec = architectures.build_spec("inception_v1", num_classes=4, aux_logits=True)
    model = backend.build(spec, 64)
    x, y = mx.nd.array(images(4, spec, 64)), mx.nd.array([0, 1, 2, 3])
    with autograd.predict_mode():  # same outputs twice: no dropout
        main, aux1, aux2 = model(x)
    np.testing.assert_allclose(model.logits(x).asnumpy(), main.asnumpy(), atol=1e-6)
    loss, logits = training_loss((main, aux1, aux2), y, model.aux_weight)
    ce = gluon.loss.SoftmaxCrossEntropyLoss()
    expected = ce(main, y) + 0.3 * (ce(aux1, y) + ce(aux2, y))
    np.testing.assert_allclose(loss.asnumpy(), expected.asnumpy(), rtol=1e-6)
    assert logits is main and (loss > ce(main, y)).asnumpy().all()
    exported, out = export_and_run(backend, model, x.asnumpy(), tmp_path)
    assert not [t.name for t in exported.graph.initializer if t.name.startswith("aux")]
    np.testing.assert_allclose(out, main.asnumpy(), atol=1e-4)


# --------------------------------------------------------------------------- data and training
def test_input_pipeline_follows_the_data_layers_epoch_order(backend):
    augment = Augment(random_crop_padding=2, horizontal_flip=True)  # images depend on the epoch
    train, _ = load_digits().split(Preprocess(32, 1, (0.5,), (0.5,), augment=augment), 0.2,
                                   seed=3)
    pipeline, bs = backend.input_pipeline(train, shuffle=True), backend.cfg.data.batch_size
    firsts = []
    for epoch in (0, 1):
        pipeline.set_epoch(epoch)
        x, y = next(iter(pipeline))
        want_x, want_y = train.take(epoch_order(len(train), backend.cfg.seed, epoch)[:bs], epoch)
        np.testing.assert_array_equal(x.asnumpy(), want_x)
        np.testing.assert_array_equal(y.asnumpy(), want_y)
        firsts.append(want_y)
    assert not np.array_equal(*firsts)
    x, _ = next(iter(backend.input_pipeline(train, shuffle=False)))
    np.testing.assert_array_equal(x.asnumpy(), train.batch(0, bs)[0])
    assert len(pipeline) == -(-len(train) // bs)


def train_toy(run_dir, spec, *overrides, hardware="cpu", resume=None):
    """A short in-process training run on synthetic data (4 batches per epoch); returns the
    report and the weights."""
    backend = make_backend(run_dir, "data=synthetic", "data.batch_size=16", "trainer.max_epochs=2",
                           *overrides, hardware=hardware)
    data = make_synthetic(72, spec.num_classes, 16, spec.in_channels, seed=0)
    train, val = data.split(Preprocess(32, spec.in_channels, (0.5,), (0.5,)), 0.2, seed=0)
    model = backend.build(spec, 32)
    report = backend.train(model, train, val, resume)
    weights = {name: p.data().asnumpy() for name, p in model.collect_params().items()}
    return report, weights


@pytest.mark.parametrize("hardware", ["cpu", "ddp_cpu"])
def test_seeded_runs_give_bitwise_identical_weights(tmp_path, hardware):
    spec = toy_spec()  # batch norm and dropout: randomness and running statistics
    runs = [train_toy(tmp_path / f"run{i}", spec, "optim=sgd", hardware=hardware)
            for i in (1, 2)]
    (report, first), (_, second) = runs
    assert report.extra["contexts"] == (["cpu(0)"] if hardware == "cpu" else ["cpu(0)", "cpu(1)"])
    assert first.keys() == second.keys()
    for name in first:
        assert np.array_equal(first[name], second[name]), name
    assert not np.array_equal(first["fc_weight"], make_backend(tmp_path).build(spec, 32)
                              .layer("fc").weight.data().asnumpy())  # it did train


def test_two_contexts_compute_the_single_context_step(tmp_path):
    """Without batch norm or dropout, splitting a batch over cpu(0) and cpu(1) and summing the
    gradients in the kvstore is the same SGD step as one context (up to float rounding)."""
    spec = architectures.build_spec("lenet5", num_classes=4, in_channels=3)
    one, w1 = train_toy(tmp_path / "one", spec, "optim=sgd")
    two, w2 = train_toy(tmp_path / "two", spec, "optim=sgd", "hardware.devices=2",
                        "backend.kvstore=local")
    assert two.extra["contexts"] == ["cpu(0)", "cpu(1)"] and two.extra["kvstore"] == "local"
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], atol=1e-5, err_msg=name)
    assert [r["train_loss"] for r in two.history] == pytest.approx(
        [r["train_loss"] for r in one.history], abs=1e-5)


def test_training_writes_metrics_checkpoints_and_tensorboard(tmp_path):
    report, weights = train_toy(tmp_path, toy_spec(), "optim=rmsprop", "optim.lr=0.01")
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    last = Schedule(0.01, "cosine", steps_per_epoch=4, max_epochs=2).rate(7)  # the 8th step's
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[1]["lr"]) == pytest.approx(last)
    assert report.history[-1]["val_acc"] == pytest.approx(float(rows[-1]["val_acc"]), abs=1e-5)
    folder = tmp_path / "checkpoints" / "epoch-0002"
    assert report.checkpoint == folder / "model.params"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch-0002"]
    assert sorted(p.name for p in folder.iterdir()) == ["model.params", "optimizer.nd",
                                                        "state.json", "trainer.json"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert report.images_per_s > 0 and report.train_time_s > 0
    backend = make_backend(tmp_path, "optim=rmsprop")
    model = backend.build(toy_spec(), 32)
    backend.load_checkpoint(model, report.checkpoint)
    np.testing.assert_array_equal(model.layer("fc").weight.data().asnumpy(), weights["fc_weight"])
    # the optimizer state goes into a fresh trainer of our RMSprop: moments and step counts
    trainer = gluon.Trainer(model.collect_params(),
                            *make_optimizer(Optimizer.from_config(backend.cfg.optim)),
                            kvstore=None)
    restore_trainer_state(mx, trainer, folder)
    opt, states = trainer._optimizer, trainer._updaters[0].states
    assert type(opt).__name__ == "RMSprop" and opt.num_update == 8 and opt.learning_rate == pytest.approx(last)
    fc = next(i for i, p in enumerate(trainer._params) if p.name == "fc_weight")
    square_avg, buf = states[fc]
    assert square_avg.shape == buf.shape == weights["fc_weight"].shape
    assert opt._index_update_count[fc] == 8 and float(square_avg.sum().asscalar()) > 0


@pytest.mark.parametrize("limit, batches", [(2, 2), (0.5, 2), (1.0, 4)])
def test_limit_train_batches_follows_lightnings_rule(tmp_path, limit, batches):
    """58 training images in batches of 16: 4 batches; a whole number caps them, a fraction
    takes that share (rounded down)."""
    report, _ = train_toy(tmp_path, toy_spec(), f"trainer.limit_train_batches={limit}",
                          "trainer.limit_val_batches=1", "trainer.max_epochs=1")
    images = round(report.images_per_s * report.train_time_s)
    assert images == (58 if batches == 4 else 16 * batches)


OPTIMIZERS = [
    ("sgd", ["optim.nesterov=false"], lambda p, c: torch.optim.SGD(
        p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)),
    ("sgd", ["optim.nesterov=true"], lambda p, c: torch.optim.SGD(
        p, lr=c.lr, momentum=c.momentum, nesterov=True, weight_decay=c.weight_decay)),
    ("adam", ["optim.weight_decay=0.01"], lambda p, c: torch.optim.Adam(
        p, lr=c.lr, weight_decay=c.weight_decay)),
    ("adamw", [], lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay)),
    ("rmsprop", [], lambda p, c: torch.optim.RMSprop(
        p, lr=c.lr, alpha=c.alpha, eps=c.eps, momentum=c.momentum, weight_decay=c.weight_decay)),
    ("rmsprop", ["optim.momentum=0", "optim.eps=1e-8"], lambda p, c: torch.optim.RMSprop(
        p, lr=c.lr, alpha=c.alpha, eps=c.eps, weight_decay=c.weight_decay)),
]


@pytest.mark.parametrize("name, overrides, make_torch", OPTIMIZERS,
                         ids=[f"{n}-{i}" for i, (n, *_) in enumerate(OPTIMIZERS)])
def test_optimizers_take_the_same_steps_as_torch(name, overrides, make_torch):
    c = compose_cfg(f"optim={name}", *overrides).optim
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(50).astype(np.float32)
    grads = rng.standard_normal((6, 50)).astype(np.float32)
    param = gluon.Parameter("w", shape=(50,))
    param.initialize(mx.init.Constant(mx.nd.array(w0)))
    trainer = gluon.Trainer([param], *make_optimizer(Optimizer.from_config(c)), kvstore=None)
    tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = make_torch([tw], c)
    for g in grads:
        with autograd.record():
            loss = (param.data() * mx.nd.array(g)).sum()  # d loss / d w = g
        loss.backward()
        trainer.step(1)
        tw.grad = torch.from_numpy(g.copy())
        topt.step()
        np.testing.assert_allclose(param.data().asnumpy(), tw.detach().numpy(), rtol=1e-5,
                                   atol=1e-6)


def test_unsupported_hardware_is_one_clear_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        MXNetBackend(compose_cfg("backend=mxnet", "hardware=gpu"), tmp_path)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("hardware.precision=bf16-mixed is not supported")
    assert "mxnet-cu112" in lines[1]  # this MXNet is the CPU build
    with pytest.raises(ConfigError, match="hardware.num_nodes=2"):
        make_backend(tmp_path, "hardware.num_nodes=2")
    with pytest.raises(ConfigError, match="backend.kvstore=nccl is not supported"):
        make_backend(tmp_path, "backend.kvstore=nccl")


# --------------------------------------------------------------------------- resume
RESUMES = [  # (hardware, overrides): the fused SGD, Adam (bias correction counts steps), our
    ("cpu", ["optim=sgd"]),  # AdamW and RMSprop, several contexts
    ("cpu", ["optim=adamw"]),
    ("cpu", ["optim=rmsprop", "optim.lr=0.01", "backend.hybridize=false"]),
    ("ddp_cpu", ["optim=adam", "optim.scheduler=cosine"]),
]


@pytest.mark.parametrize("hardware, overrides", RESUMES,
                         ids=[f"{h}-{o[0][6:]}" for h, o in RESUMES])
def test_resume_continues_bitwise_like_an_uninterrupted_run(tmp_path, hardware, overrides,
                                                             monkeypatch):
    """Toy (batch norm and dropout) for 3 epochs, against a run killed after epoch 1 and
    resumed for 2 more: weights, optimizer state, the schedule's position and the generators
    all continue."""
    spec = toy_spec()
    _, want = train_toy(tmp_path / "whole", spec, "trainer.max_epochs=3", *overrides,
                        hardware=hardware)
    end_epoch = TrainingProtocol.end_epoch

    def killed_after_epoch_1(self, epoch, *args, **kwargs):
        row = end_epoch(self, epoch, *args, **kwargs)
        if epoch == 0:
            raise KeyboardInterrupt  # stands for the process killed after the checkpoint
        return row

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(TrainingProtocol, "end_epoch", killed_after_epoch_1)
        train_toy(tmp_path / "cut", spec, "trainer.max_epochs=3", *overrides, hardware=hardware)
    first = CheckpointDir(tmp_path / "cut").latest()
    assert first.epoch == 1
    report, got = train_toy(tmp_path / "cut", spec, "trainer.max_epochs=3", *overrides,
                            hardware=hardware, resume=first)
    assert [r["epoch"] for r in report.history] == [2, 3]
    assert report.checkpoint == tmp_path / "cut" / "checkpoints" / "epoch-0003" / "model.params"
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    # a checkpoint at max_epochs: nothing left to train, the weights stay
    done = CheckpointDir(tmp_path / "cut").latest()
    report, again = train_toy(tmp_path / "cut", spec, "trainer.max_epochs=3", *overrides,
                              hardware=hardware, resume=done)
    assert report.history == [] and report.checkpoint == done.file("model.params")
    assert all(np.array_equal(again[name], want[name]) for name in want)


@pytest.mark.parametrize("hybridize", [True, False])
def test_step_sums_equal_the_imperative_running_sums(hybridize):
    """One hybridized call per step gives exactly the running loss sum, correct count and
    finite-step count that the imperative ops give, also once the sum turns NaN or Inf."""
    block = step_sums(hybridize)
    rng = np.random.default_rng(0)
    sums, finite = mx.nd.zeros(2), mx.nd.zeros(2)
    want_sums, want_finite = mx.nd.zeros(2), mx.nd.zeros(2)
    for step in range(6):
        n = 8 if step < 5 else 3  # a smaller last batch
        loss = rng.random(n).astype(np.float32) * 3
        if step == 3:
            loss[1] = np.inf if hybridize else np.nan
        loss, logits = mx.nd.array(loss), mx.nd.array(rng.standard_normal((n, 5)))
        labels = mx.nd.array(rng.integers(0, 5, n))
        sums, finite = block(loss, logits, labels, sums, finite)
        want_sums += mx.nd.concat(loss.sum(), (logits.argmax(axis=1) == labels).sum(), dim=0)
        want_finite += mx.nd.contrib.isfinite(want_sums)
        np.testing.assert_array_equal(sums.asnumpy(), want_sums.asnumpy())
        np.testing.assert_array_equal(finite.asnumpy(), want_finite.asnumpy())
    assert finite.asnumpy()[0] == 3 and finite.asnumpy()[1] == 6


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A toy run directory with the checkpoint of one finished epoch (copy it to change it)."""
    run_dir = tmp_path_factory.mktemp("one-epoch")
    train_toy(run_dir, toy_spec(), "optim=sgd", "trainer.max_epochs=1")
    return run_dir


def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(one_epoch, tmp_path):
    shutil.copytree(one_epoch, tmp_path / "run")
    good = CheckpointDir(tmp_path / "run").latest()
    files = {p.name: p.read_bytes() for p in good.path.iterdir()}
    with pytest.raises(TrainingDiverged) as err:
        train_toy(tmp_path / "run", toy_spec(), "optim=sgd", "optim.lr=1e12",
                  "trainer.max_epochs=3", resume=good)
    found = re.fullmatch(r"training diverged: train_loss is (nan|inf) at step (\d+) \(epoch 2, "
                         r"batch (\d+) of 4\); lower optim.lr", str(err.value))
    assert found, str(err.value)
    step, batch = int(found.group(2)), int(found.group(3))
    assert step == 4 + batch and 1 <= batch <= 4
    kept = CheckpointDir(tmp_path / "run").latest()
    assert kept.epoch == 1 and {p.name: p.read_bytes() for p in kept.path.iterdir()} == files
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["epoch-0001"]


class _Payload:
    """Unpickling it would create ``marker``: a stand-in for code a crafted file runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("name", ["model.params", "optimizer.nd"])
def test_a_crafted_pickle_is_refused_unread(one_epoch, tmp_path, name):
    """A pickle under a checkpoint file's name: ``load_checkpoint`` and resuming refuse it
    with one line, and its code never runs."""
    shutil.copytree(one_epoch, tmp_path / "run")
    checkpoint = CheckpointDir(tmp_path / "run").latest()
    marker = tmp_path / "pwned"
    checkpoint.file(name).write_bytes(pickle.dumps(_Payload(marker)))
    refused = rf"{name}: refused: not an MXNet NDArray file \(it looks like a Python pickle"
    if name == "model.params":
        backend = make_backend(tmp_path)
        with pytest.raises(CheckpointError, match=refused) as err:
            backend.load_checkpoint(backend.build(toy_spec(), 32), checkpoint.file(name))
        assert "\n" not in str(err.value) and str(err.value).endswith(
            "only checkpoints written by cnnzoo are loaded")
    with pytest.raises(CheckpointError, match=refused):
        train_toy(tmp_path / "run", toy_spec(), "optim=sgd", resume=checkpoint)
    assert not marker.exists()
    pickle.loads(checkpoint.file(name).read_bytes())  # the file really was malicious
    assert marker.exists()


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    """The second epoch's optimizer file is cut off half-way (a full disk, a crash): epoch 1
    stays the newest checkpoint, with no temporary folder left, and training resumes from it."""
    real_save, calls = mx.nd.save, []

    def failing_save(fname, data):
        calls.append(fname)
        if len(calls) < 4:  # epoch 1: weights, optimizer; epoch 2: weights, then this fails
            return real_save(fname, data)
        real_save(fname + ".full", data)
        with open(fname + ".full", "rb") as src, open(fname, "wb") as dst:
            full = src.read()
            dst.write(full[:len(full) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx.nd, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train_toy(tmp_path, toy_spec(), "optim=sgd")
    assert calls[3].endswith("optimizer.nd")
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch-0001"]
    kept = CheckpointDir(tmp_path).latest()
    backend = make_backend(tmp_path)
    backend.load_checkpoint(backend.build(toy_spec(), 32), kept.file("model.params"))
    report, _ = train_toy(tmp_path, toy_spec(), "optim=sgd", resume=kept)
    assert [r["epoch"] for r in report.history] == [2]
    assert CheckpointDir(tmp_path).latest().epoch == 2


# --------------------------------------------------------------------------- compatibility
def test_compat_shims_apply_only_with_the_mxnet_backend():
    code = (
        "import numpy, onnx, runners.mxnet.compat\n"
        "assert 'bool' not in numpy.__dict__ and not hasattr(onnx, 'mapping')\n"
        "import runners.mxnet.backend\n"
        "from runners.mxnet.compat import patch_mxnet\n"
        "from onnx import helper, mapping\n"
        "assert numpy.bool is bool and 'mxnet' not in __import__('sys').modules\n"
        "tables = (mapping.NP_TYPE_TO_TENSOR_TYPE, mapping.TENSOR_TYPE_TO_NP_TYPE)\n"
        "patch_mxnet()\n"
        "assert onnx.mapping.NP_TYPE_TO_TENSOR_TYPE is tables[0]\n"  # idempotent
        "assert onnx.mapping.TENSOR_TYPE_TO_NP_TYPE is tables[1]\n"
        "assert tables[0][numpy.dtype('float32')] == helper.np_dtype_to_tensor_dtype("
        "numpy.dtype('float32')) == onnx.TensorProto.FLOAT\n"
        "assert tables[1][onnx.TensorProto.INT64] == numpy.dtype('int64')\n"
        "import mxnet, mxnet.onnx\n"
        "print('ok')\n")
    proc = run_python(code, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("threads, env, want", [
    (None, None, "cores"), (3, None, "3"), (None, "5", "5"), (3, "5", "3")])
def test_mxnet_is_imported_with_the_configured_threads(tmp_path, threads, env, want):
    """``hardware.threads`` reaches MXNet's OpenMP through the environment of its import, null
    meaning every physical core (MXNet's own default, half the logical CPUs, leaves a core idle
    without hyper-threading) unless the user set ``OMP_NUM_THREADS``; the environment is
    restored afterwards. A stand-in ``mxnet`` module records what it sees at import."""
    fake = tmp_path / "mxnet"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os\nSEEN = {k: os.environ.get(k) for k in ('OMP_NUM_THREADS', "
        "'MXNET_OMP_MAX_THREADS')}\n")
    code = (
        "import json, os, sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "before = os.environ.get('OMP_NUM_THREADS')\n"
        "from runners.mxnet.compat import import_mxnet as _mxnet, physical_cores\n"
        f"mx = _mxnet({threads!r})\n"
        "print(json.dumps({'seen': mx.SEEN, 'cores': physical_cores(), 'cpus': os.cpu_count(),"
        " 'restored': os.environ.get('OMP_NUM_THREADS') == before}))\n")
    environ = {k: v for k, v in os.environ.items()
               if k not in ("OMP_NUM_THREADS", "MXNET_OMP_MAX_THREADS")}
    if env is not None:
        environ["OMP_NUM_THREADS"] = env
    proc = run_python(code, timeout=120, env=environ)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 1 <= out["cores"] <= out["cpus"] and out["restored"]
    want = str(out["cores"]) if want == "cores" else want
    assert out["seen"]["OMP_NUM_THREADS"] == want
    assert out["seen"]["MXNET_OMP_MAX_THREADS"] == (None if env and not threads else want)


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_default_job_trains_exports_and_verifies(cli):
    r = cli("backend=mxnet")
    assert r.returncode == 0, r.stderr[-2000:]
    res = r.results()
    assert (res["arch"], res["backend"], res["status"]) == ("lenet5", "mxnet", "ok")
    assert res["params"] == res["native_params"] == 61_706
    assert res["metrics"]["val_acc"] >= 0.95
    assert res["export"]["passed"] is True and res["export"]["opset"] == 18
    assert res["export"]["max_abs_diff"] <= 1e-4
    assert res["hardware"]["contexts"] == ["cpu(0)"]
    assert res["checkpoint"] == "checkpoints/epoch-0010/model.params"
    assert res["versions"]["mxnet"] == "1.9.1"
    rows = list(csv.DictReader((r.run_dir / "metrics.csv").open()))
    assert len(rows) == 10 and list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss",
                                                 "val_acc", "lr", "epoch_time_s"]
    for name in ("checkpoints/epoch-0010/model.params", "checkpoints/epoch-0010/optimizer.nd",
                 "model.onnx"):
        assert (r.run_dir / name).stat().st_size > 0
    assert list((r.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "mxnet" in r.frameworks and not r.frameworks & NOT_LOADED


@pytest.mark.slow
def test_summary_through_run_py_loads_no_other_framework(cli):
    r = cli("task=summary", "arch=lenet5", "backend=mxnet")
    assert r.returncode == 0, r.stderr
    assert r.results()["native_params"] == r.results()["params"] == 61_706
    assert "native mxnet parameters: 61,706" in r.stdout
    assert "mxnet" in r.frameworks and not r.frameworks & NOT_LOADED  # (mxnet imports onnx)


@pytest.mark.slow
def test_ddp_cpu_trains_on_two_contexts_in_one_process(cli):
    r = cli("backend=mxnet", "hardware=ddp_cpu", "trainer.max_epochs=2", "export.num_images=16",
            "export.batch_sizes=[1,8]")
    assert r.returncode == 0, r.stderr[-2000:]
    res = r.results()
    assert res["hardware"]["contexts"] == ["cpu(0)", "cpu(1)"]
    assert res["hardware"]["kvstore"] == "device" and res["export"]["passed"] is True
    assert "hardware.strategy=ddp is a torch concept" in r.stdout
    assert res["metrics"]["val_acc"] > 0.8


@pytest.mark.slow
def test_unsupported_precision_fails_before_training(cli):
    r = cli("backend=mxnet", "hardware.precision=bf16-mixed")
    assert r.returncode == 2
    assert r.error_lines == ["error: hardware.precision=bf16-mixed is not supported by "
                             "backend=mxnet: use hardware.precision=32-true"]
    assert "Traceback" not in r.stderr and not (r.run_dir / "metrics.csv").exists()
