"""Caffe models read into canonical weights (``export.caffe.reader.caffe_weights``): cnnzoo's own
files round trip exactly (Caffe -> cnnzoo -> Caffe, byte for byte), BVLC-style files in the old
V1 format are paired with the spec by order and compute the same logits in OpenCV, and every
refusal is one line naming the first difference."""
from pathlib import Path

import numpy as np
import pytest
from conftest import toy_spec
from google.protobuf import text_format
from test_verify_matrix import random_weights

from architectures import build_spec
from architectures import spec as S
from architectures.spec import INPUT, AdaptiveAvgPool, GraphBuilder, Scale
from cnnzoo.core.errors import WeightsError
from cnnzoo.core.weights import check_weights, expected_shapes
from export.caffe import cnnzoo_caffe_pb2 as pb
from export.caffe import files
from export.caffe.files import field_header
from export.caffe.reader import caffe_weights
from export.caffe.writer import build_net

V1 = pb.V1LayerParameter
ONE_LINE = "\n"


def write_cnnzoo(spec, weights, size, folder: Path) -> dict[str, Path]:
    """cnnzoo's own Caffe files (the export's writer)."""
    folder.mkdir(parents=True, exist_ok=True)
    net, layers = build_net(spec, weights, size)
    return files.write(folder, net, layers, {"output": spec.output}, "test")


def pooling_spec() -> S.Spec:
    """The pooling cases Caffe's rounding and divisor make hard (floor where Caffe would ceil,
    ceil mode, a window PyTorch drops, padding left out of an average), dilation, a constant
    scale, tanh, sigmoid and an adaptive pooling that is a plain one (4x4 -> 2x2)."""
    g = GraphBuilder("pools", 3, 4, 24)
    x = g.act(g.conv(INPUT, 8, 3, name="conv"), "tanh", name="tanh")             # 22x22
    x = g.max_pool(x, 3, 2, 1, name="floor_differs")
    x = g.max_pool(x, 2, 2, ceil_mode=True, name="ceil")
    x = g.max_pool(x, 1, 3, ceil_mode=True, name="outside")
    x = g.add(Scale(0.5), g.conv(x, 8, 3, padding=2, name="dilated_input"), name="halved")
    x = g.avg_pool(x, 3, 1, 1, count_include_pad=False, name="real_pixels_only")  # 4x4
    x = g.add(S.Conv2d(8, 3, padding=2, dilation=2), x, name="dilated")
    x = g.act(g.bn(x, name="bn"), "sigmoid", name="sigmoid")
    x = g.add(AdaptiveAvgPool(2), x, name="adaptive")
    g.dense(g.flatten(x, name="flatten"), 4, name="fc")
    return g.build()


def folded_spec() -> S.Spec:
    """An adaptive pooling cnnzoo's Caffe export folds into the dense layer (2x2 -> 3x3)."""
    g = GraphBuilder("folded", 3, 4, 8)
    x = g.max_pool(g.conv(INPUT, 4, 3, 2, 1, name="conv"), 2, name="pool")     # 8 -> 4 -> 2
    x = g.add(AdaptiveAvgPool(3), x, name="adaptive")
    g.dense(g.flatten(x, name="flatten"), 4, name="fc")
    return g.build()


def one_line(err) -> str:
    text = str(err.value)
    assert ONE_LINE not in text, text
    return text


# --------------------------------------------------------------------------- round trips
ROUND_TRIPS = [
    ("lenet5", {}, 32),
    ("resnet50", {}, 32),
    ("inception_v1", {"aux_logits": True}, 32),  # auxiliary classifiers: not in Caffe files
    ("xception", {}, 64),  # at 32 its last depthwise convolution sees one pixel (refused below)
    ("toy", {}, 32),     # grouped, depthwise, (1, 3) kernels, Concat, Add, Scale, padding-free avg
    ("pools", {}, 24),
]


