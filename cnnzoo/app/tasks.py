"""The tasks ``run.py`` dispatches to. Order matters for users: the config is validated first,
then data is loaded, and only then is the chosen backend (and its framework) imported."""
from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..core.errors import (
    BAD_INPUT,
    CheckpointError,
    ConfigError,
    RunFailed,
    RunFailure,
    TrainingDiverged,
    exit_with,
    print_error,
)
from ..core.rundir import (
    RESTORE_OR_ELSEWHERE,
    SCHEMA_VERSION,
    atomic_write_bytes,
    git_info,
    machine_info,
    package_versions,
    read_json,
    write_json,
)
from .experiment import build_model, make_backend, prepare, spec_of
from .pruning import trial_reporter
from .validate import validate


def run_task(cfg: DictConfig, hydra_cfg) -> float | None:
    """Run ``cfg.task`` in the run directory Hydra made; return the optimized metric.

    User mistakes exit with code 2 and failed runs with code 1, each with one clear message. In
    a sweep (multirun) a failed trial is recorded instead (results.json status "failed" with
    the reason) and returns None, so the sweep goes on; its summary marks the trial."""
    from hydra.types import RunMode

    run_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        validate(cfg)
        _check_same_task(cfg, run_dir)
        if cfg.task in ("train", "verify", "lr_find"):
            _share_cpu_threads(cfg, hydra_cfg.launcher.get("n_jobs") if in_sweep else None)
        if cfg.task == "train":
            return train(cfg, run_dir, hydra_cfg)  # records the invocation when it starts writing
        value = _run_other_task(cfg, run_dir, hydra_cfg)
        record_invocation(run_dir, cfg, hydra_cfg)
        return value
    except BAD_INPUT + (RunFailure,) as err:
        error = err
    except Exception as err:  # noqa: BLE001  a crash: a sweep records it, a single run shows it
        if not in_sweep:
            raise
        error = err
        traceback.print_exc()
    if not in_sweep:
        exit_with(error)
    _record_failure(run_dir, cfg, hydra_cfg, error)
    print_error(error)
    return None


def _check_same_task(cfg: DictConfig, run_dir: Path) -> None:
    """A run directory holds one task's results: another task is not written over them."""
    path = run_dir / "results.json"
    if path.exists():
        task = read_json(path, "restore it, or use another hydra.run.dir").get("task")
        if task != cfg.task:
            raise ConfigError(f"hydra.run.dir={run_dir} holds the results of task={task}: run "
                              f"task={cfg.task} in another hydra.run.dir")


def _run_other_task(cfg: DictConfig, run_dir: Path, hydra_cfg):
    if cfg.task == "summary":
        backend_chosen = any(o.startswith("backend=") for o in hydra_cfg.overrides.task)
        return summary(cfg, run_dir, build_native=backend_chosen)
    if cfg.task == "predict":
        return predict_task(cfg, run_dir)
    if cfg.task == "eval":
        from .evaluate import evaluate
        return evaluate(cfg, run_dir, list(hydra_cfg.overrides.task))
    if cfg.task == "lr_find":
        from .lr_find import lr_find
        return lr_find(cfg, run_dir)
    if cfg.task == "export_weights":
        from .export_weights import export_weights
        return export_weights(cfg, run_dir, list(hydra_cfg.overrides.task))
    from .crosscheck import verify_task
    return verify_task(cfg, run_dir)


def record_invocation(run_dir: Path, cfg: DictConfig, hydra_cfg) -> None:
    """Hydra's record of this invocation (``.hydra/``: the config, Hydra's own config and the
    command-line overrides), written by cnnzoo instead of Hydra (``hydra.output_subdir: null``)
    when a task starts writing its outputs (training) or has written them (the other tasks), so
    that a refused command leaves a run directory as it was."""
    folder = run_dir / ".hydra"
    for name, node in (("config.yaml", cfg), ("hydra.yaml", {"hydra": hydra_cfg}),
                       ("overrides.yaml", hydra_cfg.overrides.task)):
        atomic_write_bytes(folder / name, OmegaConf.to_yaml(node).encode())


