"""The Keras backend: the spec translated exactly (checked layer by layer against the torch
backend with the same weights), training, determinism, distribution, checkpoints (exact resume,
divergence, refused unsafe files, interrupted writes), export, and end to end through
``python run.py backend=keras``."""
import csv
import gc
import json
import math
import os
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg, run_cli, run_python, toy_spec

import architectures
from architectures import spec as S
from architectures.spec import INPUT, GlobalAvgPool, GraphBuilder
from cnnzoo.app.validate import ConfigError, validate
from cnnzoo.core.checkpoints import CheckpointDir
from cnnzoo.core.data import Augment, Preprocess, epoch_order, load_digits, make_synthetic
from cnnzoo.core.errors import CheckpointError, TrainingDiverged
from export import export_and_verify
from runners.keras.backend import KerasBackend, keras
from runners.keras.data import to_nhwc
from runners.keras.model import AdaptiveAvgPool2D, SpecPool2D, build_model, inference_model
from runners.keras.state import CHECKPOINT, FULL_MODEL
from runners.keras.train import EpochCallback, divisor_at_most
from runners.torch.model import SpecModule


@pytest.fixture
def backend(tmp_path):
    return KerasBackend(compose_cfg("backend=keras", "hardware=cpu"), tmp_path)


def _images(n, c, size, seed=0):
    return np.random.default_rng(seed).standard_normal((n, c, size, size)).astype(np.float32)


# --------------------------------------------------------------------------- 1. parameters
@pytest.mark.parametrize("name, num_classes, in_channels, options", [
    *[(name, None, None, {}) for name in architectures.list_archs()],
    ("inception_v1", None, None, {"aux_logits": True}),
    ("inception_v3", None, None, {"aux_logits": True}),
    ("vgg16", 10, 1, {}), ("resnext50", 7, 1, {}), ("xception", 2, 4, {}),
])
def test_native_params_equal_spec(backend, name, num_classes, in_channels, options):
    spec = architectures.build_spec(name, num_classes, in_channels, **options)
    model = backend.build(spec, spec.input_size)  # canonical size; no forward pass
    assert backend.count_params(model) == spec.analyze().params
    assert len(model.outputs) == 1 + len(spec.aux_outputs)
    del model
    gc.collect()


def test_every_spec_node_is_a_layer_of_that_name(backend):
    spec = architectures.build_spec("inception_v1", 10, aux_logits=True)
    model = backend.build(spec, 32)
    names = {layer.name for layer in model.layers}
    assert {n.name for n in spec.nodes} <= names
    assert model.get_layer("inception3a.branch2.1.conv").kernel.shape == (3, 3, 96, 128)
    assert isinstance(model.get_layer("maxpool1"), SpecPool2D)
    infer = inference_model(model)
    assert len(infer.outputs) == 1 and "aux1.fc2" not in {lay.name for lay in infer.layers}


def test_layer_hyperparameters_are_carried_over(backend):
    model = backend.build(toy_spec(), 32)
    bn = model.get_layer("stem.bn")
    assert bn.epsilon == 1e-3 and bn.momentum == pytest.approx(0.9)  # 1 - torch's 0.1
    assert model.get_layer("res.grouped").groups == 4
    assert isinstance(model.get_layer("sep.depthwise"), keras.layers.DepthwiseConv2D)
    assert model.get_layer("pool").count_include_pad is False
    assert model.get_layer("stem.conv.pad").padding == ((1, 1), (1, 1))  # explicit, symmetric
    assert model.get_layer("mixed.b2b").padding == "same"  # stride 1, (1,3) kernel, (0,1) pad


def test_mixed_precision_keeps_logits_float32(tmp_path):
    b = KerasBackend(compose_cfg("backend=keras", "hardware=cpu", "hardware.precision=bf16-mixed"),
                     tmp_path)
    model = b.build(toy_spec(), 32)
    assert model.get_layer("stem.conv").compute_dtype == "bfloat16"
    assert model.get_layer("fc").compute_dtype == "float32"
    out = b.predict(model, _images(2, 3, 32))  # predict runs a float32 copy
    assert out.dtype == np.float32 and out.shape == (2, 5)


# --------------------------------------------------------------------------- 2. equivalence
def copy_torch_weights(net: SpecModule, model, spec) -> None:
    """Test helper: the torch model's weights into the Keras model, node by node (NCHW/OIHW ->
    NHWC/HWIO; depthwise HW C 1; dense (in, out); batch norm with its running statistics)."""
    for node in spec.nodes:
        layer, module = node.layer, net.layers[net.key(node.name)]
        if isinstance(layer, (S.Conv2d, S.Dense, S.BatchNorm)):
            target = model.get_layer(node.name)
            w = module.weight.detach().numpy()
            if isinstance(layer, S.BatchNorm):
                values = [w, module.bias, module.running_mean, module.running_var]
            elif isinstance(layer, S.Dense):
                values = [w.T] + ([module.bias] if layer.bias else [])
            else:
                depthwise = isinstance(target, keras.layers.DepthwiseConv2D)
                values = [w.transpose((2, 3, 0, 1) if depthwise else (2, 3, 1, 0))]
                values += [module.bias] if layer.bias else []
            target.set_weights([np.asarray(v.detach().numpy() if torch.is_tensor(v) else v)
                                for v in values])


