"""The Optuna sweep: claim trials, launch them through Hydra's launcher, tell Optuna the outcome.

``hparams_search=optuna`` selects it (the Hydra plugin is hydra_plugins/cnnzoo_optuna). Each
trial runs as one Hydra job in ``<sweep dir>/<trial number>``, whatever launcher runs it
(basic, joblib, submitit). The study lives in ``hydra.sweeper.storage``: re-running the same
command resumes it to ``n_trials`` in total, and several processes started with the same
command and storage share it (cnnzoo/app/optuna_study.py). A trial's job reports its optimized
metric after every epoch, and the pruner may stop it (cnnzoo/app/pruning.py); the sweeper then
records it as pruned.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from ..core.errors import ConfigError
from .optuna_space import SearchSpace, search_space
from .optuna_study import (
    PRUNED_AT,
    Heartbeat,
    claim_trials,
    open_storage,
    open_study,
    requeue_interrupted,
    running_elsewhere,
    shown,
    storage_kind,
    study_lock,
    trial_id,
)
from .pruning import DEFAULT_STUDY, NO_PRUNER

log = logging.getLogger(__name__)

PER_EPOCH_METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")


def sweep(conf: DictConfig, config: DictConfig, launcher, arguments: list[str]) -> list:
    """Run the study that ``conf`` (hydra.sweeper) describes; ``config``: the sweep's config."""
    space = search_space(conf.params, arguments)
    if not space.distributions:
        raise ConfigError("hparams_search=optuna has nothing to search: give hydra.sweeper.params "
                          "or a sweep on the command line, e.g. 'optim.lr=tag(log, "
                          "interval(1e-4, 1e-1))'")
    pruning = _check_pruning(conf, config)
    # the pruner runs in each trial's job; made here too, so a bad config fails before a trial
    sampler, pruner = _instantiate(conf.sampler, space), _instantiate(conf.pruner)
    storage = open_storage(conf.storage)
    name = conf.study_name or DEFAULT_STUDY
    study = open_study(name, storage, sampler, conf.direction, space)
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")
    log.info(f"Optuna study {name} ({storage_kind(conf.storage)} storage), "
             f"{conf.n_trials} trials, sampler {type(sampler).__name__}"
             + (f", pruner {type(pruner).__name__}" if pruning else ""))
    returns, mine = [], set()
    with Heartbeat(study, storage, conf.heartbeat_interval) as heartbeat:
        while True:
            with study_lock(conf.storage, name):
                requeue_interrupted(study, storage, conf.grace_period, mine)
                batch = claim_trials(study, space, conf.n_trials, conf.n_jobs)
                for trial in batch:
                    heartbeat.claim(trial)
                    mine.add(trial.number)
            if not batch:
                others = running_elsewhere(study, mine)
                if not others:
                    break
                # a peer may die: its trial then comes back to the queue, and runs here
                log.info(f"Waiting for trials {others}, running in other processes")
                time.sleep(min(5, conf.heartbeat_interval))
                continue
            results = launcher.launch(_jobs(space, batch), initial_job_idx=batch[0].number)
            for trial, result in zip(batch, results):
                _tell(study, storage, trial, result)
                heartbeat.release(trial.number)
            returns.append(results)
    _write_results(sweep_dir / "optimization_results.yaml", study, conf)
    return returns


def _check_pruning(conf: DictConfig, config: DictConfig) -> bool:
    if conf.pruner._target_ == NO_PRUNER:
        return False
    if storage_kind(conf.storage) == "memory":
        raise ConfigError("pruning needs a storage the trials' jobs can reach: set "
                          "hydra.sweeper.storage (sqlite:///..., postgresql://... or a journal "
                          "file), or hydra/sweeper/pruner=none")
    if config.optimized_metric not in PER_EPOCH_METRICS:
        raise ConfigError(f"optimized_metric={config.optimized_metric} is not measured after "
                          f"every epoch, so no pruner can judge it: use one of "
                          f"{', '.join(PER_EPOCH_METRICS)}, or hydra/sweeper/pruner=none")
    return True


def _instantiate(node: DictConfig, space: SearchSpace | None = None):
    """A sampler or pruner from its config; the grid sampler gets the space's grid."""
    from hydra.utils import instantiate

    extra = {"search_space": space.grid()} if node._target_.endswith("GridSampler") else {}
    try:
        return instantiate(node, **extra)
    except Exception as err:  # noqa: BLE001  Hydra wraps the class's own error
        cause = err.__cause__ or err
        raise ConfigError(f"{node._target_} cannot be made from its config: "
                          f"{str(cause).splitlines()[0]}") from None


def _jobs(space: SearchSpace, batch: list) -> list[list[str]]:
    """Each trial's overrides; its job writes into <sweep dir>/<trial number>, so that no two
    processes sharing a sweep folder write into the same one."""
    return [space.overrides(t.params) + [f"hydra.sweep.subdir={t.number}",
                                         f"hydra.sweeper.trial={t.number}"] for t in batch]


def _tell(study, storage, trial, result) -> None:
    """Complete with the job's value, pruned if its pruner stopped it, failed otherwise."""
    from hydra.core.utils import JobStatus

    stored = storage.get_trial(trial_id(storage, study.study_name, trial.number))
    value = result._return_value if result.status == JobStatus.COMPLETED else None
    if PRUNED_AT in stored.user_attrs:
        study.tell(trial, state=TrialState.PRUNED)
    elif isinstance(value, (int, float)) and math.isfinite(value):
        study.tell(trial, float(value))
    else:
        study.tell(trial, state=TrialState.FAIL)


def _write_results(path: Path, study, conf: DictConfig) -> None:
    """optimization_results.yaml: the best trial so far and how the study's trials ended."""
    states = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    try:
        best = study.best_trial
        best_block = {"best_trial": best.number, "best_params": dict(best.params),
                      "best_value": best.value}
    except ValueError:  # no trial completed
        best_block = {"best_trial": None}
    results = {"name": "optuna", "study_name": study.study_name,
               "storage": shown(conf.storage) if conf.storage else None,
               "direction": conf.direction, **best_block, "trials": states}
    OmegaConf.save(OmegaConf.create(results), path)
    if best_block["best_trial"] is not None:
        log.info(f"Best trial {best_block['best_trial']}: {best_block['best_value']} with "
                 f"{best_block['best_params']}")

