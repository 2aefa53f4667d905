"""int8 quantization (export/quantize.py) of a small real classifier of the embedded digits, in
real onnxruntime: a QDQ file with int8 weights that is smaller, as accurate, and as usable as
the fp32 model (its metadata, predict), a report that fails past its bound, and bad input.

The fp32 model is built with onnx.helper, its weights trained without a framework: Conv 3x3
(16 fixed random filters) -> Relu -> MaxPool 2 -> Flatten -> Gemm, the Gemm fitted to the
training images' features by ridge regression (about 98% validation accuracy)."""
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from cnnzoo.app.predict import predict
from cnnzoo.core.data.loading import load_digits
from cnnzoo.core.data.preprocess import Preprocess
from cnnzoo.core.errors import ExportError
from export import read_metadata
from export.quantize import compare_int8, int8_lines, quantize_int8

KEYS = {"fp32_acc", "int8_acc", "acc_drop_pp", "top1_agreement", "fp32_size_mb", "int8_size_mb",
        "size_ratio", "fp32_latency_ms", "int8_latency_ms", "speedup"}
FILTERS = 16


def _graph_model(nodes, inits, layout, out_name, out_dim, metadata):
    shape = ["batch", 8, 8, 1] if layout == "NHWC" else ["batch", 1, 8, 8]
    graph = helper.make_graph(
        nodes, "digits", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", out_dim])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              producer_name="cnnzoo-tests")
    model.ir_version = 10
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    return model


def build_model(path, train_x, train_y, layout, metadata):
    """Write the digits classifier (input in ``layout``) to ``path``."""
    rng = np.random.default_rng(0)
    he = np.sqrt(2 / 9)  # He initialisation of a 3x3 single-channel filter
    inits = {"conv_w": (rng.standard_normal((FILTERS, 1, 3, 3)) * he).astype(np.float32),
             "conv_b": (rng.standard_normal(FILTERS) * 0.1).astype(np.float32)}
    first = "input"
    nodes = []
    if layout == "NHWC":  # what a keras export starts with
        nodes.append(helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]))
        first = "nchw"
    nodes += [helper.make_node("Conv", [first, "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["conv"], ["relu"]),
              helper.make_node("MaxPool", ["relu"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Flatten", ["pool"], ["features"])]
    n_features = FILTERS * 4 * 4
    trunk = _graph_model(nodes, inits, layout, "features", n_features, {})
    sess = ort.InferenceSession(trunk.SerializeToString(), providers=["CPUExecutionProvider"])
    feats = sess.run(None, {"input": to_model_layout(train_x, layout)})[0].astype(np.float64)
    feats = np.hstack([feats, np.ones((len(feats), 1))])
    ridge = np.linalg.solve(feats.T @ feats + np.eye(n_features + 1),
                            feats.T @ np.eye(10)[train_y])
    inits["fc_w"] = ridge[:-1].T.astype(np.float32).copy()  # (10, features), Gemm transB=1
    inits["fc_b"] = ridge[-1].astype(np.float32)
    nodes.append(helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"], transB=1))
    onnx.save(_graph_model(nodes, inits, layout, "logits", 10, metadata), str(path))


def to_model_layout(x, layout):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x


@pytest.fixture(scope="module")
def digits():
    dataset = load_digits()
    preprocess = Preprocess(8, 1, (0.5,), (0.5,), "bilinear")
    train, val = dataset.split(preprocess, 0.2, seed=0)
    metadata = {"arch": "ridge-cnn", "class_names": json.dumps(dataset.classes),
                "preprocess": json.dumps(preprocess.metadata())}
    return train.batch(0, len(train)), val.batch(0, len(val)), val, metadata


@pytest.fixture(scope="module")
def fp32_models(digits, tmp_path_factory):
    """layout -> the fp32 model taking that layout (NHWC: as a keras export does)."""
    (train_x, train_y), _, _, metadata = digits
    models = {}
    for layout in ("NCHW", "NHWC"):
        models[layout] = tmp_path_factory.mktemp(f"quantize-{layout}") / "model.onnx"
        build_model(models[layout], train_x, train_y, layout, {**metadata, "layout": layout})
    return models


@pytest.fixture(scope="module", params=["NCHW", "NHWC"])
def quantized(request, digits, fp32_models):
    """(fp32 path, int8 path, compare_int8's block, layout): minmax calibration on 128
    training images, comparison on every validation image."""
    layout = request.param
    (train_x, _), (val_x, val_y), _, _ = digits
    fp32 = fp32_models[layout]
    int8 = fp32.with_name("model.int8.onnx")
    quantize_int8(fp32, int8, train_x[:128], layout=layout)
    block = compare_int8(fp32, int8, val_x, val_y, layout=layout, threads=1)
    return fp32, int8, block, layout


def test_int8_model_is_qdq_with_int8_weights(quantized):
    fp32, int8, _, _ = quantized
    model = onnx.load(str(int8))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert {"Conv", "Gemm"} <= set(ops)  # QDQ: the float ops stay, between DQ and Q
    inits = {t.name: t for t in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            weights[node.output[0]] = (inits[node.input[0]], numpy_helper.to_array(
                inits[node.input[1]]))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    for node, channels in ((conv, FILTERS), (gemm, 10)):
        tensor, scale = weights[node.input[1]]
        assert tensor.data_type == TensorProto.INT8
        assert scale.shape == (channels,)  # one scale per output channel
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert all(inits[n.input[2]].data_type in (TensorProto.UINT8, TensorProto.INT8)
               for n in quantize)  # 8-bit activations
    assert not any(t.data_type == TensorProto.FLOAT and t.name in ("conv_w", "fc_w")
                   for t in model.graph.initializer)  # no fp32 copy of the weights is left
    assert int8.stat().st_size < fp32.stat().st_size
    sess = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    shape = (3, 8, 8, 1) if quantized[3] == "NHWC" else (3, 1, 8, 8)
    assert sess.run(None, {"input": np.zeros(shape, np.float32)})[0].shape == (3, 10)


def test_accuracy_is_kept(quantized, digits):
    fp32, _, block, _ = quantized
    assert KEYS <= set(block)
    assert json.loads(json.dumps(block)) == block
    assert all(isinstance(block[k], float) for k in KEYS)
    assert block["images"] == len(digits[1][1])
    assert block["fp32_acc"] >= 0.95  # an easy task, well fitted: int8 has something to keep
    assert block["acc_drop_pp"] <= 1.0  # within MMDeploy's usual bound for int8
    assert block["acc_drop_pp"] == pytest.approx((block["fp32_acc"] - block["int8_acc"]) * 100)
    assert block["top1_agreement"] >= 0.98
    assert block["int8_size_mb"] < block["fp32_size_mb"]
    assert block["size_ratio"] == pytest.approx(block["fp32_size_mb"] / block["int8_size_mb"],
                                                rel=1e-3)
    assert block["fp32_size_mb"] == pytest.approx(fp32.stat().st_size / 1e6, abs=1e-6)
    assert block["fp32_latency_ms"] > 0 and block["int8_latency_ms"] > 0
    assert block["speedup"] == pytest.approx(block["fp32_latency_ms"] / block["int8_latency_ms"],
                                             rel=1e-2)


def test_metadata_survives(quantized):
    fp32, int8, _, layout = quantized
    before, after = read_metadata(fp32), read_metadata(int8)
    assert {k: after[k] for k in before} == before
    assert after["layout"] == layout
    info = json.loads(after["quantization"])
    assert info["calibration_method"] == "minmax" and info["calibration_images"] == 128
    assert sorted(p.name for p in int8.parent.iterdir()) == ["model.int8.onnx", "model.onnx"]


def test_predict_cli_runs_the_int8_model(quantized, digits, tmp_path):
    """``python -m cnnzoo.app.predict model.int8.onnx images/`` as on the fp32 model."""
    fp32, int8, _, _ = quantized
    val = digits[2]
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        raw = (val.raw([i])[0, :, :, 0] * 255).round().astype(np.uint8)
        Image.fromarray(raw, mode="L").save(folder / f"{i:02d}.png")
    proc = subprocess.run([sys.executable, "-m", "cnnzoo.app.predict", str(int8), str(folder),
                           "--json", "--top-k", "3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    int8_top = [r["top"][0]["class"] for r in json.loads(proc.stdout)]
    fp32_top = [r["top"][0]["class"] for r in predict(fp32, [str(folder)], top_k=3)]
    assert len(int8_top) == 12 and int8_top == fp32_top
    assert np.mean([int(c) for c in int8_top] == val.labels[:12]) >= 0.9


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibration_methods(method, digits, fp32_models, tmp_path):
    fp32 = fp32_models["NCHW"]
    (train_x, _), (val_x, val_y), _, _ = digits
    out = tmp_path / f"model.int8.{method}.onnx"
    quantize_int8(fp32, out, train_x[:128], method=method)
    block = compare_int8(fp32, out, val_x, val_y, threads=1, latency_runs=5)
    assert block["acc_drop_pp"] <= 1.0 and block["top1_agreement"] >= 0.98
    assert json.loads(read_metadata(out)["quantization"])["calibration_method"] == method


def test_report_verdict(quantized):
    block = quantized[2]
    passed = int8_lines(block, max_drop_pp=1.0)
    assert passed[-1].strip().startswith("PASSED") and "1 pp" in passed[-1]
    assert any("fp32" in line and "int8" in line and "pp" in line for line in passed)
    failed = int8_lines(block, max_drop_pp=-1.0)  # no model gains a whole point: forced failure
    assert failed[-1].strip().startswith("FAILED") and passed[:-1] == failed[:-1]
    assert int8_lines({**block, "acc_drop_pp": 1.5}, 1.0)[-1].strip().startswith("FAILED")
    assert int8_lines({**block, "acc_drop_pp": 1.0}, 1.0)[-1].strip().startswith("PASSED")


def test_unknown_method_is_one_line_export_error(fp32_models, digits, tmp_path):
    fp32 = fp32_models["NCHW"]
    out = tmp_path / "model.int8.onnx"
    with pytest.raises(ExportError) as err:
        quantize_int8(fp32, out, digits[0][0][:8], method="kl")
    message = str(err.value)
    assert "\n" not in message and "'kl'" in message
    assert all(m in message for m in ("minmax", "entropy", "percentile"))
    assert not out.exists() and list(tmp_path.iterdir()) == []
