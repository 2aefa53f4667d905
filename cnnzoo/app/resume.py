"""``resume``: whether a training run continues from the checkpoint in its run directory.

Re-running the same command with the same run directory (``hydra.run.dir=...``, or a fixed
``hydra.sweep.dir`` for a sweep) continues after the last completed epoch. It is allowed only
when the run directory's ``config.yaml`` (written when the run first started) asks for the
same training; options that do not change the trained weights may differ (``_FREE``).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..core.checkpoints import Checkpoint, CheckpointDir
from ..core.errors import CheckpointError
from ..core.rundir import MetricsLog
from .experiment import flatten

# keys whose values may change between the first attempt and a resumed one
_FREE = ("task", "resume", "export", "tracking", "eval", "predict", "verify", "sweep",
         "trainer.progress_bar", "hardware.threads")


def resume_point(cfg: DictConfig, run_dir: Path) -> Checkpoint | None:
    """The checkpoint this run continues from, or None for a fresh start. Refuses (one line
    per problem) a checkpoint of another backend or of a different training config."""
    latest = CheckpointDir(run_dir).latest()
    if latest is None:
        return None
    if cfg.resume == "never":
        raise CheckpointError(f"resume=never but {run_dir} already holds a checkpoint after epoch "
                              f"{latest.epoch} ({latest.path}): use resume=auto to continue it, "
                              "or another hydra.run.dir to start over")
    problems = []
    if latest.state.get("backend") != cfg.backend.name:
        problems.append(f"the checkpoint in {latest.path} was written by backend "
                        f"'{latest.state.get('backend')}', not '{cfg.backend.name}'")
    saved = Path(run_dir) / "config.yaml"
    if saved.is_file():
        problems += [f"{k}: the run was started with {a!r}, now {b!r}"
                     for k, a, b in config_changes(OmegaConf.load(saved), cfg)]
    if problems:
        raise CheckpointError("cannot resume " + str(run_dir) + ": " + "; ".join(problems)
                              + "; use the run's own settings, or another hydra.run.dir")
    return latest


def config_changes(before: DictConfig, now: DictConfig) -> list[tuple[str, object, object]]:
    """(key, before, now) for every training option that differs."""
    a, b = (flatten(OmegaConf.to_container(c, resolve=True)) for c in (before, now))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not _is_free(k)]


def prepare_run_dir(cfg: DictConfig, run_dir: Path, resume: Checkpoint | None) -> None:
    """Record the config of a fresh start; drop metrics rows of epochs the checkpoint lacks
    (they are trained again)."""
    if resume is None:
        OmegaConf.save(cfg, Path(run_dir) / "config.yaml", resolve=True)
    metrics = Path(run_dir) / "metrics.csv"
    if metrics.exists():
        MetricsLog(metrics).keep_epochs(resume.epoch if resume else 0)


def _is_free(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in _FREE)


__all__ = ["CheckpointError", "resume_point", "config_changes",
           "prepare_run_dir"]
