"""Optional MLflow tracking (``tracking.mlflow=true``): the run's parameters, its metrics per
epoch, and its files (model.onnx, results.json, metrics.csv, curves.png, and the Caffe and
int8 models when exported) as artifacts.

The default store is a local folder (``file:./mlruns``; view it with ``mlflow ui
--backend-store-uri ./mlruns``). MLflow 3 keeps that file store only behind an opt-in
environment variable, which is set here because a local folder is what this product promises.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .experiment import flatten

# the deployment files when the run exported them (export.caffe, export.int8)
ARTIFACTS = ("model.onnx", "results.json", "metrics.csv", "curves.png", "deploy.prototxt",
             "deploy.caffemodel", "deploy.json", "model.int8.onnx")
LOGGED_GROUPS = ("arch", "backend", "hardware", "data", "optim", "trainer", "export")


def log_run(cfg: DictConfig, results: dict, history: list[dict], run_dir: Path) -> str | None:
    """Log one finished run; returns the MLflow run id. A tracking failure is a warning: the
    run itself and its files are already saved."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        import mlflow

        mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
        mlflow.set_experiment(cfg.tracking.experiment)
        with mlflow.start_run(run_name=f"{results['arch']}-{results['backend']}") as run:
            config = OmegaConf.to_container(cfg, resolve=True)
            mlflow.log_params({**flatten({k: config[k] for k in LOGGED_GROUPS}),
                               "seed": cfg.seed})
            for row in history:
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"},
                                   step=int(row["epoch"]))
            export = results.get("export") or {}
            mlflow.log_metrics({"best_val_acc": results["metrics"].get("best_val_acc") or 0.0,
                                "images_per_s": results["timings"]["images_per_s"]})
            mlflow.set_tags({"status": results["status"], "onnx_passed": export.get("passed"),
                             "run_dir": str(run_dir)})
            for name in ARTIFACTS:
                if (run_dir / name).exists():
                    mlflow.log_artifact(str(run_dir / name))
            return run.info.run_id
    except Exception as err:  # noqa: BLE001  tracking must never cost the user the run
        print(f"warning: MLflow logging failed ({type(err).__name__}: {err}); the run's files "
              f"are in {run_dir}", file=sys.stderr)
        return None
