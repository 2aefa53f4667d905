"""Registers cnnzoo's resumable Optuna sweeper with Hydra, which loads sweepers only from the
``hydra_plugins`` namespace. Hydra imports this module at every start: keep it light."""
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class ResumableOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper that continues an interrupted study (see cnnzoo/optuna_sweeper.py)."""

    def sweep(self, arguments):
        from cnnzoo.optuna_sweeper import prepare_resume

        prepare_resume(self.sweeper)
        return super().sweep(arguments)