@pytest.mark.parametrize("arch, options, size", ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS])
def test_cnnzoo_caffe_files_round_trip_exactly(tmp_path, arch, options, size):
    spec = {"toy": toy_spec, "pools": pooling_spec}.get(
        arch, lambda: build_spec(arch, num_classes=10, **options))()
    weights = random_weights(spec, size)
    first = write_cnnzoo(spec, weights, size, tmp_path / "first")
    got = caffe_weights(first["prototxt"], first["caffemodel"], spec, size)
    check_weights(got, expected_shapes(spec, size))
    aux = {k for k in weights if k.split(".")[0] in ("aux1", "aux2")}
    assert bool(aux) == (arch == "inception_v1")
    for k in weights.keys() - aux:
        assert got[k].dtype == np.float32 and np.array_equal(got[k], weights[k]), k
    for k in aux:  # initial values: He-normal kernels, zero biases, batch norm's identity
        if k.endswith("running_var"):
            assert np.all(got[k] == 1)
        elif k.endswith(("bias", "running_mean")):
            assert np.all(got[k] == 0)
    second = write_cnnzoo(spec, got, size, tmp_path / "second")
    assert second["caffemodel"].read_bytes() == first["caffemodel"].read_bytes()
    assert second["prototxt"].read_bytes() == first["prototxt"].read_bytes()


# --------------------------------------------------------------------------- BVLC-style files
def legacy_blob_head(array: np.ndarray) -> bytes:
    """A BlobProto as BVLC's 2014 model zoo wrote it, up to its data: a 4-D num/channels/height/
    width header (an InnerProduct weight is 1 x 1 x out x in, a bias 1 x 1 x 1 x out) and the tag
    and length of its packed floats, which follow."""
    dims = [1] * (4 - array.ndim) + list(array.shape)
    head = pb.BlobProto(num=dims[0], channels=dims[1], height=dims[2], width=dims[3])
    data = pb.BlobProto.DESCRIPTOR.fields_by_name["data"].number
    return head.SerializeToString() + field_header(data, 4 * array.size)


def v1_caffemodel(path: Path, name: str, layers: list[tuple[str, int, list[np.ndarray]]]):
    """A binary NetParameter of V1 ``layers`` (name, V1 type, float32 blobs), streamed straight
    from numpy so that VGG's 138 million floats are neither converted nor copied."""
    blobs_field = V1.DESCRIPTOR.fields_by_name["blobs"].number
    layers_field = pb.NetParameter.DESCRIPTOR.fields_by_name["layers"].number
    with open(path, "wb") as f:
        f.write(pb.NetParameter(name=name).SerializeToString())
        for lname, ltype, blobs in layers:
            heads = [legacy_blob_head(b) for b in blobs]
            fields = [field_header(blobs_field, len(h) + 4 * b.size)
                      for h, b in zip(heads, blobs)]
            body = V1(name=lname, type=ltype).SerializeToString()
            size = len(body) + sum(len(t) + len(h) + 4 * b.size
                                   for t, h, b in zip(fields, heads, blobs))
            f.write(field_header(layers_field, size) + body)
            for tag, head, blob in zip(fields, heads, blobs):
                f.write(tag + head)
                f.write(memoryview(np.ascontiguousarray(blob, dtype="<f4")).cast("B"))


def v1_prototxt(name: str, shape, layers: list[str]) -> str:
    """A deploy file in the old format: top-level input and input_dim, V1 ``layers``."""
    head = f'name: "{name}"\ninput: "data"\n' + "".join(f"input_dim: {d}\n" for d in shape)
    return head + "".join(f"layers {{\n{body}\n}}\n" for body in layers)


def _layer(name, kind, bottom, top, params=""):
    return f'  name: "{name}"\n  type: {kind}\n  bottom: "{bottom}"\n  top: "{top}"\n{params}'


def _conv(name, bottom, out, kernel, pad=0):
    return _layer(name, "CONVOLUTION", bottom, name, f"  convolution_param {{ num_output: {out} "
                  f"kernel_size: {kernel} pad: {pad} stride: 1 }}")


def _ip(name, bottom, out):
    return _layer(name, "INNER_PRODUCT", bottom, name,
                  f"  inner_product_param {{ num_output: {out} }}")


def _pool(name, bottom, kind, k, s):
    return _layer(name, "POOLING", bottom, name,
                  f"  pooling_param {{ pool: {kind} kernel_size: {k} stride: {s} }}")


