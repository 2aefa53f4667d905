"""Exact resume after SIGKILL through ``run.py``: LeNet-5 with dropout, SGD momentum and a
cosine schedule on shuffled digits, killed at a random moment after a checkpoint and started
again with the same command, ends with the uninterrupted run's weights, bit for bit (weights,
optimizer state, schedule position, dropout keys and data order all continue exactly)."""
import pytest

# cnnzoo's own `pytest` collects these too; without JAX there is nothing to test
pytest.importorskip("jax", reason="the flax plugin's framework is not installed")
import random
import signal
import subprocess
import sys
import time

from flax_helpers import CNNZOO_ROOT, run_cli

from cnnzoo.core.checkpoints import CheckpointDir

EPOCHS = 5
RUN = ("backend=flax", "arch.options.dropout=0.3", "optim=sgd", "optim.lr=0.02",
       "optim.momentum=0.9", "optim.scheduler=cosine", "data.batch_size=16", "data.limit=800",
       f"trainer.max_epochs={EPOCHS}", "export.enabled=false", "trainer.progress_bar=false",
       "hardware=cpu")


@pytest.mark.slow
def test_sigkill_then_same_command_resumes_to_identical_weights(tmp_path):
    straight = run_cli(tmp_path / "straight", *RUN)
    assert straight.returncode == 0, straight.stderr[-3000:]
    again = run_cli(tmp_path / "again", *RUN)  # seeded: the same weights
    assert again.results()["weights_sha256"] == straight.results()["weights_sha256"]

    rng = random.Random()
    after_epoch, delay = rng.randint(1, EPOCHS - 2), rng.uniform(0.0, 0.3)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "run.py", *RUN, f"hydra.run.dir={run_dir}"],
                            cwd=CNNZOO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints, deadline = CheckpointDir(run_dir), time.monotonic() + 600
    while (checkpoints.latest() is None or checkpoints.latest().epoch < after_epoch) \
            and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    time.sleep(delay)  # somewhere in the next epoch
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    stderr = proc.communicate()[1].decode()
    assert alive, f"the run ended before it was killed: {stderr[-2000:]}"
    killed_at = checkpoints.latest().epoch
    assert after_epoch <= killed_at < EPOCHS and not (run_dir / "results.json").exists()

    resumed = run_cli(run_dir, *RUN)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    res = resumed.results()
    assert "resuming from" in resumed.stdout and res["resumed_from_epoch"] == killed_at
    assert res["weights_sha256"] == straight.results()["weights_sha256"], (after_epoch, delay)
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert [int(ln.split(",")[0]) for ln in lines[1:]] == list(range(1, EPOCHS + 1))