def _share_cpu_threads(cfg: DictConfig, parallel_jobs: int | None) -> None:
    """Trials running side by side (joblib launcher) split the CPU cores between them."""
    if parallel_jobs and parallel_jobs > 1 and cfg.hardware.threads is None:
        cfg.hardware.threads = max(1, (os.cpu_count() or 1) // parallel_jobs)


def _record_failure(run_dir: Path, cfg: DictConfig, hydra_cfg, error: Exception) -> None:
    """Keep what the trial wrote (e.g. a failed verification's diffs) and add why it failed;
    a damaged results.json stays as it is (the sweep summary reports that trial as failed)."""
    path = run_dir / "results.json"
    try:
        results = read_json(path, RESTORE_OR_ELSEWHERE) if path.exists() else {
            "schema_version": SCHEMA_VERSION, "task": cfg.task, "arch": cfg.arch.name,
            "backend": cfg.backend.name}
    except CheckpointError:
        return
    record_invocation(run_dir, cfg, hydra_cfg)  # the sweep summary reads the trial's overrides
    results["status"] = "failed"
    results["error"] = f"{type(error).__name__}: {error}"
    write_json(path, results)


def _base_results(cfg: DictConfig, analysis) -> dict:
    return {"schema_version": SCHEMA_VERSION, "task": cfg.task, "status": "ok",
            "arch": analysis.spec.name, "backend": cfg.backend.name,
            "input_shape": list(analysis.input_shape), "num_classes": analysis.spec.num_classes,
            "params": analysis.params, "flops": analysis.flops}


def summary(cfg: DictConfig, run_dir: Path, build_native: bool):
    from .summary import layer_rows, print_table

    spec = spec_of(cfg)
    analysis = spec.analyze(cfg.arch.input_size)
    min_size = spec.min_input_size()
    print_table(analysis, min_size)
    results = {**_base_results(cfg, analysis), "min_input_size": min_size,
               "layers": layer_rows(analysis)}
    if build_native:
        backend = make_backend(cfg, run_dir)
        native = backend.count_params(backend.build(spec, cfg.arch.input_size))
        results["native_params"] = native
        print(f"native {cfg.backend.name} parameters: {native:,}"
              + ("" if native == analysis.params else "  (DIFFERS from the spec)"))
    write_json(run_dir / "results.json", results)
    return analysis.params


def train(cfg: DictConfig, run_dir: Path, hydra_cfg):
    from ..core.checkpoints import weights_sha256
    from ..core.finetune import FineTuning
    from .pretrained import apply_pretrained, read_pretrained
    from .report import plot_curves, print_config, print_summary
    from .resume import prepare_run_dir, resume_point

    t_start = time.perf_counter()
    overrides = list(hydra_cfg.overrides.task)
    print_config(cfg)
    resume = resume_point(cfg, run_dir)
    exp = prepare(cfg)
    dataset, spec, analysis, preprocess = exp.dataset, exp.spec, exp.analysis, exp.preprocess
    train_split, val_split = exp.train_split, exp.val_split
    tuning = FineTuning.from_config(cfg, spec)  # a prefix naming no node: one line, now
    if tuning.active:
        print(f"fine-tuning: {len(tuning.frozen)} parametrised node(s) frozen, the backbone "
              f"trained at {tuning.backbone_lr:g} x the rate", flush=True)
    pretrained = read_pretrained(cfg, spec) if resume is None else None
    backend, model, native_params = build_model(cfg, run_dir, exp)
    if pretrained is not None:
        pretrained = apply_pretrained(backend, model, pretrained, spec.num_classes)
    elif cfg.finetune.weights is not None:  # resumed: the checkpoint holds them, trained on
        pretrained = {"weights": str(cfg.finetune.weights), "applied": "when the run started"}
    reporter = trial_reporter(cfg, hydra_cfg)  # an Optuna trial with a pruner: each epoch
    if reporter is not None:
        backend.epoch_end_hooks.append(reporter)
    print(f"{spec.name}: {analysis.params:,} parameters, input "
          f"{'x'.join(map(str, analysis.input_shape))}; {cfg.data.name}: {len(train_split)} train / "
          f"{len(val_split)} val images; backend {cfg.backend.name}")
    if backend.is_main_process:
        record_invocation(run_dir, cfg, hydra_cfg)
        prepare_run_dir(cfg, run_dir, resume)
        if resume is not None:
            print(f"resuming from {resume.path} (epoch {resume.epoch} of "
                  f"{cfg.trainer.max_epochs} done)", flush=True)
    report = _train_keeping_checkpoint(backend, model, train_split, val_split, resume, run_dir)
    if not backend.is_main_process:
        return None  # worker process of multi-process training: rank 0 reports and exports

    history = _full_history(run_dir, report.history)
    metrics = dict(history[-1]) if history else {}
    metrics.pop("epoch_time_s", None)
    metrics["best_val_acc"] = max((r.get("val_acc", 0.0) for r in history), default=None)
    results = {**_base_results(cfg, analysis), "native_params": native_params,
               "seed": cfg.seed, "overrides": overrides,
               "resumed_from_epoch": resume.epoch if resume else None,
               "pretrained": pretrained,
               "finetune": {"frozen": sorted(tuning.frozen),
                            "backbone_lr": tuning.backbone_lr} if tuning.active else None,
               "weights_sha256": weights_sha256(backend.get_weights(model)),
               "hardware": {**OmegaConf.to_container(cfg.hardware), **report.extra},
               "optim": report.optim,
               "machine": machine_info(), "git": git_info(Path(__file__).parent),
               "data": {"name": dataset.name, "train_images": len(train_split),
                        "val_images": len(val_split), "classes": dataset.classes,
                        "preprocess": preprocess.metadata()},
               "metrics": metrics,
               "timings": {"train_s": round(report.train_time_s, 3),
                           "images_per_s": round(report.images_per_s, 1)},
               "checkpoint": _relative(report.checkpoint, run_dir),
               "versions": package_versions()}
    if report.stopped:  # pruned: the trial is judged by the sweep, nothing is exported
        results["status"], results["stopped"] = "pruned", report.stopped
        print(report.stopped, flush=True)

    failures = []
    if cfg.export.enabled and not report.stopped:
        from .exporting import export_run
        results["export"], failures = export_run(cfg, backend, model, exp, run_dir,
                                                 results["versions"])
        if failures:
            results["status"] = "verification_failed"
    results["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
    write_json(run_dir / "results.json", results)
    if history:
        plot_curves(history, run_dir / "curves.png", f"{spec.name} on {cfg.backend.name}")
    if cfg.tracking.mlflow:
        from .tracking import log_run
        log_run(cfg, results, history, run_dir)
    print_summary(results, run_dir)
    if failures:
        raise RunFailed("\n".join(failures))
    return None if report.stopped else metrics.get(cfg.optimized_metric)


def _train_keeping_checkpoint(backend, model, train_split, val_split, resume, run_dir: Path):
    """``backend.train``; a divergence names the last good checkpoint, which stays."""
    from ..core.checkpoints import CheckpointDir
    try:
        return backend.train(model, train_split, val_split, resume)
    except TrainingDiverged as err:
        good = CheckpointDir(run_dir).latest()
        kept = (f"the last good checkpoint is kept: {good.path} (epoch {good.epoch})" if good
                else "no epoch finished before it, so there is no checkpoint")
        raise TrainingDiverged(f"{err}\n{kept}") from None


def _full_history(run_dir: Path, trained: list[dict]) -> list[dict]:
    """This attempt's rows, after the rows of the epochs done before it was resumed."""
    from ..core.rundir import MetricsLog

    first = trained[0]["epoch"] if trained else None
    path = run_dir / "metrics.csv"
    earlier = [r for r in MetricsLog(path).rows() if first is None or r["epoch"] < first] \
        if path.exists() else []
    return earlier + list(trained)


def predict_task(cfg: DictConfig, run_dir: Path) -> None:
    from .predict import format_results, predict

    results = predict(Path(cfg.predict.model), list(cfg.predict.inputs), cfg.predict.top_k)
    print(format_results(results))
    write_json(run_dir / "predictions.json", results)


def _relative(path, run_dir: Path):
    return None if path is None else str(Path(path).relative_to(run_dir))
