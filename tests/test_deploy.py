"""Deployment through run.py: model.onnx verified in three runtimes, Caffe's files verified in
OpenCV and predicted from, the int8 model measured; the bad files a deployment meets."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli
from PIL import Image

pytest.importorskip("cv2", reason="the deploy extra: pip install -e '.[deploy]'")
pytest.importorskip("openvino", reason="the deploy extra: pip install -e '.[deploy]'")

RUNTIMES = ["onnxruntime", "opencv", "openvino"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short default job with every deployment option on."""
    r = run_cli(tmp_path_factory.mktemp("deploy") / "run", "trainer.max_epochs=2",
                "trainer.progress_bar=false", "export.caffe=true",
                f"export.runtimes=[{','.join(RUNTIMES)}]", "export.int8.enabled=true",
                "export.int8.calibration_images=64", "export.batch_sizes=[1,16]",
                "export.num_images=32")
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from sklearn.datasets import load_digits
    folder = tmp_path_factory.mktemp("images")
    digits = load_digits()
    for i in range(12):
        Image.fromarray((digits.images[i] * 16).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def predict(model, folder) -> tuple[subprocess.CompletedProcess, list]:
    p = subprocess.run([sys.executable, "-m", "cnnzoo.app.predict", str(model), str(folder),
                        "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       check=False)
    return p, (json.loads(p.stdout) if p.returncode == 0 else [])


def test_every_runtime_and_format_is_verified_and_reported(run):
    export = run.results()["export"]
    assert export["passed"] is True and list(export["runtimes"]) == RUNTIMES
    for name, report in export["runtimes"].items():
        assert report["passed"] and report["error"] is None, (name, report)
        assert [b["batch_size"] for b in report["batches"]] == [1, 16]
        assert report["max_abs_diff"] < 1e-4 and report["top1_agreement"] == 1.0
    assert export["max_abs_diff"] == max(r["max_abs_diff"] for r in export["runtimes"].values())
    assert "OpenVINO" in export["runtimes"]["openvino"]["runtime"]
    caffe = export["caffe"]
    assert caffe["passed"] is True and list(caffe["runtimes"]) == ["opencv"]
    assert (caffe["prototxt"], caffe["caffemodel"], caffe["sidecar"]) == (
        "deploy.prototxt", "deploy.caffemodel", "deploy.json")
    for line in ("Caffe verification of deploy.prototxt against torch (OpenCV DNN",
                 "ONNX verification of model.onnx against torch (OpenVINO"):
        assert line in run.stdout


def test_int8_model_is_measured_next_to_the_fp32_one(run):
    int8 = run.results()["export"]["int8"]
    assert int8["passed"] is True and int8["path"] == "model.int8.onnx"
    assert int8["images"] == run.results()["data"]["val_images"]
    assert abs(int8["fp32_acc"] - run.results()["metrics"]["val_acc"]) < 1e-6
    assert int8["acc_drop_pp"] <= 1.0 and int8["top1_agreement"] > 0.95
    assert int8["int8_size_mb"] < int8["fp32_size_mb"] / 2
    assert int8["fp32_latency_ms"] > 0 and int8["int8_latency_ms"] > 0
    assert (run.run_dir / "model.int8.onnx").is_file()
    assert "int8 model model.int8.onnx against model.onnx" in run.stdout


def test_caffe_model_predicts_what_the_onnx_model_predicts(run, images):
    p_onnx, onnx_out = predict(run.run_dir / "model.onnx", images)
    assert p_onnx.returncode == 0 and len(onnx_out) == 12, p_onnx.stderr
    for model in ("deploy.prototxt", "deploy.caffemodel"):
        p, out = predict(run.run_dir / model, images)
        assert p.returncode == 0, p.stderr
        assert [r["top"][0]["class"] for r in out] == [r["top"][0]["class"] for r in onnx_out]
        for a, b in zip(out, onnx_out):
            assert abs(a["top"][0]["probability"] - b["top"][0]["probability"]) < 1e-4


@pytest.mark.parametrize("damage", ["truncated", "another network", "no sidecar"])
def test_a_bad_caffe_model_is_one_line_and_exit_code_2(run, images, tmp_path, damage):
    for name in ("deploy.prototxt", "deploy.caffemodel", "deploy.json"):
        (tmp_path / name).write_bytes((run.run_dir / name).read_bytes())
    caffemodel, prototxt = tmp_path / "deploy.caffemodel", tmp_path / "deploy.prototxt"
    if damage == "truncated":
        caffemodel.write_bytes(caffemodel.read_bytes()[:5000])
        expected = "OpenCV cannot load deploy.prototxt with deploy.caffemodel"
    elif damage == "another network":  # the first convolution widened: its blobs no longer fit
        prototxt.write_text(prototxt.read_text().replace("num_output: 6", "num_output: 8", 1))
        expected = "deploy.caffemodel does not fit deploy.prototxt"
    else:
        (tmp_path / "deploy.json").unlink()
        expected = "the class names and preprocessing of"
    p, _ = predict(prototxt, images)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and expected in errors[0], p.stderr
    assert "Traceback" not in p.stderr