def _randomized_torch(spec, size, seed=0) -> SpecModule:
    """A torch model in eval mode whose batch norms have non-trivial statistics and affine."""
    torch.manual_seed(seed)
    net = SpecModule(spec, size).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return net


def assert_every_layer_matches_torch(spec, size, atol=1e-4):
    net = _randomized_torch(spec, size)
    model = build_model(spec, size)
    copy_torch_weights(net, model, spec)
    captured = {}
    for node in spec.nodes:
        net.layers[net.key(node.name)].register_forward_hook(
            lambda m, i, o, name=node.name: captured.__setitem__(name, o.detach().numpy()))
    x = _images(2, spec.in_channels, size)
    with torch.no_grad():
        net(torch.from_numpy(x))
    # the inference path: every node the logits need (auxiliary heads are training-only)
    names = [n for n in spec.nodes if n.name in captured]
    probe = keras.Model(model.input, [model.get_layer(n.name).output for n in names])
    outs = probe(to_nhwc(x), training=False)
    for node, out in zip(names, outs):
        ref = captured[node.name]
        ref = ref.transpose(0, 2, 3, 1) if ref.ndim == 4 else ref
        got = np.asarray(out)
        assert got.shape == ref.shape, node.name
        scale = max(1.0, float(np.abs(ref).max()))
        err = float(np.abs(got - ref).max())
        assert err <= atol * scale, f"{spec.name}@{size} {node.name}: max diff {err:.3g}"
    return len(names)


@pytest.mark.parametrize("name, size", [
    ("toy", 32), ("toy", 17),                 # grouped, depthwise, padded max pool, excl. pad
    ("lenet5", 32),
    ("inception_v1", 15), ("inception_v1", 32),  # ceil-mode max pools, windows over the edge
    ("inception_v3", 75),                     # avg pools with count_include_pad=True
    ("inception_v4", 75),                     # avg pools with count_include_pad=False
    ("inception_resnet_v2", 75),              # scaled residual branches
    ("xception", 32),                         # padded 3x3/2 max pools, depthwise convs
    ("alexnet", 63),                          # adaptive pool from 1x1 up to 6x6
    ("resnext50", 32),                        # grouped 3x3 convs
])
def test_every_layer_matches_torch_with_the_same_weights(name, size):
    spec = toy_spec() if name == "toy" else architectures.build_spec(name, num_classes=7)
    assert assert_every_layer_matches_torch(spec, size) == len(
        [n for n in spec.nodes if n.name not in _aux_only(spec)])


def _aux_only(spec) -> set[str]:
    needed = {spec.output}
    for node in reversed(spec.nodes):
        if node.name in needed:
            needed.update(node.inputs)
    return {n.name for n in spec.nodes} - needed


@pytest.mark.parametrize("mode, kernel, stride, padding, ceil_mode, include_pad", [
    ("max", 3, 2, 0, True, True), ("max", 3, 2, 1, False, True), ("max", 3, 2, 1, True, True),
    ("max", 2, 2, 0, True, True), ("max", 3, 1, 1, True, True), ("max", (3, 2), (2, 1), (1, 0),
                                                                True, True),
    ("avg", 3, 2, 1, True, True), ("avg", 3, 2, 1, True, False), ("avg", 3, 1, 1, False, True),
    ("avg", 3, 1, 1, False, False), ("avg", 5, 3, 0, False, True), ("avg", 2, 2, 1, True, False),
    ("avg", 3, 2, 0, True, True), ("avg", 4, 3, 2, True, True),
])
@pytest.mark.parametrize("size", [7, 8, 11])
def test_pooling_matches_pytorch(mode, kernel, stride, padding, ceil_mode, include_pad, size):
    x = _images(2, 3, size, seed=size) - 1.0  # mostly negative: a zero padding would show in max
    t = torch.from_numpy(x)
    if mode == "max":
        ref = F.max_pool2d(t, kernel, stride, padding, ceil_mode=ceil_mode)
    else:
        ref = F.avg_pool2d(t, kernel, stride, padding, ceil_mode=ceil_mode,
                           count_include_pad=include_pad)
    got = SpecPool2D(mode, kernel, stride, padding, ceil_mode, include_pad)(to_nhwc(x))
    np.testing.assert_allclose(np.asarray(got), ref.numpy().transpose(0, 2, 3, 1), atol=1e-6)


