"""Resume support for Hydra's Optuna sweeper (the plugin class is in hydra_plugins/cnnzoo_optuna).

hydra-optuna-sweeper reloads a study from its storage (``load_if_exists``) but then runs
``n_trials`` more trials, and a trial killed mid-run stays RUNNING forever. Re-running the same
command with this sweeper instead continues the study to ``n_trials`` in total: finished trials
count, a killed trial is marked failed and its parameters are queued again (so it is neither
lost nor repeated twice), job numbers continue after the existing trials so no trial directory
is overwritten, and the sampler is reseeded so that it does not replay the first session's
random draws (the run's seed fixes the first session only).
"""
from __future__ import annotations

import logging
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..core.errors import ConfigError

log = logging.getLogger(__name__)


def prepare_resume(impl) -> None:
    """Adjust hydra-optuna-sweeper's ``impl`` (its OptunaSweeperImpl) before it sweeps."""
    _make_sqlite_dir(impl.storage)
    study = _load_study(impl.study_name, impl.storage)
    if study is None:
        return
    interrupted = set(study.user_attrs.get("interrupted_trials", []))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # killed mid-run: fail it and queue the same parameters again
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params)
        interrupted.add(trial.number)
        log.info(f"Trial {trial.number} was interrupted: its parameters are queued again")
    study.set_user_attr("interrupted_trials", sorted(interrupted))
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state.is_finished() and t.number not in interrupted]
    impl.n_trials = max(0, impl.n_trials - len(done))
    if hasattr(impl.sampler, "reseed_rng"):
        # the seeded sampler would replay the first session's random draws: repeated trials
        impl.sampler.reseed_rng()
    impl.job_idx = sum(t.state != TrialState.WAITING for t in trials)
    log.info(f"Resuming study {impl.study_name}: {len(done)} trials done, {impl.n_trials} to go")


def check_search_space(impl, arguments: list[str]) -> None:
    """Refuse, one line per parameter, a search space Optuna cannot sample (an empty or
    reversed interval, a log scale that reaches 0), before any trial runs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    errors = []
    parser = OverridesParser.create()
    for text in [*impl._parse_sweeper_params_config(), *arguments]:
        override = parser.parse_override(text)
        if not override.is_sweep_override():
            continue
        try:
            create_optuna_distribution_from_override(override)
        except (ValueError, NotImplementedError) as err:
            errors.append(f"Optuna search space {text!r}: {str(err).splitlines()[0]}")
    if errors:
        raise ConfigError("\n".join(errors))


def no_trial_completed(impl) -> bool:
    """Whether the study has no finished trial (every one failed): hydra-optuna-sweeper then
    fails asking for the best one; the sweep summary reports the failures instead."""
    study = _load_study(impl.study_name, impl.storage)
    return study is None or not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _load_study(name: str | None, storage) -> optuna.Study | None:
    if not name or not storage:
        return None
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # no such study yet
        return None


def _make_sqlite_dir(storage) -> None:
    """SQLite creates the database file, not its folder."""
    prefix = "sqlite:///"
    if isinstance(storage, str) and storage.startswith(prefix):
        Path(storage[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
