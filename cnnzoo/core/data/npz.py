"""``data=npz``: images and labels in one ``.npz`` file (``np.savez``).

Arrays: ``x`` images (N, H, W) or (N, H, W, C) with C in 1..4, uint8 (scaled by 1/255),
uint16 (1/65535) or float (taken as already in [0, 1]); ``y`` N integer labels; optional
``classes``, the class names (strings). The file is opened with ``allow_pickle=False``: object
arrays are refused, nothing in the file can run code.

Memory: ``x`` stored uncompressed (``np.savez``) is memory-mapped straight from the zip member,
so a dataset larger than memory works; stored compressed (``np.savez_compressed``) it has to be
decompressed, into memory. ``y`` and ``classes`` are read into memory.
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..npzfile import open_npz
from .dataset import Dataset

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra length


def _mmap_member(path: Path, name: str) -> np.ndarray | None:
    """The array ``name`` of an .npz memory-mapped, or None when the member is compressed."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if signature != b"PK\x03\x04":
            return None
        f.seek(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype, "r", offset, shape, order="F" if fortran else "C")


def _images(path: Path, npz) -> np.ndarray:
    x = _mmap_member(path, "x")
    if x is None:
        x = npz["x"]
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or not 1 <= x.shape[3] <= 4 or not (
            x.dtype in (np.uint8, np.uint16) or x.dtype.kind == "f"):
        raise DataError(f"npz: {path.name}: x is {x.dtype} {x.shape}; expected images "
                        "(N, H, W) or (N, H, W, C) with C <= 4, uint8, uint16 or float in [0, 1]")
    return x


def _classes(path: Path, npz, y: np.ndarray) -> list[str]:
    if "classes" not in npz.files:
        return [str(k) for k in range(int(y.max(initial=0)) + 1)]
    names = npz["classes"]
    if names.ndim != 1 or names.dtype.kind not in "US" or not len(names):
        raise DataError(f"npz: {path.name}: classes must be a 1-D array of strings "
                        f"(got {names.dtype} {names.shape})")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def load(path: Path, cfg):
    """The dataset in the .npz file ``path``."""

    if path.is_dir():
        raise DataError(f"data.path={str(path)!r} is a folder: npz needs the .npz file")
    try:
        with open_npz(path) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise DataError(f"npz: {path.name} has no {' and no '.join(missing)} array "
                                f"(it has: {', '.join(npz.files) or 'nothing'}); save it with "
                                "np.savez(path, x=images, y=labels, classes=names)")
            x = _images(path, npz)
            y = npz["y"]
            if y.ndim != 1 or y.dtype.kind not in "ui" or len(y) != len(x):
                raise DataError(f"npz: {path.name}: y is {y.dtype} {y.shape}; expected one "
                                f"integer label per image ({len(x)})")
            y = y.astype(np.int64)
            if len(y) and y.min() < 0:
                raise DataError(f"npz: {path.name}: y has a negative label ({y.min()}); labels "
                                "must be 0 .. classes-1")
            classes = _classes(path, npz, y)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise DataError(f"npz: cannot read {path}: {err}; expected an .npz file written by "
                        "np.savez without object arrays") from None
    return Dataset("npz", x, y, classes, path=str(path))