@pytest.mark.parametrize("size, out", [(7, 7), (12, 6), (13, 6), (1, 6), (5, 7), (6, 4)])
def test_adaptive_pool_matches_pytorch(size, out):
    x = _images(2, 3, size)
    ref = F.adaptive_avg_pool2d(torch.from_numpy(x), out).numpy().transpose(0, 2, 3, 1)
    got = AdaptiveAvgPool2D(out)(to_nhwc(x))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-6)


# --------------------------------------------------------------------------- training
def _aux_toy(num_classes=3):
    """A small graph with one auxiliary head, to train fast."""
    g = GraphBuilder("aux_toy", 3, num_classes, 16)
    x = g.act(g.bn(g.conv(INPUT, 8, 3, padding=1, name="c1"), name="bn1"), name="r1")
    a = g.dense(g.flatten(g.add(GlobalAvgPool(), x, name="aux.pool"), name="aux.flat"),
                num_classes, name="aux.fc")
    x = g.conv(x, 8, 3, stride=2, padding=1, name="c2")
    g.dense(g.flatten(g.add(GlobalAvgPool(), x, name="gap"), name="flat"), num_classes,
            name="fc")
    return g.build(aux_outputs=(a,), aux_weight=0.3)


def test_loss_is_main_plus_weighted_aux_plus_torch_style_weight_decay(tmp_path):
    cfg = compose_cfg("backend=keras", "hardware=cpu", "optim=sgd", "optim.weight_decay=0.01",
                      "trainer.max_epochs=1", "data.batch_size=8", "trainer.progress_bar=false")
    b = KerasBackend(cfg, tmp_path)
    spec = _aux_toy()
    data = make_synthetic(24, 3, 16, 3, seed=0)
    train, val = data.split(Preprocess(16, 3, (0.5,) * 3, (0.5,) * 3), 0.25, seed=0)
    model = b.build(spec, 16)
    report = b.train(model, train, val)
    assert report.history[0]["train_loss"] > 0 and math.isfinite(report.history[0]["val_loss"])
    x, y = val.batch(0, 6)
    main, aux = model(to_nhwc(x), training=False)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    l2 = sum(float(np.sum(np.square(w))) for w in model.trainable_weights)
    want = float(ce(y, main)) + 0.3 * float(ce(y, aux)) + 0.01 / 2 * l2
    got = float(model.compute_loss(x=to_nhwc(x), y=(y, y), y_pred=[main, aux]))
    assert got == pytest.approx(want, rel=1e-5)


def test_seeded_training_is_bitwise_reproducible_in_process(tmp_path):
    """Batch norm, dropout, grouped and depthwise convolutions, two epochs, twice."""
    cfg = compose_cfg("backend=keras", "hardware=cpu", "optim=sgd", "trainer.max_epochs=2",
                      "data.batch_size=8", "trainer.progress_bar=false")
    data = make_synthetic(40, 5, 32, 3, seed=1)
    weights = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        b = KerasBackend(cfg, tmp_path / run)
        train, val = data.split(Preprocess(32, 3, (0.5,) * 3, (0.5,) * 3), 0.2, seed=cfg.seed)
        model = b.build(toy_spec(), 32)
        b.train(model, train, val)
        weights.append(model.get_weights())
    assert all(np.array_equal(u, v) for u, v in zip(*weights))


def test_train_step_uses_no_global_tf_seed(tmp_path, monkeypatch):
    """Exact resume re-seeds only Python, NumPy and the Dropout ``SeedGenerator`` states each
    epoch: that is enough only while no op of the compiled step draws from TensorFlow's global
    seed (a stateful random op), and training never calls ``tf.random.set_seed``, which would
    clear TensorFlow's kernel cache and re-instantiate the compiled step every epoch."""
    from runners.keras.backend import tf
    cfg = compose_cfg("backend=keras", "hardware=cpu", "optim=sgd", "trainer.max_epochs=2",
                      "data.batch_size=8", "trainer.progress_bar=false")
    b = KerasBackend(cfg, tmp_path)
    train, val = make_synthetic(40, 5, 32, 3, seed=1).split(
        Preprocess(32, 3, (0.5,) * 3, (0.5,) * 3), 0.2, seed=cfg.seed)
    model = b.build(toy_spec(), 32)  # has a Dropout layer
    seeded = []
    monkeypatch.setattr(tf.random, "set_seed", seeded.append)
    b.train(model, train, val)
    assert seeded == []
    spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32), tf.TensorSpec((None,), tf.int64))
    graph = tf.function(lambda x, y: model.train_step((x, y))).get_concrete_function(
        *spec).graph.as_graph_def()
    nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
    random_ops = {n.op for n in nodes if any(w in n.op for w in (
        "Random", "Multinomial", "TruncatedNormal", "Shuffle", "Gamma", "Poisson"))}
    assert random_ops and all(op.startswith("Stateless") for op in random_ops), random_ops
    assert not [n.name for n in nodes if n.attr["seed"].i or n.attr["seed2"].i]


