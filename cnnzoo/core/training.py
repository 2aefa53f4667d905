"""The training protocol: what every backend does at the start and end of each epoch.

A backend's training loop, whether its framework owns the loop (Lightning's ``Trainer``,
Keras' ``fit``) or the backend writes it, calls one ``TrainingProtocol``:

    protocol = TrainingProtocol(cfg, run_dir, backend.name, steps_per_epoch, global_batch)
    for epoch in range(first, max_epochs):
        seed = protocol.start_epoch(epoch)     # Python and NumPy seeded; seed the framework
        ...train: before step s (0-based, counted from the run's start) set the rate
           protocol.schedule.rate(s); call protocol.step(1, running) per step...
        protocol.begin_validation(); ...validate...; protocol.end_validation()
        protocol.end_epoch(epoch, means, images, first_bad, write_state)
        if protocol.stop_reason:                # an epoch-end hook asked to stop (pruning)
            break
    return protocol.report(extra)

The schedule (``cnnzoo.core.optim.Schedule``) is the config's recipe scaled to the global batch
(the images of one optimizer step over all devices); the protocol prints it once at the start
and reports it for results.json. ``end_epoch`` owns the rest, in this order: the divergence
check and its message (nothing is written for a diverged epoch, so the last good checkpoint
stays the newest), the metrics.csv row, TensorBoard's scalars, the progress line, the
checkpoint folder (``CheckpointDir.save(epoch, write_state)``), and the timing that images/s
comes from (validation excluded, so the rate is comparable across backends). In the extra
processes of multi-process training (``is_main=False``) nothing is written, and
``write_state`` still runs (into a scratch folder) where the framework's save is collective.
Last come the epoch-end hooks (``Backend.epoch_end_hooks``, for example a sweep's pruning):
each gets the row and may return a reason to stop; the backend then ends training after this
epoch, as if it were the last (``stop_reason``, ``TrainReport.stopped``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .checkpoints import CheckpointDir, seed_python_numpy
from .errors import TrainingDiverged
from .optim import Optimizer
from .progress import EpochProgress, is_live
from .rundir import MetricsLog
from .tensorboard import ScalarWriter


@dataclass
class TrainReport:
    history: list[dict]            # one row per epoch, the columns of metrics.csv
    train_time_s: float            # time inside training epochs (data loading included)
    images_per_s: float            # training images processed per second of train_time_s
    checkpoint: Path | None        # the last checkpoint written
    extra: dict = field(default_factory=dict)  # backend facts for results.json's hardware
    stopped: str | None = None     # why an epoch-end hook ended training early, if one did
    optim: dict | None = None      # the effective recipe (Optimizer.effective)


@dataclass(frozen=True)
class FirstBadStep:
    """The epoch's first training step whose loss was NaN or infinite."""
    batch: int     # 1-based, within the epoch
    loss: float    # its loss, or the best the backend knows (NaN where another process found
                   # it; the epoch's non-finite mean, or inf, where only the step is known)


EpochEndHook = Callable[[dict], "str | None"]  # the epoch's row -> a reason to stop, or None


