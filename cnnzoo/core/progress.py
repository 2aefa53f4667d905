"""One training progress display for every backend.

On a terminal: a Rich bar per epoch with steps, elapsed time, ETA and the running loss and
accuracy. Otherwise (CI, a log file): one plain line per finished epoch. Backends call
``start_epoch``, ``step`` and ``end_epoch``; running metrics are passed as a function that is
called only when the display refreshes, so a backend never pays a device sync per step.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

_REFRESH_S = 0.25


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None)


def is_live(enabled: bool, stream=None) -> bool:
    """Whether the display is a live bar (an enabled display on a terminal)."""
    return bool(enabled) and (stream or sys.stdout).isatty()


class EpochProgress:
    def __init__(self, epochs: int, steps_per_epoch: int, enabled: bool = True, stream=None):
        self.epochs, self.steps = epochs, steps_per_epoch
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.live = is_live(enabled, self.stream)
        self._progress = self._task = None
        self._last_refresh = 0.0

    def start_epoch(self, epoch: int) -> None:
        """``epoch`` counts from 1."""
        self.epoch, self._t0 = epoch, time.perf_counter()
        if not self.live:
            return
        if self._progress is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=16),
                MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                console=Console(file=self.stream))
            self._progress.start()
        self._task = self._progress.add_task(f"epoch {epoch}/{self.epochs}", total=self.steps,
                                             metrics="")

    def step(self, n: int = 1, metrics: Callable[[], dict] | None = None) -> None:
        """``n`` training steps done; ``metrics()`` gives running values, e.g. loss and acc."""
        if not self.live:
            return
        now = time.perf_counter()
        fields = {}
        if metrics is not None and now - self._last_refresh >= _REFRESH_S:
            fields["metrics"] = _fmt(metrics())
            self._last_refresh = now
        self._progress.update(self._task, advance=n, **fields)

    def end_epoch(self, row: dict) -> None:
        """The epoch's metrics.csv row (train and validation metrics)."""
        shown = {"loss": row.get("train_loss"), "acc": row.get("train_acc"),
                 "val_loss": row.get("val_loss"), "val_acc": row.get("val_acc")}
        if self.live:
            self._progress.update(self._task, completed=self.steps, metrics=_fmt(shown))
        elif self.enabled:
            print(f"epoch {self.epoch}/{self.epochs}  {_fmt(shown)}  "
                  f"{time.perf_counter() - self._t0:.1f}s", file=self.stream, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