@pytest.mark.parametrize("options", [[], ["backend.jit_compile=true"]], ids=["graph", "xla"])
def test_divergence_names_the_first_non_finite_step(tmp_path, monkeypatch, options):
    """The step comes from the compiled step's own record, read at the epoch's end; a per-batch
    host read of Keras' running loss (installed here only, as a reference, with one batch per
    compiled call) finds the same, and so does the default of several batches per call."""
    train, val = make_synthetic(40, 5, 32, 3, seed=1).split(
        Preprocess(32, 3, (0.5,) * 3, (0.5,) * 3), 0.2, seed=0)
    messages = []
    for per_call in ("backend.steps_per_execution=1", "backend.steps_per_execution=16"):
        cfg = compose_cfg("backend=keras", "hardware=cpu", "optim=sgd", "optim.lr=1e4",
                          "trainer.max_epochs=3", "data.batch_size=8",
                          "trainer.progress_bar=false", per_call, *options)
        running = []
        monkeypatch.setattr(EpochCallback, "on_train_batch_end",
                            lambda self, batch, logs=None: running.append(float(logs["loss"])))
        (tmp_path / per_call).mkdir()
        b = KerasBackend(cfg, tmp_path / per_call)
        with pytest.raises(TrainingDiverged) as err:
            b.train(b.build(toy_spec(), 32), train, val)
        messages.append(str(err.value))
        if len(messages) == 1:
            step = next(i for i, v in enumerate(running) if not math.isfinite(v)) + 1
            assert 1 < step <= 4
        assert CheckpointDir(tmp_path / per_call).latest() is None  # nothing saved for it
    assert messages == [f"training diverged: train_loss is nan at step {step} (epoch 1, batch "
                        f"{step} of 4); lower optim.lr"] * 2


@pytest.mark.parametrize("wanted, steps, used", [(1, 7, 1), (4, 45, 3), (8, 16, 8), (100, 5, 5)])
def test_steps_per_execution_never_straddles_two_epochs(wanted, steps, used):
    assert divisor_at_most(wanted, steps) == used


_GLIBC = (getattr(os, "confstr", lambda _: "")("CS_GNU_LIBC_VERSION") or "").startswith("glibc")


@pytest.mark.skipif(not _GLIBC, reason="tunes glibc's malloc")
def test_generator_threads_reuse_freed_pages(tmp_path):
    """With ``backend.malloc_top_pad_mb`` (default 8), arrays the tf.data generator allocates and
    frees batch after batch reuse their pages: no page fault per 4 KiB (glibc's per-thread
    heaps otherwise hand the memory back at every free). In a fresh process: the setting is
    process-wide."""
    code = (
        "import resource, numpy as np\n"
        "from runners.keras.data import tf, tune_malloc\n"
        "assert tune_malloc(8)\n"
        "faults = []\n"
        "def gen():\n"
        "    start = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt\n"
        "    for _ in range(64):\n"
        "        a = np.ones((32, 1, 32, 32), np.float32)\n"  # a LeNet-5 batch: 128 KiB
        "        b = np.ascontiguousarray(a.transpose(0, 2, 3, 1))\n"
        "        del a, b\n"
        "    faults.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - start) / 64)\n"
        "    yield 0\n"
        "list(tf.data.Dataset.from_generator(gen, output_signature=tf.TensorSpec((), tf.int32)))\n"
        "print(faults[0])\n")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) < 8  # untuned (glibc 2.36): 33, a fresh 128 KiB


def test_malloc_tuning_option_is_checked():
    """The option's rule is declared (runners/keras/__init__.py) and checked by the app before
    the backend is created."""
    with pytest.raises(ConfigError, match="backend.malloc_top_pad_mb"):
        validate(compose_cfg("backend=keras", "hardware=cpu", "backend.malloc_top_pad_mb=lots"))


