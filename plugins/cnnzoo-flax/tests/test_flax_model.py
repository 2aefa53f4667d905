"""The spec translated to Flax: parameter counts equal the spec's for every architecture, every
parametrised node is a scope of the variable trees, and the layers whose conventions differ
between frameworks (pooling with padding and ceil mode, adaptive pooling, batch norm's running
statistics) compute what PyTorch computes."""
import pytest

# cnnzoo's own `pytest` collects these too; without JAX there is nothing to test
pytest.importorskip("jax", reason="the flax plugin's framework is not installed")
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from cnnzoo_flax.model import (
    BATCH_STATS,
    PARAMS,
    BatchNorm,
    adaptive_avg_pool,
    build_model,
    pool,
    scope_name,
)
from flax_helpers import images

import architectures
from architectures import spec as S
from architectures.spec import INPUT, GraphBuilder
from cnnzoo.conformance import toy_spec


def nhwc(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1)


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name, num_classes, in_channels, options", [
    *[(name, None, None, {}) for name in architectures.list_archs()],
    ("inception_v1", None, None, {"aux_logits": True}),
    ("inception_v3", None, None, {"aux_logits": True}),
    ("vgg16", 10, 1, {}), ("resnext50", 7, 1, {}), ("xception", 2, 4, {}),
])
def test_native_params_equal_spec(name, num_classes, in_channels, options):
    """At the smallest input each accepts and at the canonical one (the dense layers of
    AlexNet and VGG see the same adaptive-pooled map at both)."""
    spec = architectures.build_spec(name, num_classes, in_channels, **options)
    for size in sorted({spec.min_input_size(), spec.input_size}):
        model = build_model(spec, size, seed=0)
        assert model.param_count() == spec.analyze(size).params, (name, size)


def test_every_parametrised_node_is_a_scope_with_native_shapes():
    spec = architectures.build_spec("inception_v1", 10, aux_logits=True)
    model = build_model(spec, 32, seed=0)
    parametrised = {n.name for n in spec.nodes
                    if isinstance(n.layer, (S.Conv2d, S.Dense, S.BatchNorm))}
    assert set(model.variables[PARAMS]) == parametrised  # auxiliary heads included
    conv = model.variables[PARAMS]["inception3a.branch2.1.conv"]
    assert conv["kernel"].shape == (3, 3, 96, 128)  # HWIO
    assert set(model.variables[BATCH_STATS]["inception3a.branch2.1.bn"]) == {"mean", "var"}
    assert model.variables[PARAMS]["aux1.fc2"]["kernel"].shape == (1024, 10)  # (in, out)


def test_toy_spec_has_grouped_and_depthwise_kernels():
    model = build_model(toy_spec(), 32, seed=0)
    assert model.variables[PARAMS]["res.grouped"]["kernel"].shape == (3, 3, 6, 24)
    assert model.variables[PARAMS]["sep.depthwise"]["kernel"].shape == (3, 3, 1, 24)
    assert model.param_count() == toy_spec().analyze(32).params


def test_weights_are_drawn_from_the_seed():
    spec = toy_spec()
    a, b, c = (build_model(spec, 32, seed=s).variables[PARAMS] for s in (1, 1, 2))
    leaves = [jax.tree_util.tree_leaves(t) for t in (a, b, c)]
    assert all(np.array_equal(x, y) for x, y in zip(leaves[0], leaves[1]))
    assert not np.array_equal(a["fc"]["kernel"], c["fc"]["kernel"])


def test_any_node_name_is_its_own_scope():
    """Linen refuses a top-level "params" scope in the params collection: it is escaped, and so
    is every name starting with the escape character, so names never collide."""
    g = GraphBuilder("names", 3, 4, 8)
    x = g.conv(INPUT, 4, 3, name="params")
    x = g.conv(x, 4, 1, name="_params")
    x = g.conv(x, 4, 1, name="batch_stats")
    x = g.conv(x, 4, 1, name="__call__")
    g.dense(g.flatten(x, name="name"), 4, name="variables")
    spec = g.build()
    model = build_model(spec, 8, seed=0)
    assert set(model.variables[PARAMS]) == {"_params", "__params", "batch_stats", "___call__",
                                            "variables"}
    assert [scope_name(n) for n in ("params", "_params", "x")] == ["_params", "__params", "x"]
    out = model.predict(images(2, 3, 8))
    assert out.shape == (2, 4) and np.isfinite(out).all()


def aux_toy(num_classes=5):
    """A small graph with two auxiliary heads, one behind a dropout."""
    g = GraphBuilder("aux_toy", 3, num_classes, 16)
    x = g.act(g.bn(g.conv(INPUT, 8, 3, padding=1, name="c1"), name="bn1"), name="r1")
    heads = [g.dense(g.dropout(g.flatten(g.add(S.GlobalAvgPool(), x, name=f"aux{i}.pool"),
                                         name=f"aux{i}.flat"), 0.5, name=f"aux{i}.drop"),
                     num_classes, name=f"aux{i}.fc") for i in (1, 2)]
    x = g.conv(x, 8, 3, stride=2, padding=1, name="c2")
    g.dense(g.flatten(g.add(S.GlobalAvgPool(), x, name="gap"), name="flat"), num_classes,
            name="fc")
    return g.build(aux_outputs=tuple(heads), aux_weight=0.3)


