"""End to end through cnnzoo's ``python run.py backend=flax``: the default job trains, exports
and verifies its ONNX file; task=summary counts the native parameters. Only JAX is imported."""
import pytest

# cnnzoo's own `pytest` collects these too; without JAX there is nothing to test
pytest.importorskip("jax", reason="the flax plugin's framework is not installed")
import csv
import os
import subprocess
import sys

import onnx
from flax_helpers import run_cli


@pytest.fixture
def cli(tmp_path):
    """``run.py`` with these overrides in a run folder of the test's own."""
    return lambda *overrides, **kw: run_cli(tmp_path / "run", *overrides, **kw)


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


@pytest.mark.slow
def test_two_cpu_devices_compute_what_one_does(tmp_path):
    """hardware=ddp_cpu: one process, two XLA CPU devices, each batch split over them and the
    gradients all-reduced; batch norm and the loss see the whole batch, so the run's losses are
    the one-device run's (up to the order of the sums)."""
    short = ("backend=flax", "trainer.max_epochs=2", "data.limit=300", "export.enabled=false",
             "trainer.progress_bar=false")
    runs = {hw: run_cli(tmp_path / hw, *short, f"hardware={hw}") for hw in ("cpu", "ddp_cpu")}
    for r in runs.values():
        assert r.returncode == 0, r.stderr[-2000:]
    one, two = (runs[hw].results() for hw in ("cpu", "ddp_cpu"))
    assert two["hardware"]["device"] == "cpu:0, cpu:1" and two["hardware"]["replicas"] == 2
    assert one["hardware"]["device"] == "cpu:0"
    rows = [list(csv.DictReader((runs[hw].run_dir / "metrics.csv").open()))
            for hw in ("cpu", "ddp_cpu")]
    for a, b in zip(*rows):
        for column in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-5), column


_THREADS_PROBE = """
import collections, os, sys
from cnnzoo.app.experiment import compose
from cnnzoo_flax.backend import FlaxBackend
import jax.numpy as jnp
overrides = ["backend=flax", "hardware=cpu"] + sys.argv[1:]
backend = FlaxBackend(compose(*overrides), ".")
(jnp.ones((256, 256)) @ jnp.ones((256, 256))).block_until_ready()
print(len(os.sched_getaffinity(0)), len(os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to limit to one")
def test_threads_bind_the_process_before_xla_sizes_its_pools(tmp_path):
    """JAX has no thread setting: hardware.threads=1 binds the process to one CPU before JAX
    starts its CPU client, which then starts fewer threads (its pools are sized from the
    CPUs the process may use)."""
    def probe(*overrides):
        out = subprocess.run([sys.executable, "-c", _THREADS_PROBE, *overrides], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return tuple(int(v) for v in out.stdout.split()[-2:])
    (cpus, threads), (one_cpu, fewer) = probe(), probe("hardware.threads=1")
    assert (cpus, one_cpu) == (len(os.sched_getaffinity(0)), 1)
    assert fewer < threads
