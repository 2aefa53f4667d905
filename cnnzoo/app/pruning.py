"""A trial's side of pruning: after every epoch, its optimized metric goes to the Optuna trial
(through the study's storage, from whatever process or machine runs the job), and the trial
stops when the study's pruner says so. The Optuna sweeper names the trial in the job's Hydra
config (``hydra.sweeper.trial``); the backends call this as an epoch-end hook."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..core.errors import ConfigError

SWEEPER = "hydra_plugins.cnnzoo_optuna.OptunaSweeper"
NO_PRUNER = "optuna.pruners.NopPruner"
DEFAULT_STUDY = "cnnzoo"  # hydra.sweeper.study_name: null


@dataclass
class TrialReporter:
    storage: str
    study_name: str
    number: int
    pruner: dict       # hydra.sweeper.pruner, instantiated in the job's own process
    metric: str        # optimized_metric
    _trial: object = field(default=None, repr=False, compare=False)

    def __call__(self, row: dict) -> str | None:
        """Report the epoch's metric; the reason to stop when the pruner prunes the trial."""
        from .optuna_study import PRUNED_AT

        trial, epoch, value = self.trial(), row["epoch"], row.get(self.metric)
        if value is None:
            return None
        trial.report(float(value), step=epoch)
        if not trial.should_prune():
            return None
        trial.set_user_attr(PRUNED_AT, epoch)
        return f"pruned by {type(trial.study.pruner).__name__} after epoch {epoch}: " \
               f"{self.metric} = {value:.4f}"

    def trial(self):
        if self._trial is None:
            import optuna
            from hydra.utils import instantiate

            from .optuna_study import open_storage, trial_id

            storage = open_storage(self.storage)
            study = optuna.load_study(study_name=self.study_name, storage=storage,
                                      sampler=optuna.samplers.RandomSampler(),
                                      pruner=instantiate(self.pruner))
            self._trial = optuna.trial.Trial(study, trial_id(storage, self.study_name,
                                                             self.number))
        return self._trial

    def __getstate__(self) -> dict:  # travels to spawned processes without its connection
        return {**self.__dict__, "_trial": None}


def trial_reporter(cfg, hydra_cfg) -> TrialReporter | None:
    """The hook for a job the Optuna sweeper launched with a pruner; None otherwise."""
    from omegaconf import OmegaConf

    sweeper = hydra_cfg.sweeper
    if sweeper.get("_target_") != SWEEPER or sweeper.get("trial") is None \
            or sweeper.pruner._target_ == NO_PRUNER:
        return None
    hw = cfg.hardware
    if hw.devices != 1 or hw.num_nodes != 1:
        raise ConfigError(f"pruning stops a trial in one process: hardware.devices={hw.devices} "
                          f"hardware.num_nodes={hw.num_nodes} would leave the others waiting; "
                          f"use one device per trial, or hydra/sweeper/pruner=none")
    return TrialReporter(sweeper.storage, sweeper.study_name or DEFAULT_STUDY, int(sweeper.trial),
                         OmegaConf.to_container(sweeper.pruner), cfg.optimized_metric)