# --------------------------------------------------------------------------- 6. input pipeline
def test_input_pipeline_follows_the_data_layers_epoch_order(backend):
    train, _ = load_digits().split(Preprocess(32, 1, (0.5,), (0.5,)), 0.2, seed=3)
    bs, seed = backend.cfg.data.batch_size, backend.cfg.seed
    per_epoch = math.ceil(len(train) / bs)
    ds = backend.input_pipeline(train, shuffle=True, epochs=2)
    assert len(ds) == 2 * per_epoch
    batches = list(ds.take(per_epoch + 1).as_numpy_iterator())
    for epoch, (x, y) in ((0, batches[0]), (1, batches[per_epoch])):
        want_x, want_y = train.take(epoch_order(len(train), seed, epoch)[:bs], epoch)
        np.testing.assert_array_equal(x, want_x.transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(y, want_y)
    assert len(batches[per_epoch - 1][1]) == len(train) - (per_epoch - 1) * bs  # last, partial
    x, _ = next(iter(backend.input_pipeline(train, shuffle=False, limit=2)))
    np.testing.assert_array_equal(x.numpy(), to_nhwc(train.batch(0, bs)[0]))
    assert len(backend.input_pipeline(train, shuffle=False, limit=2)) == 2
    resumed = backend.input_pipeline(train, shuffle=True, epochs=3, limit=2, start=2)
    assert len(resumed) == 2  # epoch 2 only: what a run resumed after epoch 2 of 3 trains
    x, y = next(iter(resumed))
    want_x, want_y = train.take(epoch_order(len(train), seed, 2)[:bs], 2)
    np.testing.assert_array_equal(x.numpy(), to_nhwc(want_x))
    np.testing.assert_array_equal(y.numpy(), want_y)


@pytest.mark.parametrize("chunk_batches", [1, 3, 1000])
@pytest.mark.parametrize("start, epochs, limit", [(0, 2, None), (2, 4, None), (1, 3, 5)])
def test_input_pipeline_batches_are_the_data_layers_batches(backend, monkeypatch, chunk_batches,
                                                            start, epochs, limit):
    """Every batch, bit for bit, is ``split.take`` of that batch's indices in
    ``epoch_order`` with that epoch's augmentation, whatever the generator's chunk size (one
    batch, a few, all), also when starting at a later epoch; an epoch's last, smaller batch is
    never merged with the next epoch's."""
    import runners.keras.data as kr
    pre = Preprocess(32, 3, (0.5,) * 3, (0.25,) * 3,
                     augment=Augment(random_crop_padding=4, horizontal_flip=True))
    train, _ = load_digits().split(pre, 0.2, seed=3, limit=250)  # 200 images: 7 batches of 32
    assert train.augments
    monkeypatch.setattr(kr, "CHUNK_BYTES", chunk_batches * 32 * 3 * 32 * 32 * 4)
    _check_batches(backend, train, True, start, epochs, limit)


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("start, epochs, limit", [(0, 1, None), (1, 3, None), (0, 2, 3)])
def test_validation_pipeline_batches_are_the_data_layers_batches(backend, monkeypatch, in_memory,
                                                                 start, epochs, limit):
    """An unshuffled split without augmentation (validation) gives the same batches held in
    memory (small) as from the generator (over ``IN_MEMORY_BYTES``)."""
    import runners.keras.data as kr
    _, val = load_digits().split(Preprocess(32, 1, (0.5,), (0.5,)), 0.2, seed=3)  # 359 images
    assert not val.augments
    monkeypatch.setattr(kr, "IN_MEMORY_BYTES", kr.IN_MEMORY_BYTES if in_memory else 0)
    monkeypatch.setattr(kr.tf.data.Dataset, "from_generator", _refuse if in_memory
                        else kr.tf.data.Dataset.from_generator)
    _check_batches(backend, val, False, start, epochs, limit)


def _refuse(*args, **kwargs):
    raise AssertionError("a small validation split is held in memory")


def _check_batches(backend, split, shuffle, start, epochs, limit):
    bs, seed = backend.cfg.data.batch_size, backend.cfg.seed
    per_epoch = math.ceil(len(split) / bs) if limit is None else limit
    ds = backend.input_pipeline(split, shuffle=shuffle, epochs=epochs, limit=limit, start=start)
    assert len(ds) == (epochs - start) * per_epoch
    assert ds.element_spec[0].shape.as_list()[1:] == [32, 32, split.preprocess.channels]
    got = list(ds.as_numpy_iterator())
    want = []
    for epoch in range(start, epochs):
        order = epoch_order(len(split), seed, epoch, shuffle)
        for b in range(per_epoch):
            x, y = split.take(order[b * bs:(b + 1) * bs], epoch)
            want.append((to_nhwc(x), y))
    assert len(got) == len(want)
    for (x, y), (want_x, want_y) in zip(got, want):
        assert x.dtype == np.float32 and y.dtype == np.int64
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)
    if limit is None:  # the last, smaller batch of each epoch is its own batch
        rest = len(split) - (per_epoch - 1) * bs
        assert [len(y) for _, y in got[:per_epoch]] == [bs] * (per_epoch - 1) + [rest]


# --------------------------------------------------------------------------- inference, files


@pytest.mark.parametrize("filename", ["model.keras", "model.weights.h5"])
def test_checkpoint_round_trip(backend, tmp_path, filename):
    spec, x = toy_spec(), _images(2, 3, 32, seed=1)
    model = backend.build(spec, 32)
    path = tmp_path / filename
    backend.save_checkpoint(model, path)
    other = backend.build(spec, 32)  # seeded: starts equal to model, so change it
    fc = other.get_layer("fc")
    fc.set_weights([np.zeros_like(w) for w in fc.get_weights()])
    assert not np.allclose(backend.predict(model, x), backend.predict(other, x))
    backend.load_checkpoint(other, path)
    np.testing.assert_array_equal(backend.predict(model, x), backend.predict(other, x))
    with pytest.raises(ValueError, match=r"\.keras or \.weights\.h5"):
        backend.save_checkpoint(model, tmp_path / "weights.pt")


