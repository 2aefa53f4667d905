"""Canonical weights <-> Flax: the torch backend's weights, set into the Flax model of every
architecture, give torch's logits on the same images (the proof that kernels, dense rows,
grouped and depthwise convolutions and batch-norm statistics land where they belong); the
round trip is exact; bad weights are refused before anything changes."""
import pytest

# cnnzoo's own `pytest` collects these too; without JAX there is nothing to test
pytest.importorskip("jax", reason="the flax plugin's framework is not installed")
import numpy as np
import torch
from cnnzoo_flax.model import PARAMS, build_model
from cnnzoo_flax.weights import get_weights, set_weights
from flax_helpers import images

import architectures
from cnnzoo.app.crosscheck import randomize_batch_norm
from cnnzoo.conformance import toy_spec
from cnnzoo.core.errors import WeightsError
from cnnzoo.core.weights import expected_shapes
from runners.torch.model import SpecModule
from runners.torch.weights import get_weights as torch_weights
from runners.torch.weights import set_weights as set_torch_weights

RTOL = 1e-4  # of the largest logit


def randomized_torch(spec, size, seed=0) -> SpecModule:
    """A torch model in eval mode whose batch norms have non-trivial statistics and affine
    (``randomize_batch_norm``, as task=verify makes them)."""
    torch.manual_seed(seed)
    net = SpecModule(spec, size).eval()
    set_torch_weights(net, randomize_batch_norm(torch_weights(net), seed))
    return net


@pytest.mark.parametrize("name, size", [
    ("toy", 17),                                  # grouped, depthwise, excl.-pad avg pool
    ("lenet5", 32),
    ("alexnet", 63),                              # adaptive pool from 1x1 up to 6x6
    ("vgg16", 32), ("vgg19", 32),                 # 25088-wide flatten (c, h, w) order
    ("inception_v1", 15), ("inception_v1", 32),   # ceil-mode max pools over the edge
    ("inception_v3", 75),                         # avg pools with count_include_pad=True
    ("inception_v4", 75),                         # avg pools with count_include_pad=False
    ("inception_resnet_v2", 75),                  # scaled residual branches
    ("resnet50", 32),
    ("resnext50", 32),                            # grouped 3x3 convolutions
    ("xception", 32),                             # depthwise convolutions, padded max pools
])
def test_torch_weights_give_torchs_logits(name, size):
    spec = toy_spec() if name == "toy" else architectures.build_spec(name, num_classes=7)
    net = randomized_torch(spec, size)
    x = images(4, spec.in_channels, size)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    model = build_model(spec, size, seed=0)
    set_weights(model, torch_weights(net))
    got = model.predict(x)
    err = float(np.abs(got - want).max()) / float(np.abs(want).max())
    print(f"{name}@{size}: max |flax - torch| / max |torch| = {err:.2g}")
    assert got.shape == want.shape and err <= RTOL, f"{name}@{size}: {err:.3g}"
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("name", architectures.list_archs())
def test_round_trip_is_exact(name):
    spec = architectures.build_spec(name, num_classes=7)
    size = spec.min_input_size()
    model = build_model(spec, size, seed=0)
    shapes = expected_shapes(spec, size)
    assert {k: v.shape for k, v in get_weights(model).items()} == shapes
    rng = np.random.default_rng(1)
    new = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    set_weights(model, new)
    got = get_weights(model)
    assert all(np.array_equal(got[k], new[k]) and got[k].dtype == np.float32 for k in new)
    got[next(iter(got))][...] = 0  # copies: the model keeps its values
    assert all(np.array_equal(v, new[k]) for k, v in get_weights(model).items())


def test_native_layouts():
    """OIHW -> HWIO for plain, grouped and depthwise kernels; (out, in) -> (in, out) dense."""
    spec = toy_spec()
    model = build_model(spec, 32, seed=0)
    w = {k: np.random.default_rng(2).standard_normal(v.shape).astype(np.float32)
         for k, v in get_weights(model).items()}
    set_weights(model, w)
    p = model.variables[PARAMS]
    for node in ("stem.conv", "res.grouped", "sep.depthwise"):
        assert np.array_equal(p[node]["kernel"], w[f"{node}/weight"].transpose(2, 3, 1, 0))
    assert p["sep.depthwise"]["kernel"].shape == (3, 3, 1, 24)
    assert np.array_equal(p["fc"]["kernel"], w["fc/weight"].T)
    assert np.array_equal(model.variables["batch_stats"]["stem.bn"]["var"],
                          w["stem.bn/running_var"])


def test_bad_weights_are_refused_before_anything_changes():
    spec = toy_spec()
    model = build_model(spec, 32, seed=0)
    before = get_weights(model)
    bad = {k: np.zeros(v.shape, np.float32) for k, v in before.items()}
    bad.pop("fc/bias")
    bad["stem.conv/weight"] = np.zeros((16, 3, 2, 2), np.float32)
    bad["extra/weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError) as err:
        set_weights(model, bad)
    message = str(err.value)
    assert "missing 1 key(s): fc/bias" in message and "unexpected 1 key(s): extra/weight" in message
    assert "stem.conv/weight has shape (16, 3, 2, 2), expected (16, 3, 3, 3)" in message
    assert all(np.array_equal(v, before[k]) for k, v in get_weights(model).items())
