"""Caffe's format: the writer's translation of the spec (pooling rounding, padding-free averages,
adaptive pooling, batch norm), the files, their verification in OpenCV's DNN module, and the
protobuf schema kept in step with its generated module."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_cfg, toy_spec
from omegaconf import OmegaConf

from architectures import spec as S
from architectures.spec import INPUT, AdaptiveAvgPool, GraphBuilder, Scale
from cnnzoo.core.errors import ExportError
from export import export_caffe
from export.caffe import cnnzoo_caffe_pb2 as pb
from export.caffe import files
from export.caffe.writer import build_net, caffe_pool_size, pool_ceil_mode
from runners.torch.backend import TorchBackend

cv2 = pytest.importorskip("cv2", reason="OpenCV runs the Caffe files: pip install -e '.[deploy]'")
ROOT = Path(__file__).resolve().parents[1]
VERIFY = OmegaConf.create({"verify": True, "batch_sizes": [1, 5], "atol": 1e-4, "rtol": 1e-3,
                           "min_top1_agreement": 1.0})


def random_weights(backend, model, seed=0):
    """The model's own keys and shapes, every array drawn (running variances > 0)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, value in backend.get_weights(model).items():
        draw = rng.normal(0, 1 / np.sqrt(max(value[0].size, 1)), value.shape)
        out[key] = (np.abs(draw) + 0.5 if key.endswith("running_var") else draw).astype(np.float32)
    backend.set_weights(model, out)
    return out


@pytest.fixture(scope="module")
def torch_backend(tmp_path_factory):
    return TorchBackend(compose_cfg("hardware=cpu"), tmp_path_factory.mktemp("caffe"))


def pooling_spec() -> S.Spec:
    """Every pooling case Caffe's rounding and divisor make hard, plus Scale, tanh, sigmoid,
    dilation, and an adaptive pooling folded into the dense layer."""
    g = GraphBuilder("pools", 3, 4, 24)
    x = g.act(g.conv(INPUT, 8, 3, name="conv"), "tanh", name="tanh")             # 22x22
    x = g.max_pool(x, 3, 2, 1, name="floor_differs")      # floor 11, Caffe's ceil would give 12
    x = g.max_pool(x, 2, 2, ceil_mode=True, name="ceil")                          # 11 -> 6
    x = g.max_pool(x, 1, 3, ceil_mode=True, name="outside")  # ceil 2 windows; the 3rd would
    #                                                          start outside: PyTorch drops it
    x = g.add(Scale(0.5), g.conv(x, 8, 3, padding=2, name="dilated_input"), name="halved")
    x = g.avg_pool(x, 3, 1, 1, count_include_pad=False, name="real_pixels_only")  # 4x4
    x = g.add(S.Conv2d(8, 3, padding=2, dilation=2), x, name="dilated")
    x = g.act(x, "sigmoid", name="sigmoid")
    x = g.add(AdaptiveAvgPool(3), x, name="adaptive")     # 4x4 -> 3x3: folded into fc
    g.dense(g.flatten(x, name="flatten"), 4, name="fc")
    return g.build()


# --------------------------------------------------------------------------- pooling rules
@pytest.mark.parametrize("size, k, s, p, ceil_mode, expected", [
    (112, 3, 2, 1, False, False),  # ResNet's stem pool: Caffe's ceil gives 57, the spec 56
    (55, 3, 2, 0, False, True),    # sizes agree: Caffe's default, nothing written
    (56, 3, 2, 0, True, True),     # GoogLeNet's ceil-mode pools
    (5, 1, 3, 0, True, False),     # the last window would start outside the input
    (4, 2, 2, 0, False, True),
])
def test_the_rounding_chosen_gives_the_specs_windows(size, k, s, p, ceil_mode, expected):
    spec_out = S.window_count(size, k, s, p, ceil_mode=ceil_mode)
    ceil = pool_ceil_mode((spec_out, spec_out), (size, size), (k, k), (s, s), (p, p), "pool")
    assert ceil is expected
    assert caffe_pool_size(size, k, s, p, ceil) == spec_out


def test_the_window_outside_the_input_is_dropped_in_caffes_ceil_mode_only_with_padding():
    assert caffe_pool_size(5, 1, 3, 0, True) == 3      # Caffe keeps a window at 6 > 5
    assert S.window_count(5, 1, 3, 0, ceil_mode=True) == 2  # the spec (PyTorch) drops it
    assert caffe_pool_size(5, 2, 2, 1, True) == 3      # with padding Caffe drops it too


# --------------------------------------------------------------------------- in OpenCV
@pytest.mark.parametrize("make_spec, size", [(pooling_spec, 24), (toy_spec, 32)],
                         ids=["pooling-cases", "toy"])
def test_caffe_files_compute_the_native_model_in_opencv(torch_backend, make_spec, size,
                                                        tmp_path):
    spec = make_spec()
    model = torch_backend.build(spec, size)
    weights = random_weights(torch_backend, model)
    images = np.random.default_rng(1).standard_normal((10, 3, size, size)).astype(np.float32)
    block, reports = export_caffe(spec, size, weights, images,
                                  lambda x: torch_backend.predict(model, x), VERIFY, tmp_path,
                                  {"arch": spec.name, "backend": "torch", "class_names": list("abcde")})
    assert [r.runtime for r in reports] == ["opencv"]
    assert block["passed"] is True, reports[0].lines()
    assert block["max_abs_diff"] < 1e-5 and block["top1_agreement"] == 1.0
    assert [b["batch_size"] for b in block["runtimes"]["opencv"]["batches"]] == [1, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "deploy.caffemodel", "deploy.json", "deploy.prototxt"]