def test_training_mode_gives_the_auxiliary_logits_inference_the_logits_alone():
    model = build_model(aux_toy(), 16, seed=0)
    x = jnp.asarray(nhwc(images(2, 3, 16)))
    out, _ = model.module.apply(model.variables, x, train=True, mutable=[BATCH_STATS],
                                rngs={"dropout": jax.random.PRNGKey(0)})
    assert len(out) == 3 and all(o.shape == (2, 5) and o.dtype == jnp.float32 for o in out)
    assert model.module.apply(model.variables, x, train=False).shape == (2, 5)


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
    spec = toy_spec()
    full, half = (build_model(spec, 32, seed=0, dtype=d) for d in (jnp.float32, jnp.bfloat16))
    assert all(v.dtype == np.float32 for v in jax.tree_util.tree_leaves(half.variables))
    x = images(2, 3, 32)
    a, b = full.predict(x), half.predict(x)
    assert b.dtype == np.float32 and not np.array_equal(a, b)  # bf16 really computed
    assert np.abs(a - b).max() < 0.05 * max(1.0, np.abs(a).max())


# --------------------------------------------------------------------------- PyTorch's layers
@pytest.mark.parametrize("mode, kernel, stride, padding, ceil_mode, include_pad", [
    ("max", 3, 2, 0, True, True), ("max", 3, 2, 1, False, True), ("max", 3, 2, 1, True, True),
    ("max", 2, 2, 0, True, True), ("max", 3, 1, 1, True, True),
    ("max", (3, 2), (2, 1), (1, 0), True, True),
    ("avg", 3, 2, 1, True, True), ("avg", 3, 2, 1, True, False), ("avg", 3, 1, 1, False, True),
    ("avg", 3, 1, 1, False, False), ("avg", 5, 3, 0, False, True), ("avg", 2, 2, 1, True, False),
    ("avg", 3, 2, 0, True, True), ("avg", 4, 3, 2, True, True),
])
@pytest.mark.parametrize("size", [7, 8, 11])
def test_pooling_matches_pytorch(mode, kernel, stride, padding, ceil_mode, include_pad, size):
    x = images(2, 3, size, seed=size) - 1.0  # mostly negative: a zero padding would win a max
    t = torch.from_numpy(x)
    if mode == "max":
        layer = S.MaxPool(kernel, stride, padding, ceil_mode)
        ref = F.max_pool2d(t, kernel, stride, padding, ceil_mode=ceil_mode)
    else:
        layer = S.AvgPool(kernel, stride, padding, ceil_mode, include_pad)
        ref = F.avg_pool2d(t, kernel, stride, padding, ceil_mode=ceil_mode,
                           count_include_pad=include_pad)
    got = np.asarray(pool(jnp.asarray(nhwc(x)), layer))
    np.testing.assert_allclose(got, nhwc(ref.numpy()), atol=1e-6)


@pytest.mark.parametrize("size, out", [(7, 7), (12, 6), (13, 6), (1, 6), (5, 7), (6, 4)])
def test_adaptive_pool_matches_pytorch(size, out):
    x = images(2, 3, size)
    ref = F.adaptive_avg_pool2d(torch.from_numpy(x), out).numpy()
    got = np.asarray(adaptive_avg_pool(jnp.asarray(nhwc(x)), out))
    np.testing.assert_allclose(got, nhwc(ref), atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 4, 5, 5), (6, 4)])
def test_batch_norm_in_training_matches_pytorch(shape):
    """The normalised output (biased batch variance) and the running statistics after two
    steps (unbiased variance, momentum weighing the new statistic), 2-d and 4-d."""
    rng = np.random.default_rng(0)
    batches = [(3 * rng.standard_normal(shape) + 1).astype(np.float32) for _ in range(2)]
    ref = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(
        shape[1], eps=1e-3, momentum=0.3).train()
    bn = BatchNorm(1e-3, 0.3)
    to_last = (lambda a: nhwc(a)) if len(shape) == 4 else (lambda a: a)
    variables = bn.init(jax.random.PRNGKey(0), to_last(batches[0]), train=True)
    for x in batches:
        want = ref(torch.from_numpy(x)).detach().numpy()
        got, updates = bn.apply(variables, to_last(x), train=True, mutable=[BATCH_STATS])
        variables = {**variables, **updates}
        np.testing.assert_allclose(np.asarray(got), to_last(want), atol=1e-5)
    stats = variables[BATCH_STATS]
    np.testing.assert_allclose(stats["mean"], ref.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], ref.running_var.numpy(), rtol=1e-5)
