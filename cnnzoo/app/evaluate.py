"""``task=eval``: evaluate a trained run's checkpoint on its validation split (or other data).

    python run.py task=eval eval.run_dir=outputs/lenet5-torch/<run>
    python run.py task=eval eval.run_dir=<run> data=mnist data.path=$HOME/data/mnist

The trained run's resolved config (config.yaml) rebuilds the same architecture, backend and
preprocessing; ``data`` and ``hardware`` come from the command line when given there. Writes
eval.json (loss, accuracy, per-class accuracy, confusion matrix) and confusion_matrix.png.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..core.checkpoints import CheckpointDir
from ..core.errors import ConfigError
from ..core.rundir import read_json, write_json
from .experiment import build_model, prepare
from .resume import saved_config
from .validate import validate

_FROM_COMMAND_LINE = ("data", "hardware")


def trained_config(cfg: DictConfig, overrides: list[str], key: str = "eval.run_dir"
                   ) -> tuple[DictConfig, Path]:
    """This config with the trained run's arch, backend, seed, data and hardware; data and
    hardware stay as the command line set them, if it did. ``key`` names the option that
    gave ``cfg.eval.run_dir``, for the messages."""
    src = Path(cfg.eval.run_dir or "")
    if not cfg.eval.run_dir or not (src / "config.yaml").is_file() or not (
            src / "results.json").is_file():
        raise ConfigError(f"{key}={cfg.eval.run_dir!r} is not a finished training run "
                          "(needs config.yaml and results.json): give a run directory of task=train")
    fix = "restore it, or evaluate another run"
    saved = saved_config(src / "config.yaml", fix)
    trained = cfg.copy()
    for key in ("arch", "backend", "seed"):
        trained[key] = saved[key]
    for key in _FROM_COMMAND_LINE:
        if not any(o.startswith((f"{key}=", f"{key}.")) for o in overrides):
            trained[key] = saved[key]
    validate(trained)
    checkpoint = read_json(src / "results.json", fix).get("checkpoint")
    CheckpointDir(src).latest()  # a damaged checkpoint folder is named, not loaded
    if not checkpoint or not (src / checkpoint).is_file():
        raise ConfigError(f"{key}={src}: its checkpoint {checkpoint!r} is missing")
    return trained, src / checkpoint


def evaluate(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> float:
    from .report import plot_confusion

    trained, checkpoint = trained_config(cfg, overrides)
    exp = prepare(trained)
    backend, model, _ = build_model(trained, run_dir, exp)
    backend.load_checkpoint(model, checkpoint)
    split, classes = exp.val_split, exp.dataset.classes
    result = backend.evaluate(model, split, cfg.eval.batch_size)
    result.update({"task": "eval", "run_dir": str(Path(cfg.eval.run_dir)),
                   "checkpoint": str(checkpoint), "arch": exp.spec.name,
                   "backend": trained.backend.name, "data": trained.data.name,
                   "images": len(split), "classes": classes})
    write_json(run_dir / "eval.json", result)
    plot_confusion(result["confusion_matrix"], classes, run_dir / "confusion_matrix.png",
                   f"{exp.spec.name} on {trained.backend.name}: accuracy {result['acc']:.4f}")
    print(f"eval of {checkpoint} on {trained.data.name} ({len(split)} images): "
          f"accuracy {result['acc']:.4f}, loss {result['loss']:.4f}; {run_dir / 'eval.json'}")
    return result["acc"]
