"""``data=mnist``: datasets in the IDX format of MNIST (also Fashion-MNIST, KMNIST, EMNIST...).

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions),
one big-endian uint32 per dimension, then the values, row-major. The folder ``data.path`` holds
``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (also with a ``.gz`` suffix, a
prefix such as ``emnist-digits-``, or the ``train-images.idx3-ubyte`` spelling), and optionally
the ``t10k-`` (or ``test-``) pair, which becomes the validation split.

Memory: an uncompressed file is memory-mapped (``np.memmap``), so the images never have to fit
in memory at once; a ``.gz`` file is decompressed into memory (gunzip it to memory-map it).
When both exist, the uncompressed file is used. Labels are always read into memory.
"""
from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from .dataset import Dataset

_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
          0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_ROLES = {"train images": r"train-images", "train labels": r"train-labels",
          "val images": r"(t10k|test)-images", "val labels": r"(t10k|test)-labels"}


def _header(head: bytes, size: int, name: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, dims, data offset) from the first bytes of an IDX file of ``size`` bytes."""
    if len(head) < 4 or head[0] or head[1] or head[2] not in _TYPES or head[3] == 0:
        magic = int.from_bytes(head[:4].ljust(4, b"\0"), "big")
        hint = ("it is still gzip-compressed: name it *.gz or gunzip it"
                if head[:2] == b"\x1f\x8b" else "re-download it")
        raise DataError(f"mnist: {name} is not an IDX file: magic number 0x{magic:08X}, expected "
                        f"0x0000TTNN (TT a type code 08/09/0B/0C/0D/0E, NN the dimensions); {hint}")
    dtype, ndim = _TYPES[head[2]], head[3]
    offset = 4 + 4 * ndim
    if len(head) < offset:
        raise DataError(f"mnist: {name} is truncated inside its header; re-download it")
    dims = tuple(int.from_bytes(head[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    expected = offset + int(np.prod(dims)) * dtype.itemsize
    if size != expected:
        shape = " x ".join(map(str, dims))
        raise DataError(f"mnist: {name} has {size:,} bytes but its header ({shape} of "
                        f"{dtype.name}) needs {expected:,}: the file is "
                        f"{'truncated' if size < expected else 'longer than its header says'}; "
                        "re-download it")
    return dtype, dims, offset


def read_idx(path: Path) -> np.ndarray:
    """The array in an IDX file: memory-mapped when uncompressed, in memory when ``.gz``."""
    if path.suffix == ".gz":
        try:
            with gzip.open(path) as f:
                raw = f.read()
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"mnist: cannot decompress {path.name}: {err}; "
                            "re-download it") from None
        dtype, dims, offset = _header(raw[:4 + 4 * 255], len(raw), path.name)
        return np.frombuffer(raw, dtype, int(np.prod(dims)), offset).reshape(dims)
    with open(path, "rb") as f:
        head = f.read(4 + 4 * 255)
    dtype, dims, offset = _header(head, path.stat().st_size, path.name)
    if int(np.prod(dims)) == 0:
        return np.zeros(dims, dtype)
    return np.memmap(path, dtype, "r", offset, dims)


def _find(folder: Path, role: str) -> Path | None:
    """The one file of ``role`` in ``folder`` (the uncompressed one when both exist)."""
    pattern = re.compile(rf"(^|[-_.]){_ROLES[role]}[-.]idx\d-ubyte(\.gz)?$")
    found = sorted(p for p in folder.iterdir() if p.is_file() and pattern.search(p.name))
    plain = [p for p in found if p.suffix != ".gz"]
    gz_only = [p for p in found if p.suffix == ".gz" and p.with_suffix("") not in plain]
    found = plain + gz_only
    if len(found) > 1:
        raise DataError(f"mnist: several {role} files in {folder}: "
                        f"{', '.join(p.name for p in found)}; keep one dataset per folder")
    return found[0] if found else None


def _images(path: Path) -> np.ndarray:
    x = read_idx(path)
    if x.dtype.kind not in "uf" or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] > 4):
        raise DataError(f"mnist: {path.name} holds {' x '.join(map(str, x.shape))} "
                        f"{x.dtype.name} values; images must be N x H x W (or N x H x W x C) "
                        "unsigned bytes or floats")
    return x if x.ndim == 4 else x[..., None]


def _labels(path: Path, images: np.ndarray, images_path: Path) -> np.ndarray:
    y = read_idx(path)
    if y.ndim != 1 or y.dtype.kind not in "ui":
        raise DataError(f"mnist: {path.name} holds {' x '.join(map(str, y.shape))} "
                        f"{y.dtype.name} values; labels must be one integer per image")
    if len(y) != len(images):
        raise DataError(f"mnist: {path.name} has {len(y):,} labels but {images_path.name} has "
                        f"{len(images):,} images: the files do not belong together")
    y = np.asarray(y, np.int64)
    if len(y) and y.min() < 0:
        raise DataError(f"mnist: {path.name} has a negative label ({y.min()}); labels must be "
                        "0 .. classes-1")
    return y


def load(path: Path, cfg):
    """The IDX dataset in folder ``path``."""

    if not path.is_dir():
        raise DataError(f"data.path={str(path)!r} is a file: mnist needs the folder holding "
                        "train-images-idx3-ubyte, train-labels-idx1-ubyte (and t10k-...)")
    files = {role: _find(path, role) for role in _ROLES}
    if not files["train images"] or not files["train labels"]:
        raise DataError(f"mnist: no train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]"
                        f" in {path}: put the IDX files of the training split there")
    if (files["val images"] is None) != (files["val labels"] is None):
        have = "images" if files["val images"] else "labels"
        raise DataError(f"mnist: {path} has the t10k {have} file but not its pair; add it, or "
                        "remove both to split the training files with data.val_fraction")
    x = _images(files["train images"])
    y = _labels(files["train labels"], x, files["train images"])
    x_val = y_val = None
    if files["val images"]:
        x_val = _images(files["val images"])
        y_val = _labels(files["val labels"], x_val, files["val images"])
        if x_val.shape[1:] != x.shape[1:]:
            raise DataError(f"mnist: {files['val images'].name} images are "
                            f"{'x'.join(map(str, x_val.shape[1:]))}, the training images "
                            f"{'x'.join(map(str, x.shape[1:]))}: the files do not belong together")
    top = max(int(y.max(initial=0)), int(y_val.max(initial=0)) if y_val is not None else 0)
    return Dataset("mnist", x, y, [str(k) for k in range(top + 1)], x_val, y_val,
                   path=str(path))
