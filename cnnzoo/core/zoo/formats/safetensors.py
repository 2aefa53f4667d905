"""The ``.safetensors`` format read and written with numpy alone.

A file is: an unsigned little-endian 64-bit header length N; N bytes of JSON, an object mapping
each tensor's name to ``{"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}`` (byte
offsets into the data that follows the header), plus an optional ``"__metadata__"`` object of
strings; then the data, each tensor C-contiguous and little-endian. The header may end in
spaces (writers pad it to 8 bytes). The tensors' byte ranges must cover the data exactly,
without holes or overlaps, as the reference implementation checks.

BF16, which numpy lacks, is read as float32 (its words are a float32's upper halves); the other
dtypes keep their own (F16, F32, F64, the integers, BOOL).
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from ...errors import WeightsError
from ...rundir import atomic_write_bytes

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
           "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
           "BOOL": "?"}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items() if k != "BF16"}
_MAX_HEADER = 100_000_000  # the reference implementation's limit


def read(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file, in its header's order."""
    path = Path(path)
    with open(path, "rb") as f:  # one writable buffer: the arrays are views of its data
        raw = bytearray(path.stat().st_size)
        raw = raw[:f.readinto(raw)]
    header, data = _split(raw, path)
    tensors, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise WeightsError(f"{path}: tensor {name!r} has no dtype, shape and data_offsets "
                               "in the header") from None
        if code not in _DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has dtype {code}, which this tool does "
                               f"not read ({', '.join(_DTYPES)})")
        dtype = np.dtype(_DTYPES[code])
        ints = [*shape, begin, end]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
            raise WeightsError(f"{path}: tensor {name!r} has shape {shape} and offsets "
                               f"{[begin, end]}: not non-negative integers")
        if end - begin != math.prod(shape) * dtype.itemsize or end > len(data):
            raise WeightsError(f"{path}: tensor {name!r} ({code} {shape}) has offsets "
                               f"{[begin, end]} in {len(data)} bytes of data: the file is "
                               "damaged or truncated")
        spans.append((begin, end, name))
        flat = np.frombuffer(data, dtype, math.prod(shape), begin).astype(
            dtype.newbyteorder("="), copy=False)
        if code == "BF16":
            flat = (flat.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = flat.reshape(shape)
    _check_coverage(sorted(spans), len(data), path)
    return tensors


def _split(raw: bytearray, path: Path) -> tuple[dict, memoryview]:
    if len(raw) < 8:
        raise WeightsError(f"{path}: {len(raw)} bytes, shorter than a safetensors header")
    (size,) = struct.unpack("<Q", raw[:8])
    if size > min(_MAX_HEADER, len(raw) - 8):
        raise WeightsError(f"{path}: a header of {size} bytes in a file of {len(raw)}: not a "
                           "safetensors file, or a truncated one")
    try:
        header = json.loads(bytes(raw[8:8 + size]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path}: the safetensors header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise WeightsError(f"{path}: __metadata__ must map names to strings")
    return header, memoryview(raw)[8 + size:]


def _check_coverage(spans: list[tuple[int, int, str]], size: int, path: Path) -> None:
    at = 0
    for begin, end, name in spans:
        if begin != at:
            raise WeightsError(f"{path}: tensor {name!r} starts at byte {begin} of the data, "
                               f"expected {at} (tensors overlap or leave a hole)")
        at = end
    if at != size:
        raise WeightsError(f"{path}: the tensors cover {at} of the {size} bytes of data")


def metadata(path: Path) -> dict[str, str]:
    """The file's ``__metadata__`` ({} when it has none)."""
    with open(path, "rb") as f:
        head = f.read(8)
        (size,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        header, _ = _split(bytearray(head + f.read(min(size, _MAX_HEADER))), Path(path))
    return dict(header.get("__metadata__", {}))


def write(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> None:
    """``tensors`` as a safetensors file, in their order, the header padded with spaces to a
    multiple of 8 bytes; ``meta`` goes into ``__metadata__``."""
    header: dict = {"__metadata__": dict(meta)} if meta else {}
    chunks, at = [], 0
    for name, value in tensors.items():
        array = np.asarray(value)
        dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
        if dtype not in _NAMES:
            raise WeightsError(f"{name}: a {array.dtype} array has no safetensors dtype")
        data = np.asarray(array, dtype=dtype, order="C").tobytes()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape),
                        "data_offsets": [at, at + len(data)]}
        chunks.append(data)
        at += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    atomic_write_bytes(Path(path), struct.pack("<Q", len(text)) + text + b"".join(chunks))
