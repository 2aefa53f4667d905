"""End to end through cnnzoo's ``python run.py backend=flax``: the default job trains, exports
and verifies its ONNX file; task=summary counts the native parameters. Only JAX is imported."""
import csv

import onnx
import pytest


@pytest.mark.slow
def test_default_job_trains_exports_and_verifies(cli):
    r = cli("backend=flax")
    assert r.returncode == 0, r.stderr[-2000:]
    res = r.results()
    assert (res["arch"], res["backend"], res["status"]) == ("lenet5", "flax", "ok")
    assert res["params"] == res["native_params"] == 61_706
    assert res["metrics"]["val_acc"] >= 0.95
    assert res["export"]["passed"] is True and res["export"]["opset"] == 18
    assert res["export"]["max_abs_diff"] <= 1e-4
    rows = list(csv.DictReader((r.run_dir / "metrics.csv").open()))
    assert [int(row["epoch"]) for row in rows] == list(range(1, 11))
    assert float(rows[-1]["val_acc"]) == pytest.approx(res["metrics"]["val_acc"], abs=1e-5)
    assert res["checkpoint"] == "checkpoints/epoch-0010/state.npz"
    assert [p.name for p in (r.run_dir / "checkpoints").iterdir()] == ["epoch-0010"]
    assert len(res["weights_sha256"]) == 64
    assert list((r.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    meta = {p.key: p.value for p in onnx.load(str(r.run_dir / "model.onnx")).metadata_props}
    assert meta["backend"] == "flax" and meta["layout"] == "NCHW"
    assert {"jax", "flax", "optax"} <= r.frameworks
    assert not r.frameworks & {"torch", "tensorflow", "mxnet"}


@pytest.mark.slow
def test_summary_reports_native_params(cli):
    r = cli("task=summary", "arch=resnext50", "backend=flax")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.results()["native_params"] == r.results()["params"] == 25_028_904
    assert "native flax parameters: 25,028,904" in r.stdout
