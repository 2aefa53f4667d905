"""The Optuna sweeper (``hparams_search=optuna``), through real sweeps of ``run.py``: a study that
resumes after a kill, pruning from a trial in another process, two sweeper processes sharing
one study in a journal file and in a PostgreSQL server the test starts, optuna-dashboard
serving a finished study, and the one-line refusals."""
import csv
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from conftest import ROOT, compose_cfg, run_cli
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

STUDY = "lenet5-torch-digits"
FAST = ["trainer.max_epochs=1", "export.enabled=false", "data.limit=400",
        "trainer.progress_bar=false", "hardware.threads=1"]


def sweep_cmd(sweep: Path, storage: str, n_trials: int, *extra: str) -> list[str]:
    return [sys.executable, "run.py", "hparams_search=optuna", f"hydra.sweeper.n_trials={n_trials}",
            f"hydra.sweep.dir={sweep}", f"hydra.sweeper.storage={storage}", *FAST, *extra]


def journal(path: str):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))


def trials(storage: str, *states: TrialState) -> list:
    """The study's trials; ``storage``: a database URL or a journal file's path."""
    study = optuna.load_study(study_name=STUDY,
                              storage=storage if "://" in storage else journal(storage))
    return study.get_trials(states=states or None)


def summary_rows(sweep: Path) -> list[dict]:
    return list(csv.DictReader((sweep / "sweep_summary.csv").open()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completed_trials(db: Path) -> int:
    """COMPLETE trials in an Optuna SQLite file, read without creating anything: optuna's
    load_study would create the schema, and one created at the moment the sweeper creates it
    kills the sweeper (sqlite3.IntegrityError on alembic_version)."""
    if not db.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # the sweeper has not made its tables yet
        return 0


def test_a_study_resumes_after_a_kill_without_losing_or_repeating_trials(tmp_path):
    sweep = tmp_path / "optuna"
    storage = f"sqlite:///{sweep}/study.db"
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        proc = subprocess.Popen(sweep_cmd(sweep, storage, 4), cwd=ROOT, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if completed_trials(sweep / "study.db") >= 2:
            break
    assert proc.poll() is None, f"the sweep ended before it was killed:\n{log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, mid-sweep
    proc.wait()
    assert 2 <= len(trials(storage, TrialState.COMPLETE)) < 4

    r = subprocess.run(sweep_cmd(sweep, storage, 4), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    complete = trials(storage, TrialState.COMPLETE)
    assert len(complete) == 4
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == 4  # nothing repeated (the resumed sampler is reseeded)
    assert not trials(storage, TrialState.RUNNING, TrialState.WAITING)
    # a trial killed mid-run was run again with the same parameters, not lost (one killed
    # before its parameters were drawn had none to keep)
    for t in trials(storage, TrialState.FAIL):
        assert t.user_attrs["cnnzoo:interrupted"] is True
        assert not t.params or tuple(sorted(t.params.items())) in params
    # every complete trial has its own run directory, named by its number
    assert all((sweep / str(t.number) / "results.json").exists() for t in complete)


@pytest.fixture(scope="module")
def pruned_study(tmp_path_factory):
    """A finished two-trial study in a journal file, its trials run by the joblib launcher (in
    worker processes): a good learning rate first, then one the median pruner stops after
    epoch 1. The parameters are queued in the study beforehand, so the outcome is certain."""
    sweep = tmp_path_factory.mktemp("pruned") / "sweep"
    storage = str(sweep / "study.log")
    sweep.mkdir()
    study = optuna.create_study(study_name=STUDY, direction="maximize", storage=journal(storage))
    for lr in (0.01, 1e-6):
        study.enqueue_trial({"optim.lr": lr})
    r = subprocess.run(sweep_cmd(sweep, storage, 2, "trainer.max_epochs=3", "launcher=joblib",
                                 "hydra/sweeper/pruner=median",
                                 "hydra.sweeper.pruner.n_startup_trials=1",
                                 "hydra.sweeper.pruner.n_warmup_steps=0",
                                 "optim.lr=tag(log, interval(1e-7, 0.1))"),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    return sweep, storage, r


def test_a_trial_in_another_process_reports_each_epoch_and_is_pruned(pruned_study):
    sweep, storage, r = pruned_study
    assert r.returncode == 0, r.stderr[-3000:]
    good, bad = sorted(trials(storage), key=lambda t: t.number)
    assert (good.state, bad.state) == (TrialState.COMPLETE, TrialState.PRUNED)
    assert sorted(good.intermediate_values) == [1, 2, 3]  # every epoch, from the worker process
    assert list(bad.intermediate_values) == [1] and bad.user_attrs["cnnzoo:pruned_at_epoch"] == 1
    for t in (good, bad):  # the job ran in joblib's worker, the sweeper's process owns it
        assert "JoblibLauncher" in (sweep / str(t.number) / ".hydra" / "hydra.yaml").read_text()
    results = json.loads((sweep / str(bad.number) / "results.json").read_text())
    assert results["status"] == "pruned" and results["metrics"]["epoch"] == 1
    assert results["stopped"].startswith("pruned by MedianPruner after epoch 1: val_acc = ")
    assert "export" not in results  # a pruned trial is not exported
    # the pruned trial's epoch is kept; no later epoch ran
    checkpoints = sorted(p.name for p in (sweep / str(bad.number) / "checkpoints").iterdir())
    assert checkpoints == ["epoch-0001"]
    rows = {row["trial"]: row for row in summary_rows(sweep)}
    assert rows[str(bad.number)]["status"] == "pruned" and rows[str(bad.number)]["epochs"] == "1"
    assert rows[str(good.number)]["status"] == "ok" and rows[str(good.number)]["epochs"] == "3"
    assert "pruned by MedianPruner" in rows[str(bad.number)]["error"]
    best = (sweep / "optimization_results.yaml").read_text()
    assert f"best_trial: {good.number}" in best and "pruned: 1" in best


def test_optuna_dashboard_serves_the_finished_study(pruned_study):
    _, storage, _ = pruned_study
    port = free_port()
    server = subprocess.Popen([shutil.which("optuna-dashboard") or "optuna-dashboard", storage,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        studies = None
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as resp:
                    studies = json.load(resp)["study_summaries"]
                break
            except OSError:
                time.sleep(0.25)
        assert studies is not None, "optuna-dashboard did not answer"
        study = next(s for s in studies if s["study_name"] == STUDY)
        with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/api/studies/{study['study_id']}?after=0") as resp:
            served = json.load(resp)["trials"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [(t["number"], t["state"]) for t in served] == [(0, "Complete"), (1, "Pruned")]
    assert [v["step"] for v in served[1]["intermediate_values"]] == [1]


def two_sweepers_share_one_study(sweep: Path, storage: str, n_trials: int = 6) -> None:
    """Two sweeper processes, the same command and storage, started together."""
    cmd = sweep_cmd(sweep, storage, n_trials, "hydra.sweeper.heartbeat_interval=1")
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    done = trials(storage)
    assert len(done) == n_trials  # the total stops at n_trials
    assert {t.state for t in done} == {TrialState.COMPLETE}  # none lost
    assert len({tuple(sorted(t.params.items())) for t in done}) == n_trials  # none run twice
    owners = {t.user_attrs["cnnzoo:owner"] for t in done}
    assert owners == {f"{socket.gethostname()}:{p.pid}" for p in procs}  # both ran trials
    assert all((sweep / str(t.number) / "results.json").exists() for t in done)
    assert len(summary_rows(sweep)) == n_trials


def test_two_sweepers_share_a_study_in_a_journal_file(tmp_path):
    two_sweepers_share_one_study(tmp_path / "sweep", str(tmp_path / "sweep" / "study.log"))


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own (Debian's postgresql package; .ci/run installs it), on
    127.0.0.1, with an empty database; stopped afterwards. PostgreSQL refuses to run as root:
    then it runs as the postgres user."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL's server (initdb, pg_ctl) is not installed: apt-get install "
                    "postgresql")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="cnnzoo-pg-"))
    port = free_port()
    if as_user:
        shutil.chown(home, "postgres")
    data, log = home / "data", home / "server.log"
    try:
        subprocess.run([*as_user, initdb, "-D", data, "-U", "cnnzoo", "-A", "trust"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, pg_ctl, "-D", data, "-l", log, "-w", "-o",
                        f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
        shutil.rmtree(home, ignore_errors=True)
        pytest.skip(f"a PostgreSQL server could not be started here: {err}")
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(f"postgresql://cnnzoo@127.0.0.1:{port}/postgres",
                                          isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("CREATE DATABASE optuna"))
        engine.dispose()
        yield f"postgresql://cnnzoo@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "fast", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(home, ignore_errors=True)


def test_two_sweepers_share_a_study_in_postgresql(postgres_url, tmp_path):
    two_sweepers_share_one_study(tmp_path / "sweep", postgres_url)


@pytest.mark.parametrize("sampler", ["tpe", "multivariate_tpe", "gp", "cmaes", "random", "grid"])
def test_every_sampler_and_pruner_is_made_from_its_config(sampler):
    from cnnzoo.app.optuna_space import search_space
    from cnnzoo.app.optuna_sweeper import _instantiate
    from hydra_plugins.cnnzoo_optuna import PRUNERS

    discrete = ["optim.lr=choice(0.1, 0.01)", "data.batch_size=range(16, 64, 16)"]
    space = search_space(None, discrete if sampler == "grid" else [
        "optim.lr=tag(log, interval(1e-4, 0.1))", *discrete])
    for pruner in PRUNERS:
        cfg = compose_cfg("hparams_search=optuna", f"hydra/sweeper/sampler={sampler}",
                          f"hydra/sweeper/pruner={pruner}", return_hydra_config=True)
        made = _instantiate(cfg.hydra.sweeper.sampler, space)
        assert type(made).__name__ == cfg.hydra.sweeper.sampler._target_.rsplit(".", 1)[1]
        assert type(_instantiate(cfg.hydra.sweeper.pruner)).__module__.startswith("optuna.")
    if sampler == "grid":  # range(16, 64, 16): 16, 32, 48 (the end excluded, as Hydra's)
        assert space.grid() == {"optim.lr": [0.1, 0.01], "data.batch_size": [16, 32, 48]}


def test_the_grid_sampler_refuses_an_interval():
    from cnnzoo.app.optuna_space import search_space
    from cnnzoo.core.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.lr is an interval: use choice"):
        search_space(None, ["optim.lr=interval(0.1, 0.2)"]).grid()


def _study_with_one_trial(storage: str, direction: str) -> None:
    study = optuna.create_study(study_name=STUDY, storage=storage, direction=direction)
    study.add_trial(optuna.trial.create_trial(
        params={"optim.lr": 0.01}, value=0.5,
        distributions={"optim.lr": optuna.distributions.FloatDistribution(1e-4, 0.1, log=True)}))


@pytest.mark.parametrize("direction, overrides, message", [
    ("minimize", [], "study lenet5-torch-digits was created to minimize, not to maximize: keep "
     "hydra.sweeper.direction as it was, or start another study (hydra.sweeper.study_name)"),
    ("maximize", ["optim.lr=interval(0.1, 0.5)"],
     "study lenet5-torch-digits was created with another search space: optim.lr was "
     "FloatDistribution(high=0.1, log=True, low=0.0001, step=None), now FloatDistribution("
     "high=0.5, log=False, low=0.1, step=None); keep the search space, or start another study "
     "(hydra.sweeper.study_name)"),
], ids=["direction", "search-space"])
def test_a_study_made_otherwise_is_refused_and_kept(tmp_path, direction, overrides, message):
    storage = f"sqlite:///{tmp_path}/study.db"
    _study_with_one_trial(storage, direction)
    r = run_cli(tmp_path / "unused", "hparams_search=optuna", f"hydra.sweep.dir={tmp_path}/s",
                f"hydra.sweeper.storage={storage}", *FAST, *overrides)
    assert r.returncode == 2 and r.error_lines == [f"error: {message}"], r.stderr[-3000:]
    assert [(t.number, t.value) for t in trials(storage)] == [(0, 0.5)]  # intact


def test_an_unreachable_database_is_one_line(tmp_path):
    url = f"postgresql://cnnzoo@127.0.0.1:{free_port()}/optuna"
    r = run_cli(tmp_path / "unused", "hparams_search=optuna", f"hydra.sweep.dir={tmp_path}/s",
                f"hydra.sweeper.storage={url}", *FAST)
    assert r.returncode == 2 and len(r.error_lines) == 1, r.stderr[-3000:]
    assert r.error_lines[0].startswith(f"error: hydra.sweeper.storage={url} cannot be opened: ")
    assert "Connection refused" in r.error_lines[0]
    assert not (tmp_path / "s").exists()