# --------------------------------------------------------------------------- resume, safe files
SGD_MOMENTUM = ("optim=sgd", "optim.momentum=0.9")


# a rate that changes within epochs but not with the run's length, so that a 1-epoch run is
# the first epoch of the 3-epoch run: half an epoch of warm-up, then x 0.8 every half epoch
SCHEDULE = ("optim.scheduler=step", "optim.warmup_epochs=0.5", "optim.step_epochs=0.5",
            "optim.gamma=0.8")


def _toy_run(tmp_path, name, *overrides, epochs=3):
    """A backend, model and splits for a short toy run (dropout, batch norm, ``SCHEDULE``;
    SGD with momentum unless ``overrides`` name another optimizer) in tmp_path/name."""
    optim = () if any(o.startswith("optim=") for o in overrides) else SGD_MOMENTUM
    cfg = compose_cfg("backend=keras", "hardware=cpu", *optim, *SCHEDULE,
                      "data.batch_size=8", "trainer.progress_bar=false",
                      f"trainer.max_epochs={epochs}", *overrides)
    (tmp_path / name).mkdir(exist_ok=True)
    b = KerasBackend(cfg, tmp_path / name)
    train, val = make_synthetic(40, 5, 32, 3, seed=1).split(
        Preprocess(32, 3, (0.5,) * 3, (0.5,) * 3), 0.2, seed=cfg.seed)
    return b, b.build(toy_spec(), 32), train, val


@pytest.mark.parametrize("options", [[], ["optim=adam", "backend.steps_per_execution=2",
                                          "backend.jit_compile=true"]],
                         ids=["sgd-momentum-steps", "adam-steps2-xla"])
def test_resume_continues_bitwise_like_an_uninterrupted_run(tmp_path, options):
    """Dropout masks, momentum/moments, step count, schedule and data order all continue."""
    b, model, train, val = _toy_run(tmp_path, "full", *options)
    report = b.train(model, train, val)
    assert report.checkpoint == tmp_path / "full/checkpoints/epoch-0003" / CHECKPOINT
    assert [p.name for p in (tmp_path / "full/checkpoints").iterdir()] == ["epoch-0003"]
    want = b.get_weights(model)

    b, model, train, val = _toy_run(tmp_path, "cut", *options, epochs=1)
    b.train(model, train, val)
    first = CheckpointDir(tmp_path / "cut").latest()
    assert first.epoch == 1 and first.state["backend"] == "keras"
    # the run's last epoch: the .keras archive beside the training state
    assert sorted(p.name for p in first.path.iterdir()) == [FULL_MODEL, CHECKPOINT, "state.json"]
    b, model, train, val = _toy_run(tmp_path, "cut", *options)
    report = b.train(model, train, val, first)
    assert [row["epoch"] for row in report.history] == [2, 3]
    assert model.optimizer.iterations.numpy() == 3 * 4  # the step count went on, not restarted
    got = b.get_weights(model)
    assert all(np.array_equal(want[k], got[k]) for k in want)

    done = CheckpointDir(tmp_path / "cut").latest()  # after the last epoch: nothing to train
    b, model, train, val = _toy_run(tmp_path, "cut", *options)
    report = b.train(model, train, val, done)
    assert report.history == [] and report.checkpoint == done.file(CHECKPOINT)
    got = b.get_weights(model)
    assert all(np.array_equal(want[k], got[k]) for k in want)


def _lambda_model(marker):
    """A saved Keras model whose Lambda layer writes ``marker`` whenever it runs."""
    touch = lambda x, path=str(marker): (open(path, "w").close(), x)[1]
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(touch, name="evil")(inputs)
    return keras.Model(inputs, keras.layers.Dense(5)(keras.layers.Flatten()(x)))


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _malicious(kind, good, path, marker):
    """A crafted ``.keras`` file at ``path``: ``good`` is a genuine checkpoint to start from."""
    with zipfile.ZipFile(good) as z:
        files = {n: z.read(n) for n in z.namelist()}
    if kind == "lambda":
        _lambda_model(marker).save(path)
        marker.unlink()  # building the model ran it once; loading must not
        return
    if kind == "pickled-weights":  # Keras' npz weights, an object array holding a pickle
        import io
        buf = io.BytesIO()
        np.save(buf, np.array([_Touch(str(marker))], dtype=object), allow_pickle=True)
        del files["model.weights.h5"]
        files["model.weights.npz"] = buf.getvalue()
    elif kind == "foreign-function":  # an activation that names os.system
        config = json.loads(files["config.json"])
        layer = next(lay for lay in config["config"]["layers"] if lay["name"] == "stem.relu")
        layer["config"]["activation"] = {"module": "os", "class_name": "function",
                                         "config": "system", "registered_name": "system"}
        files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)


