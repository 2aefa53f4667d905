"""ONNX export and verification: checker, metadata, dynamic batch, and a real failure."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import compose_cfg, toy_spec
from omegaconf import OmegaConf
from onnx import numpy_helper

from export import export_and_verify, read_metadata, runtimes
from export.check import check_model, compare, verify
from runners.torch.backend import TorchBackend


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = compose_cfg("hardware=cpu", "export.batch_sizes=[1,4]")
    backend = TorchBackend(cfg, tmp)
    model = backend.build(toy_spec(), 32)
    images = np.random.default_rng(0).standard_normal((12, 3, 32, 32)).astype(np.float32)
    block, reports = export_and_verify(backend, model, images, cfg.export, tmp / "model.onnx",
                                       {"arch": "toy", "class_names": ["a", "b"]})
    return backend, model, images, block, reports, tmp / "model.onnx", cfg


def test_export_passes_checker_and_verification(exported):
    _, _, _, block, reports, path, _ = exported
    onnx.checker.check_model(str(path), full_check=True)
    assert [r.runtime for r in reports] == ["onnxruntime"] and reports[0].passed
    assert block["passed"] is True and list(block["runtimes"]) == ["onnxruntime"]
    assert [b["batch_size"] for b in block["runtimes"]["onnxruntime"]["batches"]] == [1, 4]
    assert block["max_abs_diff"] < 1e-4 and block["top1_agreement"] == 1.0
    assert block["opset"] == 18 and block["path"] == "model.onnx"


def test_single_self_contained_file(exported):
    path = exported[5]
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == ["model.onnx"]
    model = onnx.load(str(path))
    assert all(init.data_location != onnx.TensorProto.EXTERNAL
               for init in model.graph.initializer)


def test_metadata_is_in_metadata_props(exported):
    meta = read_metadata(exported[5])
    assert meta["arch"] == "toy" and meta["layout"] == "NCHW"
    assert json.loads(meta["class_names"]) == ["a", "b"]


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_dynamic_batch_axis(exported, batch):
    backend, model, images, *_ = exported
    sess = ort.InferenceSession(str(exported[5]), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "input" and sess.get_outputs()[0].name == "logits"
    out = sess.run(None, {"input": images[:batch]})[0]
    np.testing.assert_allclose(out, backend.predict(model, images[:batch]), atol=1e-4, rtol=1e-3)


def test_tampered_model_fails_verification(exported, tmp_path):
    backend, model, images, _, _, path, cfg = exported
    onnx_model = onnx.load(str(path))
    # the classifier's weight (5 classes x 32 features), made 5% larger
    (init,) = [t for t in onnx_model.graph.initializer if sorted(t.dims) == [5, 32]]
    weights = numpy_helper.to_array(init) * np.float32(1.05)
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(onnx_model, str(bad))
    report = check_model(runtimes.load("onnxruntime", bad), images,
                         lambda x: backend.predict(model, x), [1, 4], 1e-4, 1e-3, 1.0)
    assert not report.passed
    assert report.worst("max_abs_diff") > 1e-4
    assert "FAILED" in report.lines()[-1]


def test_compare_rules():
    native = np.array([[1.0, 2.0], [3.0, -1.0]], np.float32)
    c = compare(native + np.float32(0.001), native, 2, atol=1e-4, rtol=1e-3)
    assert c.within_tolerance  # 0.001 <= 1e-4 + 1e-3 * |x| for |x| >= 1
    c = compare(native + np.float32(0.01), native, 2, atol=1e-4, rtol=1e-3)
    assert not c.within_tolerance and c.max_abs_diff == pytest.approx(0.01, rel=1e-3)
    flipped = native[:, ::-1].copy()
    assert compare(flipped, native, 2, 1e-4, 1e-3).top1_agreement == 0.0
    assert compare(native * np.nan, native, 2, 1e-4, 1e-3).non_finite


def test_export_block_without_verification(tmp_path):
    cfg = compose_cfg("hardware=cpu", "export.verify=false")
    backend = TorchBackend(cfg, tmp_path)
    model = backend.build(toy_spec(), 32)
    images = np.zeros((1, 3, 32, 32), np.float32)  # a single image still exports a dynamic batch
    block, reports = export_and_verify(backend, model, images, cfg.export, tmp_path / "m.onnx", {})
    assert reports == [] and block["passed"] is None and (tmp_path / "m.onnx").exists()
    assert OmegaConf.to_container(cfg.export)["verify"] is False


def test_a_runtime_that_cannot_load_the_model_is_reported_not_hidden(exported, tmp_path):
    backend, model, images, _, _, _, cfg = exported
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    (report,) = verify(broken, ["onnxruntime"], images, lambda x: backend.predict(model, x),
                       cfg.export)
    assert not report.passed and report.batches == []
    assert report.error.startswith("onnxruntime cannot load broken.onnx: ")
    assert "\n" not in report.error and "cannot run the model" in report.lines()[0]
    assert "FAILED" in report.lines()[-1]
