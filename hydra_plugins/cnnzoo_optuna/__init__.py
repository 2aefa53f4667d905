"""cnnzoo's Optuna sweeper for Hydra (``hparams_search=optuna``, conf/hparams_search/optuna.yaml).

Hydra imports the modules of the ``hydra_plugins`` namespace package at every start and finds
Sweeper subclasses there; this module also registers the configs ``hydra/sweeper=optuna``,
``hydra/sweeper/sampler=<name>`` and ``hydra/sweeper/pruner=<name>``. It stays light: Optuna is
imported only when a sweep starts (cnnzoo/app/optuna_sweeper.py does the work).
"""
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper

# Optuna's samplers and pruners, each instantiated from its ``_target_`` with the other keys as
# arguments (any argument of the class may be set: hydra.sweeper.sampler.seed=1). The grid
# sampler's search space is built from ``params`` (every parameter a choice or a range).
# n_startup_trials: random trials before the model-based samplers take over.
SAMPLERS = {
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": None, "n_startup_trials": 5},
    "multivariate_tpe": {"_target_": "optuna.samplers.TPESampler", "seed": None,
                         "n_startup_trials": 5, "multivariate": True},
    "gp": {"_target_": "optuna.samplers.GPSampler", "seed": None, "n_startup_trials": 5},
    "cmaes": {"_target_": "optuna.samplers.CmaEsSampler", "seed": None, "n_startup_trials": 1},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
    "grid": {"_target_": "optuna.samplers.GridSampler", "seed": None},
}
# a pruner judges a trial from the optimized metric reported after each epoch (the step)
PRUNERS = {
    "none": {"_target_": "optuna.pruners.NopPruner"},
    "median": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5,
               "n_warmup_steps": 1},
    "successive_halving": {"_target_": "optuna.pruners.SuccessiveHalvingPruner",
                           "min_resource": 1, "reduction_factor": 3},
    "hyperband": {"_target_": "optuna.pruners.HyperbandPruner", "min_resource": 1,
                  "max_resource": "auto", "reduction_factor": 3},
}


@dataclass
class OptunaSweeperConf:
    # _self_ first: the chosen sampler and pruner configs fill the two nodes below
    defaults: list = field(default_factory=lambda: ["_self_", {"sampler": "tpe"},
                                                    {"pruner": "none"}])
    _target_: str = "hydra_plugins.cnnzoo_optuna.OptunaSweeper"
    _recursive_: bool = False      # the sweeper instantiates sampler and pruner itself
    sampler: Any = None
    pruner: Any = None
    direction: str = "maximize"    # or minimize (a loss)
    study_name: Optional[str] = None
    # sqlite:///path.db, postgresql://user@host/db, mysql+pymysql://..., or a journal file's
    # path (several processes on a shared disk); null: in memory, this process only
    storage: Optional[str] = None
    n_trials: int = 20             # trials in the study, across every process and session
    n_jobs: int = 1                # trials launched at a time (in parallel with joblib)
    params: Optional[dict] = None  # key: search space (choice, range, interval, tag(log, ...))
    heartbeat_interval: int = 30   # seconds between a sweeper's signs of life for its trials
    grace_period: int = 120        # a trial silent this long lost its sweeper: it runs again
    trial: Optional[int] = None    # set by the sweeper in each trial's job: its trial number


class OptunaSweeper(Sweeper):
    def __init__(self, **conf: Any) -> None:
        from omegaconf import OmegaConf

        self.conf = OmegaConf.create(conf)
        self.launcher = self.config = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from cnnzoo.app.optuna_sweeper import sweep

        return sweep(self.conf, self.config, self.launcher, arguments)


store = ConfigStore.instance()
store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="cnnzoo")
for _name, _node in SAMPLERS.items():
    store.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="cnnzoo")
for _name, _node in PRUNERS.items():
    store.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="cnnzoo")
