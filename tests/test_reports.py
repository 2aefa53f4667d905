"""What a person sees: training curves, the run summary, the comparison of runs."""
import csv

import pytest
from PIL import Image

from cnnzoo.app.compare import compare, plot
from cnnzoo.app.report import plot_curves
from cnnzoo.core.rundir import MetricsLog

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from conftest import run_cli
    base = tmp_path_factory.mktemp("runs")
    runs = []
    for name, lr in (("a", "0.003"), ("b", "0.001")):
        r = run_cli(base / name, "trainer.max_epochs=3", f"optim.lr={lr}",
                    "export.batch_sizes=[1,8]", "export.num_images=8")
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(r)
    return runs


def _png(path):
    with Image.open(path) as im:
        return im.format, im.size


def test_run_writes_curves_and_prints_a_summary(two_runs):
    r = two_runs[0]
    assert _png(r.run_dir / "curves.png")[0] == "PNG"
    rows = MetricsLog(r.run_dir / "metrics.csv").rows()
    assert len(rows) == 3
    labels = plot_curves(rows, r.run_dir / "again.png", "t")
    assert labels == ["train_loss", "val_loss", "train_acc", "val_acc"]
    for expected in ("run summary", "lenet5 on torch", "61,706", "best val_acc", "images/s",
                     "passed (max abs diff", "model.onnx"):
        assert expected in r.stdout


def test_compare_covers_every_run(two_runs, tmp_path):
    out = tmp_path / "cmp"
    rows = compare([r.run_dir for r in two_runs], out)
    assert [row["run"] for row in rows] == ["lenet5/torch (a)", "lenet5/torch (b)"]
    table = list(csv.DictReader((out / "comparison.csv").open()))
    assert [t["path"] for t in table] == [str(r.run_dir) for r in two_runs]
    assert all(t["onnx"] == "passed" and float(t["best_val_acc"]) > 0 for t in table)
    assert _png(out / "comparison.png")[0] == "PNG"
    curves = plot([r.run_dir for r in two_runs], ["a", "b"], tmp_path / "p.png")
    assert curves == ["a", "b", "a", "b"]  # accuracy panel, loss panel: one curve per run
    assert "lenet5/torch (a)" in (out / "comparison.md").read_text()


def test_compare_command_finds_runs_below_a_directory(two_runs, tmp_path):
    import subprocess
    import sys
    parent = two_runs[0].run_dir.parent  # holds the runs a and b
    out = tmp_path / "c"
    r = subprocess.run([sys.executable, "-m", "cnnzoo.app.compare", str(parent), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "comparison of 2 runs" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "cnnzoo.app.compare", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "not a directory" in bad.stderr


def test_eval_reproduces_the_validation_accuracy(two_runs, tmp_path):
    from conftest import run_cli
    trained = two_runs[0]
    r = run_cli(tmp_path / "eval", "task=eval", f"eval.run_dir={trained.run_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    ev = json.loads((r.run_dir / "eval.json").read_text())
    res = trained.results()
    assert ev["acc"] == pytest.approx(res["metrics"]["val_acc"], abs=1e-6)
    assert ev["loss"] == pytest.approx(res["metrics"]["val_loss"], rel=1e-4)
    assert sum(map(sum, ev["confusion_matrix"])) == ev["images"] == res["data"]["val_images"]
    assert _png(r.run_dir / "confusion_matrix.png")[0] == "PNG"
    assert r.frameworks >= {"torch"}


def test_eval_of_a_directory_that_is_not_a_run_is_one_clear_error(tmp_path):
    from conftest import run_cli
    r = run_cli(tmp_path / "eval", "task=eval", f"eval.run_dir={tmp_path}")
    assert r.returncode == 2 and len(r.error_lines) == 1
    assert "is not a finished training run" in r.error_lines[0]


def test_predict_classifies_validation_images_at_the_models_accuracy(two_runs, tmp_path):
    import json

    import numpy as np
    from conftest import run_cli

    from cnnzoo.core.data import Preprocess, load_digits
    trained = two_runs[0]
    _, val = load_digits().split(Preprocess(32, 1, (0.5,), (0.5,)), 0.2, seed=42)
    folder = tmp_path / "images"
    folder.mkdir()
    raw = val.raw(np.arange(len(val)))
    for i, image in enumerate(raw):  # the validation images as 8-bit PNG files
        Image.fromarray(np.round(image[:, :, 0] * 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    r = run_cli(tmp_path / "predict", "task=predict",
                f"predict.model={trained.run_dir / 'model.onnx'}", f"predict.inputs=[{folder}]",
                "predict.top_k=3")
    assert r.returncode == 0, r.stderr[-2000:]
    # only onnxruntime, numpy and Pillow: no training framework, not even onnx
    assert r.frameworks == set()
    predictions = json.loads((r.run_dir / "predictions.json").read_text())
    assert len(predictions) == len(val) and all(len(p["top"]) == 3 for p in predictions)
    top1 = np.array([int(p["top"][0]["class"]) for p in predictions])
    accuracy = (top1 == val.labels).mean()
    assert accuracy == pytest.approx(trained.results()["metrics"]["val_acc"], abs=0.02)
    probs = [t["probability"] for t in predictions[0]["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
    assert f"{folder / '0000.png'}: " in r.stdout


def test_predict_without_a_model_is_one_clear_error(tmp_path):
    from conftest import run_cli
    r = run_cli(tmp_path / "p", "task=predict", f"predict.model={tmp_path / 'none.onnx'}",
                f"predict.inputs=[{tmp_path}]")
    assert r.returncode == 2 and "does not exist" in r.error_lines[0]


def test_mlflow_tracking_logs_params_metrics_and_the_onnx_model(tmp_path, monkeypatch):
    from conftest import run_cli
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the local store back
    store = tmp_path / "mlruns"
    r = run_cli(tmp_path / "run", "trainer.max_epochs=2", "tracking.mlflow=true",
                f"tracking.mlflow_uri={store}", "export.batch_sizes=[1,8]", "export.num_images=8",
                "export.caffe=true")
    assert r.returncode == 0, r.stderr[-2000:]
    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=str(store))
    (experiment,) = [e for e in client.search_experiments() if e.name == "cnnzoo"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["arch.name"] == "lenet5" and run.data.params["backend.name"] == "torch"
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in history] == [1, 2]
    assert history[-1].value == pytest.approx(r.results()["metrics"]["val_acc"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.onnx", "results.json", "metrics.csv", "curves.png", "deploy.prototxt",
            "deploy.caffemodel", "deploy.json"} <= artifacts
    assert run.data.tags["onnx_passed"] == "True"
