"""Registers cnnzoo's resumable Optuna sweeper with Hydra, which loads sweepers only from the
``hydra_plugins`` namespace. Hydra imports this module at every start: keep it light."""
try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # the [sweeps] extra is not installed: there is no Optuna sweeper to extend
    OptunaSweeper = None

if OptunaSweeper is not None:
    class ResumableOptunaSweeper(OptunaSweeper):
        """hydra-optuna-sweeper that continues an interrupted study
        (cnnzoo/app/optuna_sweeper.py)."""

        def sweep(self, arguments):
            from cnnzoo.app.optuna_sweeper import prepare_resume

            prepare_resume(self.sweeper)
            return super().sweep(arguments)
