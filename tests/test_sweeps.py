"""Sweeps through ``run.py -m``: grid, failures, launchers (Optuna: tests/test_optuna.py)."""
import csv
import os

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

FAST = ["trainer.max_epochs=1", "export.enabled=false", "data.limit=400"]


def summary_rows(sweep_dir):
    return list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))


def test_grid_sweep_writes_one_summary(cli, tmp_path):
    sweep = tmp_path / "sweep"
    r = cli("-m", "optim.lr=0.01,0.002", "data.batch_size=32,64", *FAST, f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = summary_rows(sweep)
    assert [row["trial"] for row in rows] == ["0", "1", "2", "3"]
    assert {row["status"] for row in rows} == {"ok"}
    # only the swept values are listed, one combination per trial
    assert sorted(row["overrides"] for row in rows) == sorted(
        f"optim.lr={lr} data.batch_size={bs}" for lr in ("0.01", "0.002") for bs in (32, 64))
    best = max(rows, key=lambda row: float(row["objective"]))
    md = (sweep / "sweep_summary.md").read_text()
    assert f"Best trial: {best['trial']} " in md
    with Image.open(sweep / "sweep_objective.png") as png:
        assert png.format == "PNG" and png.size[0] > 300
    assert "sweep: 4 trials" in r.stdout


def test_failed_trial_is_recorded_and_the_sweep_goes_on(cli, tmp_path):
    sweep = tmp_path / "sweep"
    r = cli("-m", "optim=sgd", "optim.lr=1e30,0.01", "sweep.max_failure_rate=0.25", *FAST,
            f"hydra.sweep.dir={sweep}")
    diverged, fine = summary_rows(sweep)  # Hydra writes 1e30 as 1e+30
    assert diverged["overrides"] == "optim.lr=1e+30" and fine["overrides"] == "optim.lr=0.01"
    assert diverged["status"] == "failed" and "training diverged" in diverged["error"]
    assert diverged["objective"] == ""
    assert fine["status"] == "ok" and float(fine["objective"]) > 0  # ran after the failure
    # 1 of 2 failed, more than the allowed 25%: the sweep as a whole fails, after the summary
    assert r.returncode == 1
    assert "error: 1 of 2 trials failed, more than sweep.max_failure_rate=0.25" in r.stderr


def test_joblib_runs_trials_in_parallel_with_a_share_of_the_cpu(cli, tmp_path):
    sweep = tmp_path / "sweep"
    r = cli("-m", "launcher=joblib", "optim.lr=0.01,0.002", *FAST, f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {row["status"] for row in summary_rows(sweep)} == {"ok"}
    import json
    threads = {json.loads((sweep / n / "results.json").read_text())["hardware"]["threads"]
               for n in ("0", "1")}
    assert threads == {max(1, os.cpu_count() // 2)}


def test_submitit_local_launcher(cli, tmp_path):
    sweep = tmp_path / "sweep"
    r = cli("-m", "launcher=submitit_local", "optim.lr=0.01", *FAST, f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert summary_rows(sweep)[0]["status"] == "ok"
    assert (sweep / ".submitit").is_dir()  # it really went through submitit
