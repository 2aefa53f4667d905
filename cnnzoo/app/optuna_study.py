"""One Optuna study shared by every sweeper process that names it: its storage, who runs what.

Several sweeper processes (one machine or many, the same command and ``storage``) share a
study's trials: none runs twice, none is lost, and the study stops at ``n_trials``.
- **Claiming** a trial happens under a lock held across processes (``study_lock``: a lock file
  beside a SQLite database or a journal file, an advisory lock in PostgreSQL or MySQL), so that
  counting the study's trials and asking for the next one cannot interleave.
- **Liveness**: a sweeper marks each trial it runs with its host and process id, and a
  heartbeat thread stamps them every ``heartbeat_interval`` seconds. A RUNNING trial whose
  process is gone (same host) or whose stamp is older than ``grace_period`` was interrupted:
  it is marked failed and interrupted, and its parameters are queued again (Optuna's WAITING
  trials, which the next ``ask`` of any process takes first, exactly once).
Optuna's own heartbeat exists for relational storages only; this one works for journal files
too, through trial attributes that any storage keeps.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..core.errors import ConfigError
from .optuna_space import SearchSpace

log = logging.getLogger(__name__)

OWNER, BEAT, INTERRUPTED, RETRY_OF = ("cnnzoo:owner", "cnnzoo:heartbeat", "cnnzoo:interrupted",
                                      "cnnzoo:retry_of")
PRUNED_AT = "cnnzoo:pruned_at_epoch"  # set by the trial's job when the pruner stopped it


def storage_kind(url: str | None) -> str:
    """memory, sqlite, postgresql, mysql or journal; ConfigError for anything else."""
    if url is None:
        return "memory"
    if "://" not in url:
        return "journal"
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme in ("sqlite", "postgresql", "mysql"):
        return scheme
    raise ConfigError(f"hydra.sweeper.storage={shown(url)}: a {scheme} URL is not a storage "
                      f"this sweeper can share; use sqlite:///..., postgresql://..., "
                      f"mysql+pymysql://... or a journal file's path")


def shown(url: str) -> str:
    """The URL with its password hidden, for messages."""
    if "://" not in url or "@" not in url:
        return url
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)


def open_storage(url: str | None):
    """The Optuna storage ``url`` names (None: in memory). One ConfigError line when it cannot
    be opened (an unreachable server, a missing driver, a database of an older Optuna)."""
    kind = storage_kind(url)
    if kind == "memory":
        return optuna.storages.InMemoryStorage()
    try:
        if kind == "journal":
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend
            return optuna.storages.JournalStorage(JournalFileBackend(url))
        if kind == "sqlite":
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # two processes creating Optuna's tables in a new database at once collide
        with study_lock(url, "optuna-tables"):
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_options(kind))
    except Exception as err:  # noqa: BLE001  SQLAlchemy's and the drivers' errors, many kinds
        raise ConfigError(f"hydra.sweeper.storage={shown(url)} cannot be opened: "
                          f"{_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    for ln in lines:  # SQLAlchemy puts the driver's reason after its own wrapper line
        if "upgrade" in ln or "Connection refused" in ln or "does not exist" in ln:
            text = ln
            break
    return re.sub(r"^\([\w.]+\) ", "", text)  # "(psycopg.OperationalError) ..."


def _engine_options(kind: str) -> dict:
    return {"connect_args": {"connect_timeout": 10}} if kind == "postgresql" else {}


@functools.lru_cache(maxsize=None)
def _lock_engine(url: str):
    from sqlalchemy import create_engine
    return create_engine(url, **_engine_options(storage_kind(url)))


@contextlib.contextmanager
def study_lock(url: str | None, study_name: str):
    """Held while a process counts the study's trials and claims the next: one process at a
    time, across machines where the storage is shared."""
    kind = storage_kind(url)
    if kind == "memory":
        yield
        return
    if kind in ("journal", "sqlite"):
        path = url if kind == "journal" else url[len("sqlite:///"):]
        # one lock for the studies of one file (not <path>.lock: Optuna's journal uses that)
        with open(f"{path}.cnnzoo-lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    from sqlalchemy import text

    key = _key(study_name)
    take, give = (("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)")
                  if kind == "postgresql" else
                  ("SELECT GET_LOCK(:k, 600)", "SELECT RELEASE_LOCK(:k)"))
    arg = key if kind == "postgresql" else f"cnnzoo-{key}"
    with _lock_engine(url).connect() as conn:
        conn.execute(text(take), {"k": arg})
        try:
            yield
        finally:
            conn.execute(text(give), {"k": arg})


def _key(study_name: str) -> int:
    """A signed 64-bit number for the study (PostgreSQL's advisory lock key)."""
    return int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)


