"""Exact resume after SIGKILL, reproducible seeded runs and divergence, for every backend.

The runs train LeNet-5 with dropout on shuffled digits with SGD momentum and a cosine schedule,
so a resumed run matches only if weights, optimizer state, schedule position, every random
generator and the data order all continue exactly."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, compose_cfg, run_cli

from cnnzoo.core.checkpoints import CheckpointDir

BACKENDS = ("torch", "keras", "mxnet")
EPOCHS = 6
RUN = ("arch.options.dropout=0.3", "optim=sgd", "optim.lr=0.02", "optim.momentum=0.9",
       "optim.scheduler=cosine", "data.batch_size=16", "data.limit=800",
       f"trainer.max_epochs={EPOCHS}", "export.enabled=false", "trainer.progress_bar=false",
       "hardware=cpu")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run per backend, shared by the tests below."""
    done = {}

    def get(backend: str) -> dict:
        if backend not in done:
            r = run_cli(tmp_path_factory.mktemp(f"ref-{backend}"), f"backend={backend}", *RUN)
            assert r.returncode == 0, r.stderr[-3000:]
            done[backend] = r.results()
        return done[backend]
    return get


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_seeded_runs_give_identical_weights(backend, reference, tmp_path):
    again = run_cli(tmp_path / "again", f"backend={backend}", *RUN)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.results()["weights_sha256"] == reference(backend)["weights_sha256"]
    assert len(reference(backend)["weights_sha256"]) == 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_then_same_command_resumes_to_identical_weights(backend, reference, tmp_path):
    rng = random.Random()
    after_epoch, delay = rng.randint(1, EPOCHS - 3), rng.uniform(0.0, 0.3)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "run.py", f"backend={backend}", *RUN, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = CheckpointDir(run_dir)
    deadline = time.monotonic() + 300
    while (ckpts.latest() is None or ckpts.latest().epoch < after_epoch) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    time.sleep(delay)  # somewhere inside the next epoch (a random step)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    stderr = proc.communicate()[1].decode()
    assert alive, f"the run ended before it was killed: {stderr[-2000:]}"
    killed_at = ckpts.latest().epoch
    assert after_epoch <= killed_at < EPOCHS, (after_epoch, delay, killed_at)
    assert not (run_dir / "results.json").exists()

    resumed = run_cli(run_dir, f"backend={backend}", *RUN)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    res = resumed.results()
    assert res["resumed_from_epoch"] == killed_at, (after_epoch, delay)
    assert res["weights_sha256"] == reference(backend)["weights_sha256"], (after_epoch, delay)
    # the metrics log was continued: every epoch once, in order
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert [int(ln.split(",")[0]) for ln in lines[1:]] == list(range(1, EPOCHS + 1))
    assert res["metrics"]["val_acc"] == pytest.approx(reference(backend)["metrics"]["val_acc"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_stops_naming_step_and_metric_and_keeps_last_good_checkpoint(backend,
                                                                                tmp_path):
    """One good epoch, then the same run resumed with an exploding learning rate."""
    from cnnzoo.app.experiment import build_model, prepare
    from cnnzoo.core.errors import TrainingDiverged

    good = compose_cfg(f"backend={backend}", *RUN, "trainer.max_epochs=1", "arch.options.dropout=0",
                       "arch.options.activation=relu")
    exp = prepare(good)
    backend_obj, model, _ = build_model(good, tmp_path, exp)
    backend_obj.train(model, exp.train_split, exp.val_split)
    first = CheckpointDir(tmp_path).latest()
    assert first is not None and first.epoch == 1
    files = {p.name: p.read_bytes() for p in first.path.iterdir()}

    bad = compose_cfg(f"backend={backend}", *RUN, "trainer.max_epochs=3", "arch.options.dropout=0",
                      "arch.options.activation=relu", "optim.lr=1e12", "optim.scheduler=none")
    backend_obj, model, _ = build_model(bad, tmp_path, prepare(bad))
    with pytest.raises(TrainingDiverged) as err:
        backend_obj.train(model, exp.train_split, exp.val_split, first)
    message = str(err.value)
    assert "train_loss" in message and "step" in message and "epoch 2" in message, message
    kept = CheckpointDir(tmp_path).latest()
    assert kept.epoch == 1 and {p.name: p.read_bytes() for p in kept.path.iterdir()} == files
    backend_obj.load_checkpoint(model, tmp_path / _weights_file(kept))


def _weights_file(checkpoint) -> str:
    """The checkpoint's weights file, as results.json names it (relative to the run dir)."""
    names = [p for p in checkpoint.path.iterdir() if p.name != "state.json"]
    weights = [p for p in names if p.suffix in (".ckpt", ".keras", ".params")]
    assert len(weights) == 1, names
    return str(weights[0].relative_to(checkpoint.path.parents[1]))
