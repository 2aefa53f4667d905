"""``resume``: whether a training run continues from the checkpoint in its run directory.

Re-running the same command with the same run directory (``hydra.run.dir=...``, or a fixed
``hydra.sweep.dir`` for a sweep) continues after the last completed epoch. It is allowed only
when the run directory's ``config.yaml`` (written when the run first started) asks for the
same training; options that do not change the trained weights may differ (``_FREE``, and
each backend's ``BackendInfo.weight_neutral``), and options the run's config does not have
(added by a later version of cnnzoo) take their current values.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..core.backend import available_backends, backend_info
from ..core.checkpoints import Checkpoint, CheckpointDir
from ..core.errors import CheckpointError
from ..core.rundir import RESTORE_OR_ELSEWHERE, MetricsLog
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
                     for k, a, b in config_changes(saved_config(saved, RESTORE_OR_ELSEWHERE), cfg)]
    metrics = Path(run_dir) / "metrics.csv"
    if metrics.is_file():
        MetricsLog(metrics).rows()  # the resumed run continues it: damaged, it is refused now
    if problems:
        raise CheckpointError("cannot resume " + str(run_dir) + ": " + "; ".join(problems)
                              + "; use the run's own settings, or another hydra.run.dir")
    return latest


def saved_config(path: Path, fix: str) -> DictConfig:
    """The ``config.yaml`` a run saved; CheckpointError naming it and ``fix`` when damaged."""
    try:
        return OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001  yaml and OmegaConf raise many types
        raise CheckpointError(f"{path} cannot be read ({str(err).splitlines()[0]}): {fix}") \
            from None


def config_changes(before: DictConfig, now: DictConfig) -> list[tuple[str, object, object]]:
    """(key, before, now) for every training option that differs, except options ``before``
    does not have (added by a later version) and those that leave the weights as they are."""
    a, b = (flatten(OmegaConf.to_container(c, resolve=True)) for c in (before, now))
    free = _FREE + _weight_neutral(now)
    return [(k, a.get(k), b.get(k)) for k in sorted(a)
            if a.get(k) != b.get(k) and not any(k == f or k.startswith(f + ".") for f in free)]


def prepare_run_dir(cfg: DictConfig, run_dir: Path, resume: Checkpoint | None) -> None:
    """Record the config of a fresh start; drop metrics rows of epochs the checkpoint lacks
    (they are trained again)."""
    if resume is None:
        OmegaConf.save(cfg, Path(run_dir) / "config.yaml", resolve=True)
    metrics = Path(run_dir) / "metrics.csv"
    if metrics.exists():
        MetricsLog(metrics).keep_epochs(resume.epoch if resume else 0)


def _weight_neutral(cfg: DictConfig) -> tuple[str, ...]:
    """The backend's options that never change the trained weights, as config keys."""
    name = OmegaConf.select(cfg, "backend.name")
    if name not in available_backends():
        return ()
    return tuple(f"backend.{k}" for k in backend_info(name).weight_neutral)


__all__ = ["CheckpointError", "config_changes", "prepare_run_dir", "resume_point",
           "saved_config"]
