"""The layer report (``export.layer_report``, ``verify.layers``): every spec node's output in
one backend against the reference's, the first node that differs named with its error and the
tolerance that would pass it. Proved on a planted difference: one batch norm with PyTorch's
epsilon (1e-5) where the spec says Keras' (1e-3), in every backend."""
import json

import numpy as np
import pytest
from conftest import run_cli

from architectures.spec import GraphBuilder
from cnnzoo.app.experiment import compose, make_backend
from cnnzoo.core.backend import usable_backends
from export.layer_report import compare_layers, node_diff

BACKENDS = usable_backends()


def small_net(eps2: float):
    """conv-bn-relu twice, pooled and classified; ``eps2``: the second batch norm's epsilon."""
    g = GraphBuilder("small", 3, 5, 16)
    x = g.act(g.bn(g.conv("input", 8, 3, padding=1, bias=False, name="c1"), eps=1e-3,
                   name="b1"), name="r1")
    x = g.act(g.bn(g.conv(x, 8, 3, padding=1, bias=False, name="c2"), eps=eps2, name="b2"),
              name="r2")
    x = g.flatten(g.max_pool(x, 2, name="pool"), name="flat")
    g.dense(x, 5, name="fc")
    return g.build()


def test_the_smallest_tolerances_named_are_the_ones_that_pass():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(4, 10)).astype(np.float32)
    a = b.copy()
    a[1, 3] += 0.02
    d = node_diff("x", a, b, atol=1e-4, rtol=1e-3)
    assert not d.passed and d.max_abs_diff == pytest.approx(0.02, rel=1e-3)
    assert node_diff("x", a, b, atol=d.min_atol * 1.0001, rtol=1e-3).passed
    assert not node_diff("x", a, b, atol=d.min_atol * 0.99, rtol=1e-3).passed
    assert node_diff("x", a, b, atol=1e-4, rtol=d.min_rtol * 1.0001).passed
    assert not node_diff("x", a, b, atol=1e-4, rtol=d.min_rtol * 0.99).passed
    assert not node_diff("x", a[:, :5], b, 1, 1).passed  # another shape never passes


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_wrong_batch_norm_epsilon_is_named_as_the_first_differing_layer(backend_name,
                                                                         tmp_path):
    cfg = compose(f"backend={backend_name}", "hardware=cpu")
    rng = np.random.default_rng(1)
    images = rng.normal(size=(4, 3, 16, 16)).astype(np.float32)
    outputs = []
    for eps2 in (1e-3, 1e-5):  # the spec's, and the planted mistake
        backend = make_backend(cfg, tmp_path)
        model = backend.build(small_net(eps2), 16)
        weights = backend.get_weights(model)
        if not outputs:  # the same weights in both, running variances small so eps matters
            weights.update({k: rng.uniform(1e-4, 1e-3, v.shape).astype(np.float32)
                            for k, v in weights.items() if k.endswith("running_var")})
            shared = weights
        backend.set_weights(model, shared)
        outputs.append(backend.node_outputs(model, images))
    order = [n.name for n in small_net(1e-3).nodes]
    assert sorted(outputs[0]) == sorted(order)  # every node, channels first
    assert outputs[0]["c1"].shape == (4, 8, 16, 16) and outputs[0]["flat"].shape == (4, 512)
    report = compare_layers(outputs[1], outputs[0], order, atol=1e-4, rtol=1e-3)
    assert [n.node for n in report.nodes if n.passed] == ["c1", "b1", "r1", "c2"]
    assert report.first_failure.node == "b2"
    line = report.line(f"{backend_name} (eps 1e-5)", "the spec")
    assert line.startswith(f"{backend_name} (eps 1e-5) vs the spec: first differing layer b2 "
                           "[4, 8, 16, 16]: max abs diff ")
    assert "it would pass with atol=" in line and "4 later layer(s) differ too" in line


def test_verify_layers_compares_every_layer_of_every_backend(tmp_path):
    r = run_cli(tmp_path / "run", "task=verify", "verify.layers=true", "verify.num_images=4")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "run/verification.json").read_text())["rows"]
    for row in rows:
        layers = row["layers_vs_reference"]
        if row["reference"]:
            assert layers is None
        else:
            assert layers["first_failure"] is None
            assert [n["node"] for n in layers["nodes"]][:4] == ["c1", "c1_act", "s2", "c3"]
            assert f"{row['backend']} vs torch: all {len(layers['nodes'])} layers within" in r.stdout
