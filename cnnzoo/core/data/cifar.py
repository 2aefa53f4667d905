"""``data=cifar10``: the CIFAR-10 "python version" (folder ``cifar-10-batches-py``).

The folder holds ``batch_1`` .. ``batch_5`` (training), ``test_batch`` (the
validation split; without it the training batches are split with ``data.val_fraction``) and
``batches.meta``. Each batch is a Python pickle of a dict: ``b'data'`` a uint8 numpy array
(N, 3072), each row the red, green and blue 32x32 planes, row-major; ``b'labels'`` a list of N
ints; ``batches.meta`` has ``b'label_names'``.

Pickles can run arbitrary code when loaded, so they are read with ``SafeUnpickler``: it
resolves exactly the globals a pickled numpy array needs (``_reconstruct``, ``ndarray``,
``dtype``) and refuses every other one, before anything is called.

Memory: pickles cannot be memory-mapped; the batches are loaded (about 180 MB for CIFAR-10)
and viewed as (N, 32, 32, 3) uint8 without another copy.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np

from ..errors import DataError
from .dataset import Dataset

try:  # numpy >= 2 moved it; both module names resolve to the same function
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

# the only globals a batch file may name: what numpy's ndarray.__reduce__ emits
ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
                   ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                   ("numpy", "ndarray"): np.ndarray,
                   ("numpy", "dtype"): np.dtype}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain data (dicts, lists, bytes, numbers) and numpy arrays, nothing else."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global '{module}.{name}' (only numpy "
                                         "arrays and plain data are allowed)") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id (not part of the CIFAR format)")


def read_batch(path: Path) -> dict:
    """A CIFAR pickle as a dict with str keys, read without running any code from the file."""
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(f, encoding="bytes").load()  # Python 2 strings -> bytes
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as err:
        raise DataError(f"cifar10: cannot read {path.name}: {err}; it is not a CIFAR-10 python "
                        "batch (re-download cifar-10-python.tar.gz)") from None
    if not isinstance(obj, dict):
        raise DataError(f"cifar10: {path.name} holds a {type(obj).__name__}, not a dict: it is "
                        "not a CIFAR-10 python batch")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _images_and_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = read_batch(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072):
        got = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise DataError(f"cifar10: {path.name}: b'data' is {got}, expected a uint8 array "
                        "(N, 3072) (32x32 RGB planes)")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        n = len(labels) if isinstance(labels, (list, np.ndarray)) else "no"
        raise DataError(f"cifar10: {path.name} has {n} labels for {len(data)} images")
    try:
        labels = np.asarray(labels, np.int64)
    except (TypeError, ValueError):
        raise DataError(f"cifar10: {path.name}: b'labels' must be integers") from None
    if labels.ndim != 1 or (len(labels) and labels.min() < 0):
        raise DataError(f"cifar10: {path.name}: labels must be integers >= 0")
    return data, labels


def _stack(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    parts = [_images_and_labels(p) for p in paths]
    data = parts[0][0] if len(parts) == 1 else np.concatenate([d for d, _ in parts])
    # rows are R, G, B planes: (N, 3, 32, 32) viewed as (N, 32, 32, 3), no copy
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.concatenate([y for _, y in parts])


def load(path: Path, cfg):
    """The CIFAR-10 python batches in folder ``path``."""

    if not path.is_dir():
        raise DataError(f"data.path={str(path)!r} is a file: cifar10 needs the extracted "
                        "cifar-10-batches-py folder (data_batch_1..5, test_batch, batches.meta)")
    batches = sorted((p for p in path.iterdir() if re.fullmatch(r"data_batch_\d+", p.name)),
                     key=lambda p: int(p.name.rsplit("_", 1)[1]))
    if not batches:
        raise DataError(f"cifar10: no data_batch_1 .. data_batch_5 in {path}: extract "
                        "cifar-10-python.tar.gz and point data.path at cifar-10-batches-py")
    x, y = _stack(batches)
    x_val = y_val = None
    if (path / "test_batch").is_file():
        x_val, y_val = _stack([path / "test_batch"])
    if (path / "batches.meta").is_file():
        names = read_batch(path / "batches.meta").get("label_names")
        if not isinstance(names, list) or not names:
            raise DataError("cifar10: batches.meta has no b'label_names' list")
        classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]
    else:  # class indices as names
        top = max(int(y.max(initial=0)), int(y_val.max(initial=0)) if y_val is not None else 0)
        classes = [str(k) for k in range(top + 1)]
    return Dataset("cifar10", x, y, classes, x_val, y_val, path=str(path))
