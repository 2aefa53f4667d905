"""Opening an ``.npz`` file (datasets, weights) without ever unpickling anything."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np


def open_npz(path: Path):
    """``np.load(path, allow_pickle=False)`` of an .npz. A file that is no zip archive raises
    ValueError saying so (NumPy would take it for a pickle and complain about that)."""
    if not zipfile.is_zipfile(path):
        raise ValueError("it is not a zip archive, as an .npz file (np.savez) is")
    return np.load(path, allow_pickle=False)