def bvlc_lenet(tmp_path: Path, rng, stride: int = 1) -> tuple[Path, Path]:
    """LeNet-5 as a BVLC-era Caffe user would write it: other names than the spec's (conv1,
    pool1, ip1..), in-place TanH and Dropout, a final SOFTMAX, V1 layers and legacy blobs."""
    layers = [_conv("conv1", "data", 6, 5), _layer("tanh1", "TANH", "conv1", "conv1"),
              _pool("pool1", "conv1", "AVE", 2, 2),
              _conv("conv2", "pool1", 16, 5).replace("stride: 1", f"stride: {stride}"),
              _layer("tanh2", "TANH", "conv2", "conv2"), _pool("pool2", "conv2", "AVE", 2, 2),
              _conv("conv3", "pool2", 120, 5), _layer("tanh3", "TANH", "conv3", "conv3"),
              _ip("ip1", "conv3", 84), _layer("tanh4", "TANH", "ip1", "ip1"),
              _layer("drop1", "DROPOUT", "ip1", "ip1", "  dropout_param { dropout_ratio: 0.5 }"),
              _ip("ip2", "ip1", 10), _layer("prob", "SOFTMAX", "ip2", "prob")]
    prototxt = tmp_path / "lenet_deploy.prototxt"
    prototxt.write_text(v1_prototxt("LeNet", (1, 1, 32, 32), layers))
    shapes = [("conv1", (6, 1, 5, 5)), ("conv2", (16, 6, 5, 5)), ("conv3", (120, 16, 5, 5)),
              ("ip1", (84, 120)), ("ip2", (10, 84))]
    blobs = [(n, V1.INNER_PRODUCT if n.startswith("ip") else V1.CONVOLUTION,
              [rng.normal(0, 3 / np.sqrt(np.prod(s[1:])), s).astype(np.float32),
               rng.normal(0, 0.1, s[0]).astype(np.float32)]) for n, s in shapes]
    v1_caffemodel(prototxt.with_suffix(".caffemodel"), "LeNet", blobs)
    return prototxt, prototxt.with_suffix(".caffemodel")


def he_normal(rng, shape) -> np.ndarray:
    out = rng.standard_normal(shape, np.float32)
    out *= np.float32(np.sqrt(2 / np.prod(shape[1:])))
    return out


def bvlc_vgg16(tmp_path: Path, rng, classes: int) -> tuple[Path, Path]:
    """VGG-16 as BVLC's model zoo has it (VGG_ILSVRC_16_layers_deploy.prototxt): conv1_1 ..
    conv5_3, fc6, fc7, fc8 in V1 layers, in-place ReLU and Dropout, a final SOFTMAX."""
    layers, blobs, bottom, c_in = [], [], "data", 3
    for block, (width, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], 1):
        for i in range(1, convs + 1):
            name = f"conv{block}_{i}"
            layers += [_conv(name, bottom, width, 3, 1),
                       _layer(f"relu{block}_{i}", "RELU", name, name)]
            blobs.append((name, V1.CONVOLUTION, [he_normal(rng, (width, c_in, 3, 3)),
                                                 np.zeros(width, np.float32)]))
            bottom, c_in = name, width
        layers.append(_pool(f"pool{block}", bottom, "MAX", 2, 2))
        bottom = f"pool{block}"
    for n, (name, width, fan_in) in enumerate([("fc6", 4096, 25088), ("fc7", 4096, 4096),
                                               ("fc8", classes, 4096)], 6):
        layers.append(_ip(name, bottom, width))
        if name != "fc8":
            layers += [_layer(f"relu{n}", "RELU", name, name),
                       _layer(f"drop{n}", "DROPOUT", name, name)]
        blobs.append((name, V1.INNER_PRODUCT, [he_normal(rng, (width, fan_in)),
                                               rng.normal(0, 0.1, width).astype(np.float32)]))
        bottom = name
    layers.append(_layer("prob", "SOFTMAX", "fc8", "prob"))
    prototxt = tmp_path / "VGG_ILSVRC_16_layers_deploy.prototxt"
    prototxt.write_text(v1_prototxt("VGG_ILSVRC_16_layers", (1, 3, 224, 224), layers))
    v1_caffemodel(prototxt.with_suffix(".caffemodel"), "VGG_ILSVRC_16_layers", blobs)
    return prototxt, prototxt.with_suffix(".caffemodel")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def same_in_opencv(bvlc_prototxt: Path, spec, weights, size: int, tmp_path: Path, n: int):
    """OpenCV runs the BVLC file (probabilities) and cnnzoo's file from the imported weights
    (logits) on the same images: the same log-probabilities."""
    from export.runtimes import load

    pytest.importorskip("cv2", reason="OpenCV runs the Caffe files: pip install -e '.[deploy]'")
    ours = write_cnnzoo(spec, weights, size, tmp_path / "cnnzoo")
    images = np.random.default_rng(1).standard_normal(
        (n, spec.in_channels, size, size)).astype(np.float32)
    probs = load("opencv", bvlc_prototxt, threads=2).run(images)
    logits = load("opencv", ours["prototxt"], threads=2).run(images)
    assert logits.shape == probs.shape == (n, spec.num_classes)
    np.testing.assert_allclose(np.log(probs), log_softmax(logits), atol=2e-4)
    assert np.array_equal(probs.argmax(1), logits.argmax(1))
    assert logits.std() > 0.5  # the comparison is not between near-uniform outputs