class TrainingProtocol:
    def __init__(self, cfg, run_dir: Path, backend_name: str, steps_per_epoch: int,
                 global_batch: int | None = None, is_main: bool = True,
                 checkpoint_file: str | None = None, hooks: Sequence[EpochEndHook] = ()):
        """``global_batch``: the images of one optimizer step over all devices (default
        ``data.batch_size``). ``checkpoint_file``: the file in each epoch folder that ``report``
        names. ``hooks``: the backend's ``epoch_end_hooks``."""
        self.seed, self.max_epochs = cfg.seed, cfg.trainer.max_epochs
        self.optim = Optimizer.from_config(cfg.optim)
        global_batch = global_batch or cfg.data.batch_size
        self.schedule = self.optim.schedule(global_batch, steps_per_epoch, self.max_epochs)
        self.effective_optim = self.optim.effective(global_batch, self.schedule)
        if is_main:
            print(self.effective_optim["recipe"], flush=True)
        self.backend_name, self.is_main, self.checkpoint_file = backend_name, is_main, \
            checkpoint_file
        self.steps = steps_per_epoch
        self.show_progress = bool(cfg.trainer.progress_bar)
        self.checkpoints = CheckpointDir(run_dir)
        if is_main:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.metrics_log = MetricsLog(Path(run_dir) / "metrics.csv") if is_main else None
        self.board_dir, self.board = Path(run_dir) / "tensorboard", None
        self.progress: EpochProgress | None = None
        self.rows: list[dict] = []
        self.hooks, self.stop_reason = tuple(hooks), None
        self.train_time, self.images, self.saved = 0.0, 0, None
        self._t0 = self._v0 = None
        self._val_time = 0.0

    @property
    def live(self) -> bool:
        """Whether the progress display is a live bar that wants ``step`` after every step
        (a backend whose framework calls per-step hooks only when asked can skip them)."""
        return is_live(self.show_progress and self.is_main)

    # ---------------------------------------------------------------- epoch start
    def start_epoch(self, epoch: int) -> int:
        """Begin 0-based ``epoch``: seeds Python and NumPy from (seed, epoch), starts its clock
        and progress bar; returns the seed for the framework's own generators."""
        if self.progress is None:
            self.progress = EpochProgress(self.max_epochs, self.steps,
                                          self.show_progress and self.is_main)
        self.progress.start_epoch(epoch + 1)
        self._t0, self._val_time = time.perf_counter(), 0.0
        return seed_python_numpy(self.seed, epoch)

    def step(self, n: int = 1, running: Callable[[], dict] | None = None) -> None:
        """``n`` training steps done; ``running()`` (read only when a terminal display
        refreshes) gives the running loss and accuracy."""
        self.progress.step(n, running)

    def begin_validation(self) -> None:
        self._v0 = time.perf_counter()

    def end_validation(self) -> None:
        if self._v0 is not None:
            self._val_time += time.perf_counter() - self._v0
            self._v0 = None

    # ---------------------------------------------------------------- epoch end
    def end_epoch(self, epoch: int, means: dict, images: int,
                  first_bad: FirstBadStep | None = None,
                  write_state: Callable[[Path], None] | None = None) -> dict:
        """Finish 0-based ``epoch``: ``means`` holds train_loss, train_acc and (after a
        validation) val_loss, val_acc, each a mean per image; ``images`` the training images
        of this epoch (every process's); ``write_state(folder)`` writes the training state.
        Raises TrainingDiverged before anything is written; returns the row."""
        elapsed = time.perf_counter() - self._t0
        row = {"epoch": epoch + 1, **means, "lr": self.schedule.epoch_rate(epoch),
               "epoch_time_s": elapsed}
        self._check_divergence(epoch, row, first_bad)
        self.train_time += elapsed - self._val_time
        self.images += images
        self.rows.append(row)
        if self.is_main:
            self.metrics_log.append(row)  # before the checkpoint: a resume drops rows after it
            if self.board is None:  # a resumed run adds an event file beside the earlier
                self.board = ScalarWriter(self.board_dir)
            self.board.write(row["epoch"], {k: v for k, v in row.items() if k != "epoch"})
        if self.progress is not None:
            self.progress.end_epoch(row)
        if write_state is not None:
            if self.is_main:
                folder = self.checkpoints.save(epoch + 1, write_state,
                                               {"backend": self.backend_name})
                self.saved = folder / self.checkpoint_file if self.checkpoint_file else folder
            else:  # the framework's save may be collective: it runs, only rank 0 keeps files
                write_state(self.checkpoints.root / f".epoch-{epoch + 1:04d}.tmp")
        for hook in self.hooks:  # after the checkpoint: a stopped run keeps this epoch
            self.stop_reason = self.stop_reason or hook(row)
        return row

    def _check_divergence(self, epoch: int, row: dict, bad: FirstBadStep | None) -> None:
        if bad is not None:
            step = epoch * self.steps + bad.batch
            raise TrainingDiverged(
                f"training diverged: train_loss is {bad.loss} at step {step} (epoch {epoch + 1}, "
                f"batch {bad.batch} of {self.steps}); lower optim.lr")
        loss = row.get("train_loss", 0.0)
        if not math.isfinite(loss):  # every step finite, their mean overflowed
            raise TrainingDiverged(f"training diverged: train_loss is {loss} in epoch "
                                   f"{epoch + 1} (the mean of finite steps); lower optim.lr")

    # ---------------------------------------------------------------- the end
    def report(self, extra: dict | None = None, checkpoint: Path | None = None) -> TrainReport:
        """The run's TrainReport; ``checkpoint`` where no epoch was trained in this call (the
        resumed one)."""
        seconds = max(self.train_time, 1e-9)
        return TrainReport(history=self.rows, train_time_s=seconds,
                           images_per_s=self.images / seconds,
                           checkpoint=self.saved or checkpoint, extra=extra or {},
                           stopped=self.stop_reason, optim=self.effective_optim)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.board is not None:
            self.board.close()
            self.board = None
