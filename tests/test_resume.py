"""The shared resume machinery: epoch folders written atomically, the resume decision and its
refusals, the metrics log continued, the weights hash."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf

from cnnzoo.app.resume import prepare_run_dir, resume_point
from cnnzoo.core.checkpoints import CheckpointDir, epoch_seed, seed_python_numpy, weights_sha256
from cnnzoo.core.errors import CheckpointError
from cnnzoo.core.rundir import MetricsLog


def _write(content: bytes):
    return lambda folder: (folder / "model.bin").write_bytes(content)


def test_each_save_replaces_the_previous_epoch_folder(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    assert ckpts.latest() is None
    ckpts.save(1, _write(b"one"), {"backend": "torch"})
    ckpts.save(2, _write(b"two"), {"backend": "torch"})
    latest = ckpts.latest()
    assert (latest.epoch, latest.state["backend"]) == (2, "torch")
    assert latest.state["files"] == {"model.bin": hashlib.sha256(b"two").hexdigest()}
    assert latest.file("model.bin").read_bytes() == b"two"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0002"]


def test_a_write_that_fails_midway_leaves_the_previous_folder(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    ckpts.save(1, _write(b"good"))

    def half_then_crash(folder):
        (folder / "model.bin").write_bytes(b"ha")
        raise OSError("disk full")
    with pytest.raises(OSError):
        ckpts.save(2, half_then_crash)
    assert ckpts.latest().epoch == 1
    assert ckpts.latest().file("model.bin").read_bytes() == b"good"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch-0001"]


def test_a_folder_left_by_a_kill_is_ignored_and_replaced(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    ckpts.save(1, _write(b"good"))
    (tmp_path / "checkpoints" / ".epoch-0002.tmp").mkdir()  # SIGKILL while writing epoch 2
    assert ckpts.latest().epoch == 1
    ckpts.save(2, _write(b"next"))
    assert ckpts.latest().epoch == 2 and not (tmp_path / "checkpoints" / ".epoch-0002.tmp").exists()


@pytest.mark.parametrize("damage, problem", [
    (lambda f: (f / "state.json").write_text("{not json"), "state.json cannot be read"),
    (lambda f: (f / "state.json").unlink(), "state.json is missing"),
    (lambda f: (f / "model.bin").write_bytes(b"nexT"), "model.bin is not the file that was saved"),
    (lambda f: (f / "model.bin").unlink(), "model.bin is missing"),
])
def test_a_damaged_folder_is_refused_naming_the_file_and_the_older_intact_one(tmp_path, damage,
                                                                               problem):
    ckpts = CheckpointDir(tmp_path, keep=2)
    ckpts.save(1, _write(b"good"))
    newest = ckpts.save(2, _write(b"next"))
    damage(newest)
    with pytest.raises(CheckpointError) as err:
        ckpts.latest()
    assert str(err.value) == (f"checkpoint {newest} is damaged: {problem}" + (
        " (its SHA-256 differs)" if "saved" in problem else "") + ("" if "read" not in problem
        else " (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))")
        + "; delete epoch-0002 to resume from epoch-0001, or keep this run as it is and train "
        "in another hydra.run.dir")


def test_epoch_seeds_are_a_function_of_seed_and_epoch():
    assert epoch_seed(42, 3) == epoch_seed(42, 3)
    assert len({epoch_seed(42, e) for e in range(100)} | {epoch_seed(43, 0)}) == 101
    seed_python_numpy(7, 2)
    a = np.random.rand(3)
    seed_python_numpy(7, 2)
    assert np.array_equal(a, np.random.rand(3))


def test_weights_hash_sees_every_bit_and_name():
    w = {"a/weight": np.ones((2, 2), np.float32), "b/bias": np.zeros(3, np.float32)}
    h = weights_sha256(w)
    assert h == weights_sha256(dict(reversed(list(w.items()))))
    flipped = w["a/weight"].copy()
    flipped.view(np.uint32)[0, 0] ^= 1  # one bit of one value
    assert weights_sha256({**w, "a/weight": flipped}) != h
    assert weights_sha256({"a/weight2": w["a/weight"], "b/bias": w["b/bias"]}) != h


def _started_run(tmp_path, *overrides, epoch=2, backend="torch"):
    cfg = compose_cfg(*overrides)
    prepare_run_dir(cfg, tmp_path, None)
    log = MetricsLog(tmp_path / "metrics.csv")
    for e in range(1, epoch + 2):  # one row more than the checkpoint has
        log.append({"epoch": e, "train_loss": 1.0 / e})
    CheckpointDir(tmp_path).save(epoch, _write(b"w"), {"backend": backend})
    return cfg


def test_same_config_resumes_and_drops_metrics_rows_after_the_checkpoint(tmp_path):
    _started_run(tmp_path, "trainer.max_epochs=5")
    cfg = compose_cfg("trainer.max_epochs=5", "trainer.progress_bar=false", "export.enabled=false")
    point = resume_point(cfg, tmp_path)  # options that do not change the weights may differ
    assert point.epoch == 2
    prepare_run_dir(cfg, tmp_path, point)
    assert [r["epoch"] for r in MetricsLog(tmp_path / "metrics.csv").rows()] == [1, 2]


def test_changed_training_config_is_refused_naming_each_key(tmp_path):
    _started_run(tmp_path, "trainer.max_epochs=5")
    with pytest.raises(CheckpointError) as err:
        resume_point(compose_cfg("trainer.max_epochs=6", "optim.lr=0.5"), tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "optim.lr: the run was started with 0.001, now 0.5" in message
    assert "trainer.max_epochs: the run was started with 5, now 6" in message
    assert "another hydra.run.dir" in message


def test_weight_neutral_and_newer_options_do_not_block_a_resume(tmp_path):
    """A backend's weight-neutral option (torch's DataLoader workers) may change, and an option
    the run's config.yaml lacks (written by an earlier version) takes its current value; a
    training option of the same backend still may not change."""
    _started_run(tmp_path, "backend.num_workers=0")
    saved = tmp_path / "config.yaml"
    old = OmegaConf.load(saved)
    del old.backend["compile"]  # an option added after the run started
    OmegaConf.save(old, saved)
    assert resume_point(compose_cfg("backend.num_workers=2"), tmp_path).epoch == 2
    with pytest.raises(CheckpointError, match="backend.channels_last: the run was started "
                                              "with True, now False"):
        resume_point(compose_cfg("backend.channels_last=false"), tmp_path)


def test_checkpoint_of_another_backend_is_refused(tmp_path):
    _started_run(tmp_path, backend="keras")
    with pytest.raises(CheckpointError, match="written by backend 'keras', not 'torch'"):
        resume_point(compose_cfg(), tmp_path)


def test_resume_never_refuses_a_run_directory_with_a_checkpoint(tmp_path):
    _started_run(tmp_path)
    with pytest.raises(CheckpointError, match="resume=never but .* epoch 2"):
        resume_point(compose_cfg("resume=never"), tmp_path)
    assert resume_point(compose_cfg("resume=never"), tmp_path / "fresh") is None


def test_fresh_start_records_the_config_and_clears_stale_metrics(tmp_path):
    MetricsLog(tmp_path / "metrics.csv").append({"epoch": 1, "train_loss": 2.0})
    prepare_run_dir(compose_cfg("seed=3"), tmp_path, None)
    assert MetricsLog(tmp_path / "metrics.csv").rows() == []
    assert "seed: 3" in (tmp_path / "config.yaml").read_text()