def test_bvlc_v1_lenet_is_paired_by_order_and_computes_the_same_in_opencv(tmp_path):
    prototxt, caffemodel = bvlc_lenet(tmp_path, np.random.default_rng(0))
    spec = build_spec("lenet5", num_classes=10, in_channels=1)
    weights = caffe_weights(prototxt, caffemodel, spec, 32)
    check_weights(weights, expected_shapes(spec, 32))
    model = files.read_caffemodel(caffemodel)
    conv2, ip1 = (files.blob_array(next(m for m in model.layers if m.name == n).blobs[0])
                  for n in ("conv2", "ip1"))
    assert ip1.shape == (1, 1, 84, 120)  # the legacy header, read as the spec's (84, 120)
    assert np.array_equal(weights["c3/weight"], conv2)
    assert np.array_equal(weights["f6/weight"], ip1.reshape(84, 120))
    same_in_opencv(prototxt, spec, weights, 32, tmp_path, 4)


def test_bvlc_v1_vgg16_is_paired_by_order_and_computes_the_same_in_opencv(tmp_path):
    """BVLC's VGG-16 (V1, legacy blob headers; the spec's adaptive pooling is the identity at
    224): conv1_1 .. fc8 are the spec's conv1_1 .. fc3."""
    prototxt, caffemodel = bvlc_vgg16(tmp_path, np.random.default_rng(0), 10)
    spec = build_spec("vgg16", num_classes=10)
    weights = caffe_weights(prototxt, caffemodel, spec, 224)
    assert weights["fc1/weight"].shape == (4096, 25088) and weights["fc3/bias"].shape == (10,)
    same_in_opencv(prototxt, spec, weights, 224, tmp_path, 2)


