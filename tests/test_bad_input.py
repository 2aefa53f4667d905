"""The bad-input corpus: mistakes a new user makes, run through the real command line. Every case
asserts the exit code (2: input the user can fix), that stderr is exactly the expected ``error:``
line(s) and no traceback, and that every file that existed before (the run directory a command
points at, the user's data) is byte-identical afterwards.

Classes (issue #20): damaged run state (every file of every backend's checkpoint folder, the run's
config and metrics log); derived values that break a rule stated for explicit ones (one class
reached through the data of each format); bad values inside data files (non-finite pixels, a
file of the wrong kind); second entry points (task=predict/eval, the standalone predictor and
comparer); what Hydra and the Optuna sweeper find (unknown keys and options, unparsable
overrides, unresolvable interpolations, run directories that cannot be folders, search spaces
Optuna cannot sample, a sweep whose every trial fails); misleading messages. The README's
commands are checked by tests/test_readme.py."""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli
from test_datasets import _idx, py2_pickle, write_idx, write_image_folder

from cnnzoo.core.backend import backend_info, usable_backends

SHORT = ("trainer.max_epochs=1", "data.limit=64", "trainer.progress_bar=false",
         "export.num_images=8", "export.batch_sizes=[1,8]")
BACKENDS = usable_backends()