@pytest.mark.parametrize("kind", ["lambda", "pickled-weights", "foreign-function"])
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, kind):
    b, model, train, val = _toy_run(tmp_path, "good", epochs=1)
    good = b.train(model, train, val).checkpoint.parent / FULL_MODEL
    marker = tmp_path / "code-ran"
    # a folder as earlier versions wrote it: the .keras archive alone, which a resume loads
    folder = tmp_path / "run/checkpoints/epoch-0001"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text('{"epoch": 1, "backend": "keras"}')
    _malicious(kind, good, folder / FULL_MODEL, marker)
    assert not marker.exists()

    with pytest.raises(CheckpointError) as err:
        b.load_checkpoint(model, folder / FULL_MODEL)
    message = str(err.value)
    assert message.startswith(f"{folder / FULL_MODEL}: refused: ") and "\n" not in message
    assert message.endswith("; only checkpoints written by cnnzoo are loaded")

    b, model, train, val = _toy_run(tmp_path, "run", epochs=2)  # the resume path
    with pytest.raises(CheckpointError, match="refused: "):
        b.train(model, train, val, CheckpointDir(tmp_path / "run").latest())
    assert not marker.exists()


def test_an_interrupted_checkpoint_write_keeps_the_previous_epoch(tmp_path, monkeypatch):
    """The second epoch's ``save_weights`` writes half a file and fails (a full disk, a kill)."""
    real_save, calls = keras.Model.save_weights, []

    def half_then_fail(model, path, *args, **kwargs):
        calls.append(path)
        real_save(model, path, *args, **kwargs)
        if len(calls) == 2:
            data = path.read_bytes()
            path.write_bytes(data[:len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(keras.Model, "save_weights", half_then_fail)
    b, model, train, val = _toy_run(tmp_path, "run", epochs=3)
    with pytest.raises(OSError, match="No space left"):
        b.train(model, train, val)
    root = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001"]  # no stray temp folder
    kept = CheckpointDir(tmp_path / "run").latest()
    assert kept.epoch == 1
    # not the run's last epoch: the training state alone, no .keras archive
    assert sorted(p.name for p in kept.path.iterdir()) == [CHECKPOINT, "state.json"]
    monkeypatch.undo()
    b.load_checkpoint(model, kept.file(CHECKPOINT))
    b, model, train, val = _toy_run(tmp_path, "run", epochs=2)
    assert [r["epoch"] for r in b.train(model, train, val, kept).history] == [2]


def test_a_checkpoint_of_an_earlier_version_resumes_from_its_keras_archive(tmp_path):
    """Folders written before the weights file existed hold ``model.keras`` alone (weights
    and optimizer state): a resume from one continues exactly."""
    b, model, train, val = _toy_run(tmp_path, "full", epochs=2)
    b.train(model, train, val)
    want = b.get_weights(model)

    b, model, train, val = _toy_run(tmp_path, "old", epochs=1)
    b.train(model, train, val)
    folder = CheckpointDir(tmp_path / "old").latest().path
    (folder / CHECKPOINT).unlink()  # what an earlier version left: the archive alone
    state = json.loads((folder / "state.json").read_text())
    state["files"] = {k: v for k, v in state["files"].items() if k == FULL_MODEL}
    (folder / "state.json").write_text(json.dumps(state))
    b, model, train, val = _toy_run(tmp_path, "old", epochs=2)
    report = b.train(model, train, val, CheckpointDir(tmp_path / "old").latest())
    assert [row["epoch"] for row in report.history] == [2]
    got = b.get_weights(model)
    assert all(np.array_equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("lift, opset", [(None, 18), (1, 18), (500, 13), (1, 21)],
                         ids=["model.export", "all-lifted", "some-lifted-opset13",
                              "all-lifted-opset21"])
def test_export_names_layout_and_dynamic_batch(tmp_path, lift, opset):
    cfg = compose_cfg("backend=keras", "hardware=cpu", "export.batch_sizes=[1,4]",
                      f"backend.onnx_lift_min_size={'null' if lift is None else lift}",
                      f"export.opset={opset}")
    b = KerasBackend(cfg, tmp_path)
    model = b.build(toy_spec(), 32)
    images = _images(8, 3, 32, seed=2)
    block, reports = export_and_verify(b, model, images, cfg.export, tmp_path / "model.onnx",
                                       {"arch": "toy"})
    assert reports[0].passed and block["passed"] is True and block["opset"] == opset
    assert block["max_abs_diff"] < 1e-5
    m = onnx.load(str(tmp_path / "model.onnx"))
    assert [i.name for i in m.graph.input] == ["input"]  # lifted weights are initializers
    assert [o.name for o in m.graph.output] == ["logits"]
    assert {p.key: p.value for p in m.metadata_props}["layout"] == "NHWC"
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 3, 7):
        out = sess.run(None, {"input": to_nhwc(images[:n])})[0]
        np.testing.assert_allclose(out, b.predict(model, images[:n]), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- 3-5. end to end
@pytest.mark.slow
def test_default_job_trains_exports_and_verifies(cli):
    r = cli("backend=keras")
    assert r.returncode == 0, r.stderr[-2000:]
    res = r.results()
    assert (res["arch"], res["backend"], res["status"]) == ("lenet5", "keras", "ok")
    assert res["params"] == res["native_params"] == 61_706
    assert res["metrics"]["val_acc"] >= 0.95
    assert res["export"]["passed"] is True and res["export"]["opset"] == 18
    assert res["export"]["max_abs_diff"] <= 1e-4
    assert res["hardware"]["replicas"] == 1 and res["hardware"]["device"] == "/cpu:0"
    assert res["versions"]["keras"].startswith("3.")
    rows = list(csv.DictReader((r.run_dir / "metrics.csv").open()))
    assert [int(row["epoch"]) for row in rows] == list(range(1, 11))
    assert float(rows[-1]["val_acc"]) == pytest.approx(res["metrics"]["val_acc"], abs=1e-5)
    assert res["checkpoint"] == "checkpoints/epoch-0010/model.weights.h5"
    assert [p.name for p in (r.run_dir / "checkpoints").iterdir()] == ["epoch-0010"]
    whole = keras.models.load_model(r.run_dir / "checkpoints/epoch-0010" / FULL_MODEL)
    assert whole.count_params() == 61_706  # the whole model, as Keras users load one
    assert len(res["weights_sha256"]) == 64
    assert list((r.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    meta = {p.key: p.value for p in onnx.load(str(r.run_dir / "model.onnx")).metadata_props}
    assert meta["backend"] == "keras" and meta["layout"] == "NHWC"
    assert not r.frameworks & {"torch", "mxnet", "pytorch_lightning"}
    assert {"tensorflow", "keras"} <= r.frameworks
    # TensorFlow's C++ start-up lines never reach the terminal
    assert "absl::InitializeLog" not in r.stderr and "oneDNN" not in r.stderr


@pytest.mark.slow
def test_summary_reports_native_params(cli):
    r = cli("task=summary", "arch=resnext50", "backend=keras")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.results()["native_params"] == r.results()["params"] == 25_028_904
    assert "native keras parameters: 25,028,904" in r.stdout
    assert not r.frameworks & {"torch", "mxnet", "pytorch_lightning"}


@pytest.mark.slow
def test_cli_refuses_to_resume_from_a_checkpoint_with_code(tmp_path):
    """The same command on a run directory holding a crafted checkpoint: exit code 2, one
    error line, the code never ran."""
    marker, run_dir = tmp_path / "code-ran", tmp_path / "run"
    folder = run_dir / "checkpoints/epoch-0001"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text('{"epoch": 1, "backend": "keras"}')
    _lambda_model(marker).save(folder / FULL_MODEL)
    marker.unlink()
    r = run_cli(run_dir, "backend=keras", "trainer.max_epochs=2", "export.enabled=false")
    assert r.returncode == 2 and len(r.error_lines) == 1, r.stderr[-2000:]
    assert "refused: its config holds a Lambda" in r.error_lines[0]
    assert "Traceback" not in r.stderr and not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset", [["hardware=cpu", "hardware.devices=2"], ["hardware=ddp_cpu"]],
                         ids=["devices2", "ddp_cpu"])
def test_two_cpu_devices_train_under_mirrored_strategy(cli, preset):
    r = cli("backend=keras", *preset, "trainer.max_epochs=1", "export.batch_sizes=[1,8]",
            "export.num_images=16")
    assert r.returncode == 0, r.stderr[-2000:]
    hw = r.results()["hardware"]
    assert hw["devices"] == 2 and hw["replicas"] == 2 and hw["distribution"] == "MirroredStrategy"
    assert hw["replica_devices"] == ["/cpu:0", "/cpu:1"]
    assert r.results()["export"]["passed"] is True
    assert "MirroredStrategy over 2 logical CPU devices" in r.stdout
    ddp_note = "hardware.strategy=ddp is a torch concept" in r.stdout
    assert ddp_note == ("hardware=ddp_cpu" in preset)


@pytest.mark.slow
def test_several_batches_per_call_over_devices_is_refused(cli):
    r = cli("backend=keras", "hardware=cpu", "hardware.devices=2",
            "backend.steps_per_execution=4", "trainer.max_epochs=1")
    assert r.returncode == 2 and len(r.error_lines) == 1, r.stderr[-2000:]
    assert r.error_lines[0] == ("error: backend.steps_per_execution=4 does not work when keras "
                                "trains over 2 devices (tf.distribute): use auto or 1")


@pytest.mark.slow
def test_missing_gpu_is_one_clear_error(cli):
    r = cli("backend=keras", "hardware=gpu")
    assert r.returncode == 2 and len(r.error_lines) == 1
    assert r.error_lines[0].startswith("error: hardware.accelerator=gpu")
    assert "Traceback" not in r.stderr