def trial_id(storage, study_name: str, number: int) -> int:
    """The storage's id of the study's trial ``number`` (what its per-trial calls take)."""
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study_name), number)


def open_study(name: str, storage, sampler, direction: str, space: SearchSpace):
    """Create the study, or load it when it exists and was made for the same direction and
    search space (ConfigError otherwise: its trials would mean something else). A loaded
    study's sampler is reseeded: the configured seed fixes the process that created the
    study, and would make a resumed or a second process draw the same parameters again."""
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        try:
            return optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                       direction=direction)
        except optuna.exceptions.DuplicatedStudyError:  # another process created it just now
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    sampler.reseed_rng()
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {name} was created to {study.direction.name.lower()}, not to "
                          f"{direction}: keep hydra.sweeper.direction as it was, or start "
                          f"another study (hydra.sweeper.study_name)")
    for trial in study.get_trials(deepcopy=False):
        for key, dist in trial.distributions.items():
            new = space.distributions.get(key)
            if new is not None and new != dist:
                raise ConfigError(f"study {name} was created with another search space: {key} "
                                  f"was {dist}, now {new}; keep the search space, or start "
                                  f"another study (hydra.sweeper.study_name)")
    return study


class Heartbeat:
    """Stamps the trials this process runs every ``interval`` seconds, from a thread."""

    def __init__(self, study, storage, interval: float):
        self.storage, self.interval, self.study_name = storage, interval, study.study_name
        self.trials: dict[int, int] = {}  # number -> trial id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="optuna-heartbeat")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def claim(self, trial: optuna.Trial) -> None:
        """``trial`` is this process's now (its host and pid), stamped at once."""
        self.trials[trial.number] = trial_id(self.storage, self.study_name, trial.number)
        trial.set_user_attr(OWNER, f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr(BEAT, time.time())

    def release(self, number: int) -> None:
        self.trials.pop(number, None)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for trial_id in list(self.trials.values()):
                try:
                    self.storage.set_trial_user_attr(trial_id, BEAT, time.time())
                except Exception as err:  # noqa: BLE001  finished meanwhile, or a brief outage
                    log.debug(f"heartbeat of trial {trial_id}: {err}")


def interrupted(trial: FrozenTrial, grace_period: float, now: float) -> bool:
    """Whether a RUNNING trial has lost the process that ran it. Called under ``study_lock``,
    which a process holds from asking for a trial until it has stamped it: a trial without a
    stamp lost its process in between (the lock is released when a process dies)."""
    if OWNER not in trial.user_attrs:
        return True
    host, _, pid = str(trial.user_attrs[OWNER]).rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return True
    return now - trial.user_attrs.get(BEAT, now) > grace_period


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def requeue_interrupted(study, storage, grace_period: float, mine: set[int]) -> None:
    """Fail each interrupted trial (not one of ``mine``) and queue its parameters again.
    Call under ``study_lock``."""
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.number in mine or not interrupted(trial, grace_period, now):
            continue
        storage.set_trial_user_attr(trial_id(storage, study.study_name, trial.number),
                                    INTERRUPTED, True)
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
        log.info(f"Trial {trial.number} was interrupted (its sweeper stopped): its parameters "
                 f"are queued again")


def counted(study) -> list[FrozenTrial]:
    """The trials that count towards n_trials: all but the interrupted ones (each came back as
    a queued trial, which counts)."""
    return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(INTERRUPTED)]


def claim_trials(study, space: SearchSpace, n_trials: int, count: int) -> list[optuna.Trial]:
    """Up to ``count`` trials for this process: queued ones first, then new ones while the study
    holds fewer than ``n_trials``. Call under ``study_lock``."""
    trials = counted(study)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    room = waiting + max(0, n_trials - len(trials))
    return [study.ask(space.distributions) for _ in range(min(count, room))]


def running_elsewhere(study, mine: set[int]) -> list[int]:
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number not in mine]