def one_pixel_spec() -> S.Spec:
    """Xception's exit flow at small inputs: a padded depthwise convolution of a 1x1 map."""
    g = GraphBuilder("one_pixel", 3, 4, 5)
    x = g.conv(INPUT, 16, 5, name="to_one_pixel")                                     # 1x1
    x = g.conv(x, 16, 3, padding=1, groups=16, bias=False, name="depthwise")
    g.dense(g.flatten(x, name="flatten"), 4, name="fc")
    return g.build()


def test_a_depthwise_convolution_of_one_pixel_keeps_the_tap_that_sees_it(torch_backend,
                                                                        tmp_path):
    """OpenCV 4.11 gets the padded 3x3 one wrong; the 1x1 tap is the same function."""
    spec = one_pixel_spec()
    model = torch_backend.build(spec, 5)
    weights = random_weights(torch_backend, model)
    images = np.random.default_rng(2).standard_normal((6, 3, 5, 5)).astype(np.float32)
    block, reports = export_caffe(spec, 5, weights, images,
                                  lambda x: torch_backend.predict(model, x), VERIFY, tmp_path,
                                  {"arch": spec.name})
    assert block["passed"] is True, reports[0].lines()
    net = files.read_prototxt(tmp_path / "deploy.prototxt")
    conv = next(layer for layer in net.layer if layer.name == "depthwise").convolution_param
    assert (conv.kernel_h, conv.kernel_w, conv.pad_h, conv.group) == (1, 1, 0, 16)


def test_prototxt_spells_floor_pooling_only_where_it_differs(torch_backend, tmp_path):
    spec = pooling_spec()
    weights = torch_backend.get_weights(torch_backend.build(spec, 24))
    net, _ = build_net(spec, weights, 24)
    floor = sorted(layer.name for layer in net.layer
                   if layer.type == "Pooling" and not layer.pooling_param.ceil_mode)
    assert floor == ["floor_differs", "outside"]
    by_name = {layer.name: layer for layer in net.layer}
    # count_include_pad=False: Caffe's average, then a per-position rescale named after the node
    assert by_name["real_pixels_only/padded_mean"].type == "Pooling"
    assert by_name["real_pixels_only"].type == "Scale"
    assert "adaptive" not in by_name and by_name["halved"].type == "Power"
    assert by_name["halved"].power_param.scale == 0.5


def test_files_say_what_runs_them_and_carry_classes_and_preprocessing(torch_backend, tmp_path):
    spec = toy_spec()
    model = torch_backend.build(spec, 32)
    images = np.zeros((2, 3, 32, 32), np.float32)
    meta = {"arch": "toy", "backend": "torch", "class_names": list("abcde"),
            "preprocess": {"resize": [32, 32], "channels": 3}}
    export_caffe(spec, 32, torch_backend.get_weights(model), images,
                 lambda x: torch_backend.predict(model, x), VERIFY, tmp_path, meta)
    text = (tmp_path / "deploy.prototxt").read_text()
    assert "cv2.dnn.readNetFromCaffe" in text and "round_mode: FLOOR" in text
    sidecar = files.read_sidecar(tmp_path / "deploy.prototxt")
    assert sidecar["class_names"] == list("abcde") and sidecar["output"] == "fc"
    assert sidecar["input"] == "data" and sidecar["layout"] == "NCHW"
    assert files.input_shape(files.read_prototxt(tmp_path / "deploy.prototxt")) == [1, 3, 32, 32]


def test_the_caffemodel_is_the_network_with_its_blobs(torch_backend):
    """The fast writer (blobs straight from numpy) gives the message protobuf itself builds."""
    spec = toy_spec()
    weights = torch_backend.get_weights(torch_backend.build(spec, 32))
    net, layers = build_net(spec, weights, 32)
    expected = pb.NetParameter(name=net.name)
    for layer in layers:
        entry = expected.layer.add()
        entry.CopyFrom(layer.proto)
        for array in layer.blobs:
            blob = entry.blobs.add(data=array.ravel().tolist())
            blob.shape.dim.extend(array.shape)
    parsed = pb.NetParameter.FromString(files.caffemodel_bytes(net, layers))
    assert parsed == expected
    conv = next(layer for layer in parsed.layer if layer.name == "stem.conv")
    np.testing.assert_array_equal(files.blob_array(conv.blobs[0]), weights["stem.conv/weight"])


def test_adaptive_pooling_caffe_cannot_express_is_refused(torch_backend):
    g = GraphBuilder("adaptive_conv", 3, 4, 8)
    x = g.add(AdaptiveAvgPool(3), g.conv(INPUT, 4, 3, name="c"), name="adaptive")  # 6 -> 3: fine
    x = g.add(AdaptiveAvgPool(2), g.conv(x, 4, 1, name="c2"), name="odd")           # 3 -> 2
    g.dense(g.flatten(g.conv(x, 4, 1, name="c3"), name="f"), 4, name="fc")
    spec = g.build()
    weights = torch_backend.get_weights(torch_backend.build(spec, 8))
    with pytest.raises(ExportError, match="adaptive pooling 'odd' from 3x3 to 2x2") as err:
        build_net(spec, weights, 8)
    assert "\n" not in str(err.value)


def test_generated_module_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) compiles the .proto")
    folder = ROOT / "export" / "caffe"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{folder}",
                    f"--python_out={tmp_path}", str(folder / "cnnzoo_caffe.proto")], check=True)
    assert (tmp_path / "cnnzoo_caffe_pb2.py").read_text() == (
        folder / "cnnzoo_caffe_pb2.py").read_text(), "regenerate: see cnnzoo_caffe.proto's header"