def test_bvlc_batch_norm_statistics_are_divided_by_their_scale_factor(tmp_path):
    """Caffe's BatchNorm blobs: mean and variance times a factor (third blob; 0: zero
    statistics); no Scale: gamma 1, beta 0; a Scale without bias: beta 0. OpenCV agrees."""
    rng = np.random.default_rng(0)
    g = GraphBuilder("bn", 3, 5, 8)
    x = g.act(g.bn(g.conv(INPUT, 4, 3, padding=1, bias=False, name="c1"), name="b1"), name="r1")
    x = g.act(g.bn(g.conv(x, 6, 3, padding=1, name="c2"), name="b2"), name="r2")
    x = g.bn(g.conv(x, 6, 1, name="c3"), name="b3")
    g.dense(g.flatten(g.add(S.GlobalAvgPool(), x, name="gap"), name="flat"), 5, name="fc")
    spec = g.build()
    text = """name: "bvlc_bn"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "bn2" }
layer { name: "scale2" type: "Scale" bottom: "bn2" top: "bn2" scale_param { bias_term: false } }
layer { name: "relu2" type: "ReLU" bottom: "bn2" top: "bn2" }
layer { name: "conv3" type: "Convolution" bottom: "bn2" top: "conv3"
        convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "bn3" type: "BatchNorm" bottom: "conv3" top: "conv3" }
layer { name: "scale3" type: "Scale" bottom: "conv3" top: "conv3" scale_param { bias_term: true } }
layer { name: "pool" type: "Pooling" bottom: "conv3" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
    prototxt = tmp_path / "bn.prototxt"
    prototxt.write_text(text)

    def f32(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    mean1, var1, mean2, var2 = f32(4), np.abs(f32(4)) + 0.5, f32(6), np.abs(f32(6)) + 0.5
    gamma2, gamma3, beta3 = f32(6), f32(6, scale=0.003), f32(6)  # bn3: x / sqrt(eps)
    model = pb.NetParameter(name="bvlc_bn")
    for name, kind, arrays in [
            ("conv1", "Convolution", [f32(4, 3, 3, 3, scale=0.3)]),
            ("bn1", "BatchNorm", [mean1 * 4, var1 * 4, np.array([4.0], np.float32)]),
            ("conv2", "Convolution", [f32(6, 4, 3, 3, scale=0.3), f32(6)]),
            ("bn2", "BatchNorm", [mean2, var2, np.array([1.0], np.float32)]),
            ("scale2", "Scale", [gamma2]),
            ("conv3", "Convolution", [f32(6, 6, 1, 1, scale=0.5), f32(6)]),
            ("bn3", "BatchNorm", [f32(6), f32(6), np.array([0.0], np.float32)]),
            ("scale3", "Scale", [gamma3, beta3]),
            ("fc", "InnerProduct", [f32(5, 6), f32(5)])]:
        layer = model.layer.add(name=name, type=kind)
        for a in arrays:
            layer.blobs.add(shape=pb.BlobShape(dim=a.shape), data=a.ravel())
    caffemodel = prototxt.with_suffix(".caffemodel")
    caffemodel.write_bytes(model.SerializeToString())

    w = caffe_weights(prototxt, caffemodel, spec, 8)
    np.testing.assert_allclose(w["b1/running_mean"], mean1, rtol=1e-6)
    np.testing.assert_allclose(w["b1/running_var"], var1, rtol=1e-6)
    assert np.all(w["b1/weight"] == 1) and np.all(w["b1/bias"] == 0)
    assert np.array_equal(w["b2/weight"], gamma2) and np.all(w["b2/bias"] == 0)
    assert np.all(w["b3/running_mean"] == 0) and np.all(w["b3/running_var"] == 0)
    assert np.array_equal(w["b3/weight"], gamma3) and np.array_equal(w["b3/bias"], beta3)
    same_in_opencv(prototxt, spec, w, 8, tmp_path, 3)


# --------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def lenet_files(tmp_path_factory):
    spec = build_spec("lenet5", num_classes=10, in_channels=1)
    folder = tmp_path_factory.mktemp("lenet")
    return spec, write_cnnzoo(spec, random_weights(spec, 32), 32, folder)


ALEXNET_V2 = """name: "CaffeNet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 227 dim: 227 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 96 kernel_size: 11 stride: 4 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
        lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
