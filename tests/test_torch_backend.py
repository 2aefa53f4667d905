"""The PyTorch backend builds exactly the spec, predicts, saves and loads weights."""
import numpy as np
import pytest
import torch

import architectures
from conftest import compose_cfg, toy_spec
from runners import available_backends, load_backend
from runners.torch_runner import TorchBackend


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


def test_predict_is_deterministic_inference(backend):
    model = backend.build(toy_spec(), 32)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    a, b = backend.predict(model, x), backend.predict(model, x)
    assert a.shape == (4, 5) and np.array_equal(a, b)  # dropout off, BN in eval mode


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


def test_backend_is_discovered_through_entry_points():
    assert "torch" in available_backends()
    assert load_backend("torch") is TorchBackend
    with pytest.raises(KeyError, match="installed backends: .*torch"):
        load_backend("caffe")


def test_third_party_backend_registers_by_installing_a_package(tmp_path, monkeypatch):
    """A distribution on sys.path with a cnnzoo.backends entry point is found and loaded."""
    (tmp_path / "mybackend.py").write_text(
        "from runners.torch_runner import TorchBackend\n"
        "class MyBackend(TorchBackend):\n    name = 'mine'\n")
    dist = tmp_path / "mybackend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mybackend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[cnnzoo.backends]\nmine = mybackend:MyBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "mine" in available_backends()
    assert load_backend("mine").name == "mine"


def test_auxiliary_classifiers_join_the_training_loss(monkeypatch):
    from runners.torch_runner import Classifier

    spec = architectures.build_spec("inception_v1", num_classes=4, aux_logits=True)
    cfg = compose_cfg("arch=inception_v1")
    net = TorchBackend(cfg, ".").build(spec, 32)
    clf = Classifier(net, cfg.optim, 1, channels_last=False)
    monkeypatch.setattr(clf, "log", lambda *a, **k: None)  # no Trainer attached here
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    net.train()
    torch.manual_seed(0)  # same dropout masks in both forward passes
    main, aux1, aux2 = net(x)
    ce = torch.nn.functional.cross_entropy
    expected = ce(main, y) + 0.3 * (ce(aux1, y) + ce(aux2, y))
    torch.manual_seed(0)
    loss = clf.training_step((x, y), 0)
    assert torch.allclose(loss, expected) and loss > ce(main, y)


def test_input_pipeline_follows_the_data_layers_epoch_order(backend):
    from cnnzoo.data import Preprocess, epoch_order, load_digits

    train, _ = load_digits().split(Preprocess(32, 1, (0.5,), (0.5,)), 0.2, seed=3)
    loader = backend.input_pipeline(train, shuffle=True)
    bs = backend.cfg.data.batch_size
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch start
        x, y = next(iter(loader))
        want_x, want_y = train.take(epoch_order(len(train), backend.cfg.seed, epoch)[:bs])
        np.testing.assert_array_equal(x.numpy(), want_x)
        np.testing.assert_array_equal(y.numpy(), want_y)
    x, _ = next(iter(backend.input_pipeline(train, shuffle=False)))
    np.testing.assert_array_equal(x.numpy(), train.batch(0, bs)[0])