def snapshot(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots``."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def assert_refused(r, before: dict[str, str], after: dict[str, str], pattern: str,
                   code: int = 2) -> None:
    """Exit ``code``, stderr exactly one ``error:`` line matching ``pattern``, nothing that
    existed before changed or gone."""
    assert r.returncode == code, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.fullmatch("error: " + pattern, lines[0]), r.stderr[-3000:]
    assert {k: after.get(k) for k in before} == before, "a file that existed was changed"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished short run of each backend (the same command, run again, resumes it)."""
    top = tmp_path_factory.mktemp("finished")
    runs = {}
    for backend in BACKENDS:
        r = run_cli(top / backend, f"backend={backend}", *SHORT)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[backend] = r.run_dir
    return runs


def _copy(run: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


# ------------------------------------------------------------------------ damaged run state

@pytest.mark.parametrize("backend", BACKENDS)
def test_every_damaged_file_of_a_finished_run_is_refused_and_nothing_changes(finished, backend,
                                                                              tmp_path):
    """Garbled or deleted: each file of the checkpoint folder, and the run's config and metrics
    log, refused with the file named and the ways out; the run stays as it was."""
    folder = next((finished[backend] / "checkpoints").iterdir())
    cases = [(f"checkpoints/{folder.name}/{f.name}", how) for f in sorted(folder.iterdir())
             for how in ("garbled", "deleted")] + [("config.yaml", "garbled"),
                                                   ("metrics.csv", "garbled")]
    assert len(cases) >= 6
    for i, (name, how) in enumerate(cases):
        run = _copy(finished[backend], tmp_path, f"{i}")
        target = run / name
        if how == "deleted":
            target.unlink()
        else:
            target.write_bytes(b"{not json\n\x00\n")
        before = snapshot(run)
        r = run_cli(run, f"backend={backend}", *SHORT)
        expected = _refusal(run, folder.name, name, how)
        assert_refused(r, before, snapshot(run), expected)


def _refusal(run: Path, folder: str, name: str, how: str) -> str:
    """The error line (a pattern) for file ``name`` of ``run`` garbled or deleted."""
    fix = "restore it, or train in another hydra.run.dir"
    if name == "config.yaml":
        return rf"{run}/config.yaml cannot be read \(.*\): {fix}"
    if name == "metrics.csv":
        return rf"{run}/metrics.csv is damaged at line \d+ \(.*\): {fix}"
    file = Path(name).name
    problem = (re.escape(f"{file} is missing") if how == "deleted"
               else r"state.json cannot be read \(.*\)" if file == "state.json"
               else re.escape(f"{file} is not the file that was saved (its SHA-256 differs)"))
    return (rf"checkpoint {run}/checkpoints/{folder} is damaged: {problem}; delete the "
            "checkpoints folder to train from the start, or keep this run as it is and train in "
            "another hydra.run.dir")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_changed_training_config_or_a_backend_option_is_refused_on_a_finished_run(
        finished, backend, tmp_path):
    run = _copy(finished[backend], tmp_path, "run")
    before = snapshot(run)
    r = run_cli(run, f"backend={backend}", *SHORT, "optim.lr=0.5")
    assert_refused(r, before, snapshot(run), rf"cannot resume {run}: optim.lr: the run was "
                   r"started with .*, now 0.5; use the run's own settings, or another "
                   "hydra.run.dir")
    option, rule = next(iter(backend_info(backend).options.items()))
    r = run_cli(run, f"backend={backend}", *SHORT, f"backend.{option}=oops")
    assert_refused(r, before, snapshot(run),
                   re.escape(f"backend.{option}='oops' is invalid: expected {rule.allowed}"))


# ----------------------------------------------------------------- data: each format, backend

def _one_class_folder(root: Path) -> list[str]:
    write_image_folder(root, n_per_class=6, classes=(3,))
    return ["data=image_folder", f"data.path={root}"]


def _one_class_idx(root: Path) -> list[str]:
    write_idx(root, n_train=40, n_val=10)
    for part, n in (("train", 40), ("t10k", 10)):
        (root / f"{part}-labels-idx1-ubyte").write_bytes(_idx(np.zeros(n, np.uint8)))
    return ["data=mnist", f"data.path={root}"]


def _one_class_cifar(root: Path) -> list[str]:
    root.mkdir()
    rows = np.random.default_rng(0).integers(0, 255, (20, 3072), np.uint8)
    for name in ("data_batch_1", "test_batch"):  # no batches.meta: classes 0 .. max label
        (root / name).write_bytes(py2_pickle({b"labels": [0] * 20, b"data": rows}))
    return ["data=cifar10", f"data.path={root}"]


def _one_class_npz(root: Path) -> list[str]:
    root.mkdir()
    np.savez(root / "one.npz", x=np.random.default_rng(0).random((40, 8, 8), np.float32),
             y=np.zeros(40, np.int64))
    return ["data=npz", f"data.path={root / 'one.npz'}"]


def _nan_npz(root: Path) -> list[str]:
    root.mkdir()
    x = np.random.default_rng(0).random((40, 8, 8), np.float32)
    x[13, 2, 5] = np.nan
    np.savez(root / "nan.npz", x=x, y=np.arange(40) % 4)
    return ["data=npz", f"data.path={root / 'nan.npz'}"]


def _inf_idx(root: Path) -> list[str]:
    write_idx(root, n_train=40, n_val=10)
    x = np.random.default_rng(0).random((40, 28, 28), np.float32)
    x[21, 0, 0] = np.inf
    (root / "train-images-idx3-ubyte").write_bytes(_idx(x, 0x0D))
    return ["data=mnist", f"data.path={root}"]


def _not_a_zip(root: Path) -> list[str]:
    root.mkdir()
    (root / "images.npz").write_bytes(b"x,y\n0.5,1\n")
    return ["data=npz", f"data.path={root / 'images.npz'}"]


DATA_CASES = {
    "one-class-image-folder": (_one_class_folder, "image_folder {root}: only one class "
                               r"\('digit_3'\): a classifier needs at least 2; add images of "
                               "another class"),
    "one-class-idx": (_one_class_idx, r"mnist {root}: only one class \('0'\): a classifier "
                      "needs at least 2; add images of another class"),
    "one-class-cifar": (_one_class_cifar, r"cifar10 {root}: only one class \('0'\): a "
                        "classifier needs at least 2; add images of another class"),
    "one-class-npz": (_one_class_npz, r"npz {root}/one.npz: only one class \('0'\): a "
                      "classifier needs at least 2; add images of another class"),
    "nan-npz": (_nan_npz, "npz {root}/nan.npz: training image 13 has NaN or infinite values: "
                "fix or remove it"),
    "inf-idx": (_inf_idx, "mnist {root}: training image 21 has NaN or infinite values: fix or "
                "remove it"),
    "npz-not-a-zip": (_not_a_zip, r"npz: cannot read {root}/images.npz: it is not a zip "
                      r"archive, as an .npz file \(np.savez\) is; expected an .npz file written "
                      "by np.savez without object arrays"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_one_line_before_training_and_the_data_is_untouched(case, backend, tmp_path):
    make, pattern = DATA_CASES[case]
    root = tmp_path / "data"
    overrides = make(root)
    before = snapshot(root)
    r = run_cli(tmp_path / "run", f"backend={backend}", *SHORT, *overrides)
    assert_refused(r, before, snapshot(root), pattern.format(root=root))
    assert r.frameworks == set()  # found before the backend's framework loads
    assert not (tmp_path / "run" / ".hydra").exists()  # no record of a refused command


# ------------------------------------------- config, Hydra, second entry points, on a finished run

CONFIG_CASES = {
    "unknown-key": (["nosuch.key=1"], re.escape(
        "Could not override 'nosuch.key': it is not a config key (to append to your config use "
        "+nosuch.key=1; python run.py --cfg job lists every key)")),
    "unknown-option": (["arch=nosuch"], "arch/nosuch: no such option; arch is one of alexnet, "
                       ".*, xception"),
    "tilde": (["data=npz", "data.path=~/mine.npz"], re.escape(
        "cannot parse the override 'data.path=~/mine.npz' (the shell does not expand ~ after "
        "key=: write $HOME/...): quote values with special characters, e.g. 'key=\"value\"' ("
        "https://hydra.cc/docs/advanced/override_grammar/basic/)")),
    "unclosed-list": (["data.mean=[0.5"], "cannot parse the override 'data.mean=\\[0.5': .*"),
    "interpolation": (["optim.lr=${nope}"], re.escape(
        "optim.lr: Interpolation key 'nope' not found: an ${...} interpolation that cannot be "
        "resolved; fix the value")),
    "mean-length": (["data.mean=[0.1,0.2]"], re.escape(
        "data.mean has 2 values but arch.in_channels is 1: give 1")),
    "another-task-over-a-run": (["task=summary"], re.escape(
        "hydra.run.dir={run} holds the results of task=train: run task=summary in another "
        "hydra.run.dir")),
    "predict-without-model": (["task=predict", "predict.inputs=[a.png]"], re.escape(
        "predict.model=None is invalid: expected the path of an exported model.onnx or "
        "deploy.prototxt")),
    "predict-model-not-onnx": (["task=predict", "predict.model={run}/metrics.csv",
                                "predict.inputs=[{run}/curves.png]"],
                               "predict: {run}/metrics.csv is not a loadable ONNX model: .*"),
    "eval-without-run": (["task=eval"], re.escape(
        "eval.run_dir=None is not a finished training run (needs config.yaml and results.json): "
        "give a run directory of task=train")),
    "eval-damaged-config": (["task=eval", "eval.run_dir={other}"], re.escape(
        "{other}/config.yaml cannot be read (") + ".*" + re.escape(
        "): restore it, or evaluate another run")),
    "eval-damaged-checkpoint": (["task=eval", "eval.run_dir={ckpt}"], re.escape(
        "checkpoint {ckpt}/checkpoints/epoch-0001 is damaged: ") + ".*"),
    "predict-input-not-an-image": (["task=predict", "predict.model={run}/model.onnx",
                                    "predict.inputs=[{run}/metrics.csv]"], re.escape(
        "predict: cannot read {run}/metrics.csv: not a readable PNG, JPEG or BMP image")),
    "weights-not-a-zip": (["task=verify", "verify.weights={run}/metrics.csv"], re.escape(
        "verify.weights={run}/metrics.csv: {run}/metrics.csv: not a weights file this tool "
        "reads (pth, safetensors, h5, params, npz); give a torch .pth, .safetensors, Keras .h5, "
        "Gluon .params or .npz (lenet5 at input_size 32, 10 classes)")),
    "optuna-log-from-zero": (["hparams_search=optuna", "optim.lr=tag(log, interval(0, 0.1))"],
                             re.escape("Optuna search space 'optim.lr=tag(log, interval(0, 0.1))': "
                                       "`low > 0` must hold for `log=True`, but got "
                                       "(low=0.0, high=0.1).")),
    "optuna-reversed": (["hparams_search=optuna", "optim.lr=interval(0.1, 0.001)"], re.escape(
        "Optuna search space 'optim.lr=interval(0.1, 0.001)': `low <= high` must hold, but got "
        "(low=0.1, high=0.001).")),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_mistaken_command_on_a_finished_run_is_one_line_and_changes_nothing(case, finished,
                                                                              tmp_path):
    run = _copy(finished[BACKENDS[0]], tmp_path, "run")
    # damaged copies of another finished run, for task=eval to read
    other, ckpt = _copy(run, tmp_path, "other"), _copy(run, tmp_path, "ckpt")
    (other / "config.yaml").write_text("arch: [unclosed\n")
    # the epoch folder's largest file: the backend's model state, whatever its name
    max((ckpt / "checkpoints" / "epoch-0001").iterdir(), key=lambda f: f.stat().st_size
        ).write_bytes(b"\0")
    overrides, pattern = CONFIG_CASES[case]
    paths = {"{run}": str(run), "{other}": str(other), "{ckpt}": str(ckpt)}
    for name, path in paths.items():
        overrides = [o.replace(name, path) for o in overrides]
        pattern = pattern.replace(re.escape(name), re.escape(path)).replace(name, re.escape(path))
    if "hparams_search=optuna" in overrides:  # a sweep: its folder and study in the run's
        overrides += [f"hydra.sweep.dir={run}", f"hydra.sweeper.storage=sqlite:///{run}/s.db"]
    # the other tasks read the finished run (a run directory holds one task's results)
    into = tmp_path / "out" if any(o in ("task=eval", "task=predict", "task=verify")
                                   for o in overrides) else run
    before = snapshot(tmp_path)
    r = run_cli(into, f"backend={BACKENDS[0]}", *SHORT, *overrides)
    assert_refused(r, before, snapshot(tmp_path), pattern)


@pytest.mark.parametrize("where", ["file", "under-file"])
@pytest.mark.parametrize("mode", ["run", "sweep"])
def test_a_run_directory_that_cannot_be_a_folder_is_one_line(finished, tmp_path, where, mode):
    run = _copy(finished[BACKENDS[0]], tmp_path, "run")
    target = run / "results.json" if where == "file" else run / "results.json" / "next"
    before = snapshot(run)
    key = f"hydra.{mode}.dir"
    if mode == "run":
        r = run_cli(target, *SHORT)
    else:
        r = run_cli(tmp_path / "unused", "-m", "optim.lr=0.1,0.2", *SHORT, f"{key}={target}")
    which = "is" if where == "file" else f"lies under {run / 'results.json'}, which is"
    assert_refused(r, before, snapshot(run),
                   re.escape(f"{key}={target} {which} a file, not a folder: choose another {key}"))


@pytest.mark.parametrize("argv, garble, pattern", [
    (["-m", "cnnzoo.predict", "{run}/model.onnx", "{run}/curves.png", "--top-k", "0"], None,
     "--top-k=0 is invalid: expected a positive integer"),
    (["-m", "cnnzoo.predict", "{run}/model.onnx", "{run}/curves.png", "--top-k", "-1"], None,
     "--top-k=-1 is invalid: expected a positive integer"),
    (["-m", "cnnzoo.predict", "{run}/config.yaml", "{run}/curves.png"], None,
     "predict: {run}/config.yaml is not a loadable ONNX model: .*"),
    (["-m", "cnnzoo.compare", "{run}/nothing-here"], None,
     "not a directory: {run}/nothing-here: give run directories or a multirun directory"),
    (["-m", "cnnzoo.compare", "{run}/checkpoints"], None,
     "{run}/checkpoints holds no run \\(no results.json found below it\\)"),
    (["-m", "cnnzoo.compare", "{run}"], "results.json",
     "{run}/results.json cannot be read \\(.*\\): restore it, or leave that run out"),
], ids=["predict-top-k-0", "predict-top-k-negative", "predict-not-onnx", "compare-missing",
        "compare-no-run", "compare-damaged-results"])
def test_the_standalone_commands_refuse_like_run_py(finished, tmp_path, argv, garble, pattern):
    run = _copy(finished[BACKENDS[0]], tmp_path, "run")
    if garble:
        (run / garble).write_text("{oops")
    before = snapshot(run)
    r = subprocess.run([sys.executable, *(a.replace("{run}", str(run)) for a in argv)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_refused(r, before, snapshot(run), pattern.replace("{run}", re.escape(str(run))))


def test_an_optuna_sweep_whose_every_trial_fails_ends_like_a_grid_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli(tmp_path / "unused", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                *SHORT, "data.batch_size=choice(0, -4)", f"hydra.sweep.dir={sweep}",
                f"hydra.sweeper.storage=sqlite:///{sweep}/study.db")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors[-1] == (f"error: 2 of 2 trials failed, more than sweep.max_failure_rate=0.5; "
                          f"see {sweep}/sweep_summary.md")
    assert (sweep / "sweep_summary.csv").read_text().count(",failed,") == 2


def test_a_resumed_sweep_keeps_a_damaged_trial_as_it_is_and_reports_it(tmp_path):
    sweep = tmp_path / "sweep"
    args = ("-m", "optim.lr=0.001,0.002", *SHORT, f"hydra.sweep.dir={sweep}")
    assert run_cli(tmp_path / "unused", *args).returncode == 0
    (sweep / "0" / "results.json").write_text("{oops")
    before = snapshot(sweep / "0")
    r = run_cli(tmp_path / "unused", *args)  # the same sweep again: trial 1 re-exports
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"error: {sweep}/0/results.json cannot be read (" in r.stderr
    assert snapshot(sweep / "0") == before
    summary = (sweep / "sweep_summary.csv").read_text()
    assert summary.count(",failed,") == 1 and summary.count(",ok,") == 1
