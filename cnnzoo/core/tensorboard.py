"""Per-epoch scalars as TensorBoard event files, written by the training protocol for every
backend. Written with TensorBoard's own event writer, which needs neither TensorFlow nor its
summary API, so it behaves the same in every process."""
from __future__ import annotations

import sys
import time
import types
from pathlib import Path


def tensorboard_without_tensorflow() -> None:
    """TensorBoard's writer imports TensorFlow when it is installed (``tensorboard.compat.tf``),
    which would load TF into every torch run. TensorBoard looks for a
    ``tensorboard.compat.notf`` module first and then uses its own stub; we provide it (call
    before its writers are imported)."""
    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf",
                               types.ModuleType("tensorboard.compat.notf"))


class ScalarWriter:
    """``write(step, {tag: value})`` appends one event; a no-op without tensorboard installed.
    A resumed run adds a new event file beside the earlier ones (TensorBoard reads them all)."""

    def __init__(self, logdir: Path):
        tensorboard_without_tensorflow()
        try:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ModuleNotFoundError:
            self.writer = None
            return
        Path(logdir).mkdir(parents=True, exist_ok=True)
        self.writer, self._event, self._summary = EventFileWriter(str(logdir)), Event, Summary

    def write(self, step: int, scalars: dict) -> None:
        if self.writer is None:
            return
        values = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        self.writer.add_event(self._event(wall_time=time.time(), step=step,
                                          summary=self._summary(value=values)))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
