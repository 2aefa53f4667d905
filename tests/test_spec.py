"""The framework-neutral spec: shape inference, parameter and FLOP counts, errors."""
import pytest
from conftest import run_python, toy_spec

from architectures import ShapeError, build_spec
from architectures.spec import INPUT, AvgPool, Conv2d, GraphBuilder, MaxPool, output_shape, pair


def test_lenet5_layers_and_counts():
    a = build_spec("lenet5").analyze()
    assert a.params == 61_706
    shapes = {r.node.name: r.out_shape for r in a.layers}
    assert shapes["c1"] == (6, 28, 28) and shapes["s2"] == (6, 14, 14)
    assert shapes["c3"] == (16, 10, 10) and shapes["s4"] == (16, 5, 5)
    assert shapes["c5"] == (120, 1, 1) and shapes["flatten"] == (120,)
    assert shapes["f6"] == (84,) and shapes["output"] == (10,)
    assert a["c3"].params == 16 * 6 * 25 + 16
    # FLOPs = 2 x MACs of conv and dense layers only
    assert a["c1"].flops == 2 * 6 * 28 * 28 * 1 * 25
    assert a["f6"].flops == 2 * 120 * 84
    assert a["s2"].flops == 0


def test_vgg16_counts_and_alias():
    spec = build_spec("vgg")
    assert spec.name == "vgg16"
    a = spec.analyze()
    assert a.params == 138_357_544
    assert a.flops == 30_940_528_640  # 15.47 GMACs, the published figure
    assert a["pool5"].out_shape == (512, 7, 7)
    assert a["fc1"].in_shape == (25088,)
    assert a.layers[-1].out_shape == (1000,)


def test_vgg16_small_input_keeps_the_classifier():
    a = build_spec("vgg16", num_classes=10).analyze(32)
    assert a["pool5"].out_shape == (512, 1, 1)
    assert a["avgpool"].out_shape == (512, 7, 7)
    assert a.params == 138_357_544 - 4096 * 990 - 990


@pytest.mark.parametrize("name, minimum", [("lenet5", 32), ("vgg16", 32)])
def test_min_input_size(name, minimum):
    spec = build_spec(name)
    assert spec.min_input_size() == minimum
    spec.analyze(minimum)
    with pytest.raises(ShapeError):
        spec.analyze(minimum - 1)


def test_too_small_input_names_layer_and_minimum():
    with pytest.raises(ShapeError) as err:
        build_spec("lenet5").check_input_size(20)
    msg = str(err.value)
    assert "\n" not in msg
    assert "'c5'" in msg and "input_size >= 32" in msg


@pytest.mark.parametrize("size, k, s, p, ceil, expected", [
    (224, 7, 2, 3, False, 112),   # ResNet stem
    (112, 3, 2, 1, False, 56),    # ResNet max-pool
    (112, 3, 2, 0, True, 56),     # GoogLeNet ceil-mode pool: ceil(109/2)+1
    (112, 3, 2, 0, False, 55),
    (299, 3, 2, 0, False, 149),   # Inception-v3 stem
    (6, 2, 2, 1, True, 4),        # ceil mode keeps a last window starting inside the input
    (5, 2, 2, 0, True, 3),
])
def test_window_formula(size, k, s, p, ceil, expected):
    layer = MaxPool(k, s, p, ceil_mode=ceil)
    assert output_shape(layer, [(3, size, size)]) == (3, expected, expected)


def test_ceil_mode_drops_window_starting_in_padding():
    # PyTorch rule: out = ceil((5 + 2 - 3) / 2) + 1 = 3, and the 3rd window starts at 4 < 5 + 1
    assert output_shape(AvgPool(3, 2, 1, ceil_mode=True), [(1, 5, 5)]) == (1, 3, 3)
    # out = ceil((4 + 2 - 2) / 3) + 1 = 3, but the 3rd window would start at 6 >= 4 + 1: dropped
    assert output_shape(MaxPool(2, 3, 1, ceil_mode=True), [(1, 4, 4)]) == (1, 2, 2)


def test_spec_expresses_branches_residuals_grouped_and_separable():
    a = toy_spec().analyze(32)
    assert a["mixed"].out_shape == (24, 16, 16)
    assert a["res.add"].out_shape == (24, 16, 16)
    assert a["res.grouped"].params == 24 * (24 // 4) * 9
    assert a["sep.depthwise"].params == 24 * 1 * 9
    assert a["sep.depthwise"].flops == 2 * 24 * 16 * 16 * 9
    assert a["pool"].out_shape == (32, 8, 8)
    assert a["fc"].out_shape == (5,)
    expected = (16 * 3 * 9 + 32 + (8 * 16 + 8) + (8 * 16 + 8) + (12 * 8 * 3 + 12) + (4 * 16 + 4)
                + 24 * 6 * 9 + 24 * 9 + 32 * 24 + 32 * 5 + 5)
    assert a.params == expected


def test_mismatched_branches_and_bad_groups_are_shape_errors():
    g = GraphBuilder("bad", 3, 2, 8)
    a = g.conv(INPUT, 4, 3)
    b = g.conv(INPUT, 4, 1)
    g.concat(a, b, name="cat")
    with pytest.raises(ShapeError, match="'cat'"):
        g.build().analyze()
    with pytest.raises(ShapeError, match="groups=2"):
        output_shape(Conv2d(4, 3, groups=2), [(3, 8, 8)])


def test_builder_rejects_duplicate_and_unknown_names():
    g = GraphBuilder("b", 3, 2, 8)
    g.conv(INPUT, 4, 3, name="c")
    with pytest.raises(ValueError, match="duplicate"):
        g.conv(INPUT, 4, 3, name="c")
    with pytest.raises(ValueError, match="unknown"):
        g.conv("nope", 4, 3)


def test_unknown_architecture_lists_choices():
    with pytest.raises(KeyError) as err:
        build_spec("resnet9000")
    assert "lenet5" in err.value.args[0] and "vgg16" in err.value.args[0]


def test_spec_imports_no_framework():
    code = ("import sys, architectures; architectures.build_spec('vgg16').analyze(); "
            "print(sorted(m for m in ('numpy', 'torch', 'tensorflow', 'mxnet') if m in sys.modules))")
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_pair():
    assert pair(3) == (3, 3) and pair((1, 7)) == (1, 7)
