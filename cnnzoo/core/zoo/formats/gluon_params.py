"""MXNet's NDArray list file (``.params``: what ``mx.nd.save``, ``Block.save_parameters`` and
``ParameterDict.save`` write), read and written with numpy alone.

The layout (MXNet 1.x, src/ndarray/ndarray.cc ``NDArray::Save``/``Load``; all little-endian):

- the list: uint64 magic 0x112, uint64 reserved (0), uint64 count, ``count`` arrays, then the
  names: uint64 count (0 for an unnamed list) and each name as uint64 length + UTF-8 bytes;
- an array (v2, magic uint32 0xF993FAC9; v3 0xF993FACA is v2 saved under numpy shape
  semantics): int32 storage type (0 dense), the shape as int32 ndim + ndim int64 dims, the
  context as int32 device type + int32 device id, int32 type flag (mshadow's: 0 float32,
  1 float64, 2 float16, 3 uint8, 4 int32, 5 int8, 6 int64, ...), then the raw C-order data;
- older arrays: v1 (magic 0xF993FAC8) has no storage type; the first format has no magic at
  all, its first uint32 is ndim, followed by uint32 dims.

A shape of ndim 0 (v1/v2) or an unknown one (v3) is an empty array, which a weights file never
holds: it is refused like any other damage.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ...errors import WeightsError
from ...rundir import atomic_write_bytes

LIST_MAGIC = 0x112
V1_MAGIC, V2_MAGIC, V3_MAGIC = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
_CPU = (1, 0)  # Context: dev_type kCPU, dev_id 0

# mshadow type flags (mshadow/base.h); bfloat16 (12) has no numpy type and is refused
_DTYPES = {0: "<f4", 1: "<f8", 2: "<f2", 3: "|u1", 4: "<i4", 5: "|i1", 6: "<i8", 7: "|b1",
           8: "<i2", 9: "<u2", 10: "<u4", 11: "<u8"}
_FLAGS = {np.dtype(v).str: k for k, v in _DTYPES.items()}


class _Truncated(Exception):
    pass


class _Reader:
    """Reads a file front to back; the arrays' data straight into numpy (one copy)."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    @property
    def pos(self) -> int:
        return self.f.tell()

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated
        return self.f.read(n)

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def u64(self) -> int:
        return self.unpack("Q")[0]

    def array(self, dtype: np.dtype, count: int) -> np.ndarray:
        if self.pos + count * dtype.itemsize > self.size:
            raise _Truncated
        return np.fromfile(self.f, dtype=dtype, count=count)


def _shape(r: _Reader, magic: int) -> tuple[int, ...] | None:
    """A shape: int32 ndim + int64 dims; the first format: its ndim is ``magic``, dims uint32."""
    if magic in (V1_MAGIC, V2_MAGIC, V3_MAGIC):
        (ndim,) = r.unpack("i")
        dims = r.unpack(f"{max(ndim, 0)}q") if ndim > 0 else ()
        if ndim < 0 or any(d < 0 for d in dims):  # v3: shape unknown, an empty array
            return None
        if ndim == 0 and magic != V3_MAGIC:  # v1/v2: ndim 0 is "none"
            return None
        return tuple(dims)
    ndim = magic
    if ndim > 32:  # not a shape: not an array this reader knows
        raise ValueError(f"array magic 0x{magic:08X} is none of MXNet's")
    return tuple(r.unpack(f"{ndim}I")) or None


def _array(r: _Reader, index: int) -> np.ndarray:
    (magic,) = r.unpack("I")
    if magic in (V2_MAGIC, V3_MAGIC):
        (stype,) = r.unpack("i")
        if stype != 0:
            raise WeightsError(f"array {index} is sparse (storage type {stype}); weights are "
                               "dense: save the parameters of a dense model")
    shape = _shape(r, magic)
    if shape is None:
        raise WeightsError(f"array {index} is empty (no shape): the file holds uninitialised "
                           "parameters; initialise the model before saving it")
    r.unpack("ii")  # context: where it lived, irrelevant on reading
    (flag,) = r.unpack("i")
    if flag not in _DTYPES:
        raise WeightsError(f"array {index} has MXNet type flag {flag}, which has no numpy type "
                           "(bfloat16?): cast the parameters to float32 before saving")
    dtype = np.dtype(_DTYPES[flag])
    values = r.array(dtype, int(np.prod(shape, dtype=np.int64))).reshape(shape)
    return values if dtype.isnative else values.astype(dtype.newbyteorder("="))


def _parse(f, size: int) -> dict[str, np.ndarray]:
    """The named arrays of an NDArray list file, in the file's order (an unnamed list: named
    "0", "1", ...)."""
    r = _Reader(f, size)
    try:
        magic, _reserved = r.u64(), r.u64()
        if magic != LIST_MAGIC:
            raise WeightsError(f"not an MXNet .params file (list magic 0x{magic:X}, expected "
                               f"0x{LIST_MAGIC:X})")
        count = r.u64()
        if count > size:  # every array takes bytes: a count beyond them is garbage
            raise _Truncated
        arrays = [_array(r, i) for i in range(count)]
        n_names = r.u64()
        if n_names not in (0, count):
            raise ValueError(f"{n_names} names for {count} arrays")
        names = [r.take(r.u64()).decode("utf-8") for _ in range(n_names)]
    except _Truncated:
        raise WeightsError(f"the .params file ends early (at byte {r.pos} of {size}): it is "
                           "truncated; download or save it again") from None
    except (struct.error, UnicodeDecodeError) as err:
        raise ValueError(str(err)) from None
    if r.pos != size:
        raise ValueError(f"{size - r.pos} bytes after the last name")
    names = names or [str(i) for i in range(count)]
    if len(set(names)) != len(names):
        raise ValueError("a name occurs twice")
    return dict(zip(names, arrays))


def read(path) -> dict[str, np.ndarray]:
    """The arrays of the ``.params`` file at ``path`` by name, in the file's order, each with
    the dtype it was stored in."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _parse(f, os.fstat(f.fileno()).st_size)
    except ValueError as err:  # WeightsError first: it is a ValueError too
        if isinstance(err, WeightsError):
            raise WeightsError(f"{path}: {err}") from None
        raise WeightsError(f"{path}: not a valid MXNet .params file ({err}); the file is "
                           "damaged: download or save it again") from None


def dumps(tensors: dict[str, np.ndarray]) -> bytes:
    """The bytes of an NDArray list file (v2 arrays on the CPU context) of ``tensors``."""
    parts = [struct.pack("<QQQ", LIST_MAGIC, 0, len(tensors))]
    for name, value in tensors.items():
        a = np.ascontiguousarray(value)
        flag = _FLAGS.get(a.dtype.newbyteorder("<").str)
        if flag is None:
            raise WeightsError(f"'{name}': dtype {a.dtype} has no MXNet type")
        if a.ndim == 0:  # MXNet (outside numpy semantics) reads ndim 0 as "no array"
            raise WeightsError(f"'{name}' is a scalar; MXNet's .params holds arrays of 1+ dims")
        parts.append(struct.pack(f"<Iii{a.ndim}q", V2_MAGIC, 0, a.ndim, *a.shape))
        parts.append(struct.pack("<iii", *_CPU, flag))
        parts.append(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    parts.append(struct.pack("<Q", len(tensors)))
    for name in tensors:
        encoded = name.encode("utf-8")
        parts.append(struct.pack("<Q", len(encoded)) + encoded)
    return b"".join(parts)


def write(path, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` as a ``.params`` file ``mx.nd.load`` and ``Block.load_parameters``
    read, atomically."""
    atomic_write_bytes(Path(path), dumps(tensors))
