"""Resumable training state in a run directory, shared by every backend.

- ``checkpoints/epoch-NNNN/`` holds everything a backend needs to continue after epoch NNNN
  (weights, optimizer and schedule state, in the backend's own files) plus ``state.json``. A
  backend writes the files into a fresh hidden folder and ``CheckpointDir.save`` renames it into
  place, so after a crash at any moment the newest complete folder is intact; older ones go.
- Random numbers: at the start of epoch ``e`` every generator (Python, NumPy, the framework's)
  is seeded from ``epoch_seed(seed, e)``, and the data order is already a function of (seed,
  epoch). A resumed run therefore needs no saved generator state to continue exactly as an
  uninterrupted one (fairseq seeds per update the same way).
- ``state.json`` lists every other file of its folder with its SHA-256; ``latest`` checks them,
  so a damaged or missing file is refused (``CheckpointError``) before anything is loaded or
  written, never mistaken for "no checkpoint" (which would train again over the run).
- ``weights_sha256`` hashes a model's canonical weights (``Backend.get_weights``): equal hashes
  mean bitwise-equal weights, whatever the backend's own file format.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError

STATE_FILE = "state.json"
_FOLDER = re.compile(r"^epoch-(\d{4,})$")


@dataclass(frozen=True)
class Checkpoint:
    path: Path    # the epoch folder
    epoch: int    # epochs completed when it was written
    state: dict   # its state.json

    def file(self, name: str) -> Path:
        return self.path / name


class CheckpointDir:
    """``<run_dir>/checkpoints``: complete epoch folders, the newest ``keep`` of them."""

    def __init__(self, run_dir: Path, keep: int = 1):
        self.root, self.keep = Path(run_dir) / "checkpoints", keep

    def save(self, epoch: int, write: Callable[[Path], None], state: dict | None = None) -> Path:
        """Call ``write(folder)`` to fill a new hidden folder, add ``state.json`` and rename the
        folder to ``epoch-NNNN``; return its path."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"epoch-{epoch:04d}"
        tmp = self.root / f".epoch-{epoch:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir()
        try:
            write(tmp)
            files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*"))
                     if p.is_file()}
            (tmp / STATE_FILE).write_text(json.dumps({"epoch": epoch, **(state or {}),
                                                      "files": files}, indent=2) + "\n")
            _fsync_tree(tmp)
            if final.exists():  # the same epoch again (a re-run): the old copy goes first
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # keep the newest complete ones; a later-numbered folder here is incomplete debris
        folders = self._folders()
        kept = [p for e, p in folders if e <= epoch][-self.keep:]
        for _, old in folders:
            if old not in kept:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> Checkpoint | None:
        """The newest epoch folder, checked against its ``state.json``, or None when there is
        none; a damaged one raises CheckpointError naming the file and the ways out."""
        while True:
            folders = self._folders()
            if not folders:
                return None
            epoch, path = folders[-1]
            state, problem = _checked_state(path, epoch)
            if problem is None:
                return Checkpoint(path, epoch, state)
            if path.exists():
                break
            # the folder went while it was read: a running training replaced it, look again
        older = [p.name for e, p in folders[:-1] if _checked_state(p, e)[1] is None]
        way = (f"delete {path.name} to resume from {older[-1]}" if older
               else "delete the checkpoints folder to train from the start")
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; {way}, or keep this run "
                              "as it is and train in another hydra.run.dir")

    def _folders(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if p.is_dir() and (m := _FOLDER.match(p.name))]
        return sorted(found)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of 0-based ``epoch``: a pure function of (seed, epoch), 31 bits (every
    framework's seed API takes it)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_python_numpy(seed: int, epoch: int) -> int:
    """Seed Python's and NumPy's global generators for ``epoch``; return the seed for the
    framework's own generator."""
    s = epoch_seed(seed, epoch)
    random.seed(s)
    np.random.seed(s)
    return s


def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    """SHA-256 over every (name, dtype, shape, bytes) of canonical weights, in name order."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = np.ascontiguousarray(weights[name])
        h.update(f"{name}|{w.dtype.str}|{w.shape}|".encode())
        h.update(w.tobytes())
    return h.hexdigest()


def _checked_state(folder: Path, epoch: int) -> tuple[dict | None, str | None]:
    """An epoch folder's ``state.json`` and what is wrong with the folder (None when every
    file is as ``save`` wrote it)."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except FileNotFoundError:
        return None, f"{STATE_FILE} is missing"
    except (OSError, ValueError) as err:
        return None, f"{STATE_FILE} cannot be read ({err})"
    if not isinstance(state, dict) or state.get("epoch") != epoch:
        return None, f"{STATE_FILE} does not describe epoch {epoch}"
    for name, digest in state.get("files", {}).items():  # absent in earlier versions' checkpoints
        file = folder / name
        try:
            if _sha256(file) != digest:
                return state, f"{name} is not the file that was saved (its SHA-256 differs)"
        except FileNotFoundError:
            return state, f"{name} is missing"
        except OSError as err:
            return state, f"{name} cannot be read ({err})"
    return state, None


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    _fsync(folder)


def _fsync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
