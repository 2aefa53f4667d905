"""Every error type of cnnzoo, in one module, and what each means to a user.

``run.py`` shows any of them as ``error:`` lines (no traceback) and exits with code 2
(``EXIT_BAD_INPUT``: ``BAD_INPUT``, input the user can fix: config values, data files,
checkpoints, weights) or 1 (``EXIT_FAILED``: a ``RunFailure``, a run that did its work but whose
result is not acceptable). Messages name the problem and the fix. ``ShapeError`` belongs to
the spec layer below (an input too small for an architecture); it is listed here so that this
module names every error."""
from __future__ import annotations

import sys
from typing import NoReturn

from architectures.spec import ShapeError

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


class BadInput(Exception):
    """Something the user gave (config, data, checkpoint, weights) that cannot be used."""


class RunFailure(Exception):
    """A run that finished its work with a result that is not acceptable."""


class ConfigError(BadInput, ValueError):
    """A config value that is invalid, or that this installation cannot do; every problem
    found, one per line."""


class DataError(BadInput, ValueError):
    """A dataset that cannot be used with the chosen architecture or options."""


class CheckpointError(BadInput, ValueError):
    """A run's saved state (checkpoint, config, metrics, results) that cannot or must not be
    loaded: another run's, unsafe, or damaged."""


class WeightsError(BadInput, ValueError):
    """A set of weights that does not fit the model: every problem, one per line."""


class ExportError(RunFailure, RuntimeError):
    """The exported model is invalid or could not be written."""


class TrainingDiverged(RunFailure, RuntimeError):
    """The loss became NaN or infinite; backends raise it at the end of the epoch it happened."""


class RunFailed(RunFailure, RuntimeError):
    """The run finished its work but its result is not acceptable (e.g. ONNX verification)."""


BAD_INPUT = (BadInput, ShapeError)  # everything that exits with code 2


def print_error(err: Exception | str) -> None:
    """``err`` as ``error:`` lines on stderr, one per problem."""
    for line in str(err).splitlines():
        print(f"error: {line}", file=sys.stderr)


def exit_with(err: Exception) -> NoReturn:
    """Show ``err`` and exit with its code: 2 for input the user can fix, else 1."""
    print_error(err)
    sys.exit(EXIT_BAD_INPUT if isinstance(err, BAD_INPUT) else EXIT_FAILED)


__all__ = ["BAD_INPUT", "BadInput", "CheckpointError", "ConfigError", "DataError",
           "EXIT_BAD_INPUT", "EXIT_FAILED", "ExportError", "RunFailed", "RunFailure",
           "ShapeError", "TrainingDiverged", "WeightsError", "exit_with", "print_error"]