"""


@pytest.mark.parametrize("text, expected", [
    (ALEXNET_V2, ("Caffe layer 'norm1' is LRN (local response normalisation), which cnnzoo's "
                  "architectures do not have")),
    (v1_prototxt("CaffeNet", (1, 3, 227, 227), [
        _conv("conv1", "data", 96, 11).replace("stride: 1", "stride: 4"),
        _layer("norm1", "LRN", "conv1", "norm1", "  lrn_param { local_size: 5 }")]),
     ("Caffe layer 'norm1' is LRN (local response normalisation), which cnnzoo's architectures "
      "do not have")),
    (v1_prototxt("FCN", (1, 3, 227, 227), [
        _conv("conv1", "data", 96, 11),
        '  bottom: "conv1"\n  top: "upscore"\n  type: DECONVOLUTION\n  name: "upscore"']),
     ("Caffe layer 'upscore' is Deconvolution (a transposed convolution), which cnnzoo's "
      "architectures do not have")),
], ids=["lrn", "lrn-v1", "deconvolution-v1"])
def test_a_layer_the_spec_cannot_express_is_named(tmp_path, text, expected):
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(text)
    with pytest.raises(WeightsError) as err:
        caffe_weights(prototxt, tmp_path / "unused.caffemodel", build_spec("alexnet"), 227)
    assert one_line(err) == expected


def test_a_convolution_with_another_stride_is_the_first_difference(tmp_path):
    prototxt, caffemodel = bvlc_lenet(tmp_path, np.random.default_rng(0), stride=2)
    spec = build_spec("lenet5", num_classes=10, in_channels=1)
    with pytest.raises(WeightsError) as err:
        caffe_weights(prototxt, caffemodel, spec, 64)
    assert one_line(err) == ("Caffe layer 'conv2' (Convolution 5x5/2, 16 outputs) does not match "
                             "the spec's 'c3' (Conv2d 5x5/1, 16 outputs): stride 2 instead of 1")


def test_a_network_of_another_architecture_is_refused_at_its_first_difference(tmp_path):
    spec = build_spec("resnet50", num_classes=10)
    paths = write_cnnzoo(spec, random_weights(spec, 32), 32, tmp_path)
    # Caffe's own ResNet-50 puts the shortcut first: BVLC-style names, another order
    net = files.read_prototxt(paths["prototxt"])
    names = {"layer1.0.conv1": "res2a_branch2a", "layer1.0.downsample.0": "res2a_branch1"}
    for layer in net.layer:
        layer.name = names.get(layer.name, layer.name)
    order = [layer for layer in net.layer]
    i, j = (next(k for k, la in enumerate(order) if la.name == n)
            for n in ("res2a_branch2a", "res2a_branch1"))
    order.insert(i, order.pop(j))
    del net.layer[:]
    net.layer.extend(order)
    paths["prototxt"].write_text(text_format.MessageToString(net))
    with pytest.raises(WeightsError) as err:
        caffe_weights(paths["prototxt"], paths["caffemodel"], spec, 32)
    assert one_line(err).startswith(
        "Caffe layer 'res2a_branch1' (Convolution 1x1/1, 256 outputs) does not match the spec's "
        "'layer1.0.conv1' (Conv2d 1x1/1, 64 outputs): 256 outputs instead of 64")

    toy = toy_spec()
    with pytest.raises(WeightsError) as err:
        caffe_weights(paths["prototxt"], paths["caffemodel"], toy, 32)
    assert one_line(err) == (
        "Caffe layer 'conv1' (Convolution 7x7/2 p3, 64 outputs) does not match the spec's "
        "'stem.conv' (Conv2d 3x3/2 p1, 16 outputs): kernel 7 instead of 3")


def test_a_truncated_caffemodel_is_refused(tmp_path, lenet_files):
    spec, paths = lenet_files
    data = paths["caffemodel"].read_bytes()
    cut = tmp_path / "deploy.caffemodel"
    for size in (len(data) // 2, len(data) - 3):
        cut.write_bytes(data[:size])
        with pytest.raises(WeightsError) as err:
            caffe_weights(paths["prototxt"], cut, spec, 32)
        assert "deploy.caffemodel" in one_line(err)


def test_a_caffemodel_of_another_network_is_refused(tmp_path, lenet_files):
    spec, paths = lenet_files
    other = write_cnnzoo(toy_spec(), random_weights(toy_spec(), 32), 32, tmp_path / "toy")
    with pytest.raises(WeightsError) as err:
        caffe_weights(paths["prototxt"], other["caffemodel"], spec, 32)
    assert one_line(err) == ("deploy.caffemodel has no weights for Caffe layer 'c1' of "
                             "deploy.prototxt (the .caffemodel of another network?)")
    four = build_spec("lenet5", num_classes=4, in_channels=1)
    other = write_cnnzoo(four, random_weights(four, 32), 32, tmp_path / "four")
    with pytest.raises(WeightsError) as err:
        caffe_weights(paths["prototxt"], other["caffemodel"], spec, 32)
    assert one_line(err) == ("deploy.caffemodel holds a (4, 84) blob for Caffe layer 'output' "
                             "where deploy.prototxt (InnerProduct with bias) needs (10, 84) at "
                             "input size 32")


def test_a_file_that_is_not_a_network_is_refused(tmp_path, lenet_files):
    spec, paths = lenet_files
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "train_val.prototxt"\nbase_lr: 0.01\nmax_iter: 450000\n')
    json_file = tmp_path / "deploy.json"
    json_file.write_text('{"output": "output"}\n')
    for path, expected in [(solver, "holds no layers: it is not a Caffe network"),
                           (json_file, "cannot read the Caffe network"),
                           (paths["caffemodel"], "it is not text (a .caffemodel?)")]:
        with pytest.raises(WeightsError) as err:
            caffe_weights(path, paths["caffemodel"], spec, 32)
        assert expected in one_line(err)


def test_weights_written_at_another_input_size_name_it(lenet_files):
    spec, paths = lenet_files
    with pytest.raises(WeightsError) as err:
        caffe_weights(paths["prototxt"], paths["caffemodel"], spec, 36)
    assert one_line(err) == (
        "deploy.caffemodel holds a (84, 120) blob for Caffe layer 'f6' where deploy.prototxt "
        "(InnerProduct with bias) needs (84, 480) at input size 36; the network was written for "
        "input size 32: import at that size")


def test_a_folded_adaptive_pooling_cannot_be_unfolded(tmp_path):
    spec = folded_spec()
    paths = write_cnnzoo(spec, random_weights(spec, 8), 8, tmp_path)
    with pytest.raises(WeightsError) as err:
        caffe_weights(paths["prototxt"], paths["caffemodel"], spec, 8)
    assert one_line(err) == (
        "Caffe layer 'fc' (InnerProduct, 4 outputs) does not match the spec's 'fc' (Dense, 4 "
        "outputs): at input size 8 the spec's 'adaptive' (adaptive average pooling 2x2 -> 3x3) "
        "has no Caffe layer (cnnzoo's Caffe export folds such a pooling into the InnerProduct "
        "that reads it, which cannot be undone); import a model exported at an input size where "
        "that pooling is the identity or a plain pooling (e.g. 11)")


def test_a_depthwise_convolution_written_as_its_one_tap_cannot_be_restored(tmp_path):
    spec = build_spec("xception", num_classes=10)
    paths = write_cnnzoo(spec, random_weights(spec, 32), 32, tmp_path)
    with pytest.raises(WeightsError) as err:
        caffe_weights(paths["prototxt"], paths["caffemodel"], spec, 32)
    assert one_line(err) == (
        "Caffe layer 'conv3.conv1' (Convolution 1x1/1 g1024, 1024 outputs) does not match the "
        "spec's 'conv3.conv1' (Conv2d 3x3/1 p1 g1024, 1024 outputs): at input size 32 "
        "its input is one pixel, and cnnzoo's Caffe export keeps only the tap that sees it (a 1x1 "
        "convolution), which cannot be undone; import a model exported at an input size where "
        "that input is larger (e.g. 299)")


def test_pooling_and_batch_norm_eps_must_agree(tmp_path, lenet_files):
    spec, paths = lenet_files
    net = files.read_prototxt(paths["prototxt"])
    next(la for la in net.layer if la.name == "s4").pooling_param.pool = pb.PoolingParameter.MAX
    paths_pool = tmp_path / "deploy.prototxt"
    paths_pool.write_text(text_format.MessageToString(net))
    with pytest.raises(WeightsError) as err:
        caffe_weights(paths_pool, paths["caffemodel"], spec, 32)
    assert one_line(err) == (
        "Caffe layer 'c5' (Convolution 5x5/1, 120 outputs) does not match the spec's 'c5' "
        "(Conv2d 5x5/1, 120 outputs): before it, Caffe has 's4' (MaxPool 2x2/2 -> 5x5) where the "
        "spec has 's4' (AvgPool 2x2/2 -> 5x5)")

    toy = toy_spec()
    toy_paths = write_cnnzoo(toy, random_weights(toy, 32), 32, tmp_path / "toy")
    net = files.read_prototxt(toy_paths["prototxt"])
    next(la for la in net.layer if la.type == "BatchNorm").batch_norm_param.eps = 1e-5
    toy_paths["prototxt"].write_text(text_format.MessageToString(net))
    with pytest.raises(WeightsError) as err:
        caffe_weights(toy_paths["prototxt"], toy_paths["caffemodel"], toy, 32)
    assert one_line(err) == (
        "Caffe layer 'stem.bn/normalized' (BatchNorm eps 1e-05 + Scale) does not match the "
        "spec's 'stem.bn' (BatchNorm eps 0.001): eps 1e-05 instead of 0.001")
