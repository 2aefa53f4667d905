"""Registers cnnzoo's resumable Optuna sweeper with Hydra, which loads sweepers only from the
``hydra_plugins`` namespace. Hydra imports this module at every start: keep it light."""
try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # the [sweeps] extra is not installed: there is no Optuna sweeper to extend
    OptunaSweeper = None

if OptunaSweeper is not None:
    class ResumableOptunaSweeper(OptunaSweeper):
        """hydra-optuna-sweeper that continues an interrupted study, refuses a search space
        that Optuna cannot sample and ends like a grid sweep when every trial failed
        (cnnzoo/app/optuna_sweeper.py)."""

        def sweep(self, arguments):
            from cnnzoo.app.optuna_sweeper import (
                check_search_space,
                no_trial_completed,
                prepare_resume,
            )

            check_search_space(self.sweeper, arguments)
            prepare_resume(self.sweeper)
            try:
                return super().sweep(arguments)
            except ValueError:
                if not no_trial_completed(self.sweeper):
                    raise
                return None  # every trial failed: the sweep summary says so and exits 1
