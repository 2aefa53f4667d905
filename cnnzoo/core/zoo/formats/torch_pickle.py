"""A torch ``.pth`` state dict read and written without torch.

Two container formats hold the same pickle of the state dict:

- the zip archive of ``torch.save`` since torch 1.6: ``<archive>/data.pkl`` (the pickle, its
  tensors' storages as persistent ids ``("storage", <torch.FloatStorage...>, key, location,
  numel)``), each storage's raw bytes in ``<archive>/data/<key>``, ``<archive>/byteorder``;
- the legacy stream of earlier versions (``_use_new_zipfile_serialization=False``, and
  torchvision's files of that time): pickles one after another (the magic number, the
  protocol version, a dict of system information, the object with persistent ids
  ``("storage", <type>, key, location, numel, view)``, the list of storage keys), then each
  storage in that order as its element count (int64) and its raw bytes.

The pickle is read by an Unpickler whose ``find_class`` knows only what a state dict holds:
``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``, the
``torch.*Storage`` types and torch's dtypes, each answered by a small function of this module
that builds numpy arrays. Any other global (``os.system``, ``builtins.eval``...) would run code:
the file is refused before anything is called.
"""
from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import ClassVar

import numpy as np

from ...errors import WeightsError
from ...rundir import atomic_write_bytes

# torch's storage types and the numpy dtype of their elements (bfloat16: raw 16-bit words)
_STORAGES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
             "BFloat16Storage": "<u2", "LongStorage": "<i8", "IntStorage": "<i4",
             "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
             "BoolStorage": "?"}
_DTYPES = {"float32": "FloatStorage", "float": "FloatStorage", "float64": "DoubleStorage",
           "double": "DoubleStorage", "float16": "HalfStorage", "half": "HalfStorage",
           "bfloat16": "BFloat16Storage", "int64": "LongStorage", "long": "LongStorage",
           "int32": "IntStorage", "int": "IntStorage", "int16": "ShortStorage",
           "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_WRAPPERS = ("state_dict", "model")  # checkpoints that hold the state dict under a key


class _StorageType:
    """What ``torch.FloatStorage`` (and the others) stand for in a pickle: an element type."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGES[name])

    def __call__(self, *args):  # a pickle calling a storage type: not a state dict
        raise pickle.UnpicklingError(f"torch.{self.name} called with arguments")


class _DType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2``: a view of a flat storage (offset and strides in
    elements), copied into a C-contiguous array. A view reaching past its storage is refused."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError("a tensor whose storage is not a storage")
    size, stride = tuple(size), tuple(stride)
    if (not all(isinstance(v, int) and v >= 0 for v in (storage_offset, *size, *stride))
            or len(size) != len(stride)):
        raise pickle.UnpicklingError(f"a tensor of size {size}, stride {stride}, offset "
                                     f"{storage_offset}")
    if math.prod(size) == 0:
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise pickle.UnpicklingError(f"a tensor of size {size} (stride {stride}, offset "
                                     f"{storage_offset}) reaches past its storage of "
                                     f"{storage.size} elements")
    contiguous = [math.prod(size[i + 1:]) for i in range(len(size))]
    if storage_offset == 0 and math.prod(size) == storage.size and all(
            s == c for n, s, c in zip(size, stride, contiguous) if n > 1):
        return storage.reshape(size)  # the whole storage in order: no copy (see _state_dict)
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], size,
                                           tuple(s * item for s in stride), writeable=False)
    return np.array(view, order="C")  # a copy: tensors sharing a storage stay apart


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _Unpickler(pickle.Unpickler):
    """Only what a state dict needs; ``storages(pid)`` gives the flat array of a storage."""

    _FUNCTIONS: ClassVar[dict] = {("collections", "OrderedDict"): OrderedDict,
                                  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
                                  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}

    def __init__(self, file, storages):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        # protocol 2 names Python 3's modules by their Python 2 names (__builtin__.eval)
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in self._FUNCTIONS:
            return self._FUNCTIONS[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        if module == "torch" and name in _DTYPES:
            return _DType(name)
        raise WeightsError(f"the file would run code ({module}.{name}): not a weights file; "
                           "torch files of weights hold only tensors")

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return self._storages(pid)


def _bfloat16(words: np.ndarray) -> np.ndarray:
    """Raw bfloat16 words (uint16) as float32 (the upper half of a float32's bits)."""
    return (words.astype("<u4") << 16).view("<f4")


def _read_into(f, size: int) -> bytearray:
    """``size`` bytes of a file as a writable buffer (its arrays are numpy views of it)."""
    buffer = bytearray(size)
    got = f.readinto(buffer)
    return buffer if got == size else buffer[:got]


def _as_elements(raw: bytearray, kind: _StorageType, numel: int, big_endian: bool = False):
    dtype = kind.dtype.newbyteorder(">") if big_endian and kind.dtype.itemsize > 1 else kind.dtype
    if len(raw) < numel * dtype.itemsize:
        raise EOFError(f"a storage of {numel} elements has {len(raw)} bytes")
    flat = np.frombuffer(raw, dtype, numel).astype(kind.dtype.newbyteorder("="), copy=False)
    return _bfloat16(flat) if kind.name == "BFloat16Storage" else flat


# --------------------------------------------------------------------------- reading
def read(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a torch file, named as in its state dict, in its order."""
    path = Path(path)
    try:
        obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    except (pickle.UnpicklingError, TypeError, AttributeError, IndexError, struct.error) as err:
        raise WeightsError(f"{path}: not a torch state dict that this tool can read "
                           f"({type(err).__name__}: {err}); the file is damaged, truncated or "
                           "holds something other than tensors") from None
    return _state_dict(obj, path)


def _read_zip(path: Path):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise WeightsError(f"{path}: a zip archive without <archive>/data.pkl: not a torch "
                               "file")
        prefix = pkl[0][:-len("data.pkl")]
        byteorder = prefix + "byteorder"
        big = byteorder in names and z.read(byteorder).strip() == b"big"
        cache: dict[str, np.ndarray] = {}

        def storage(pid):
            _, kind, key, _location, numel = pid[:5]
            if key not in cache:
                info = z.getinfo(f"{prefix}data/{key}")
                with z.open(info) as f:
                    raw = _read_into(f, info.file_size)
                cache[key] = _as_elements(raw, kind, int(numel), big)
            return cache[key]

        return _Unpickler(io.BytesIO(z.read(pkl[0])), storage).load()


def _read_legacy(path: Path):
    with open(path, "rb") as f:
        magic = _Unpickler(f, _no_storage).load()
        if magic != _LEGACY_MAGIC:
            raise WeightsError(f"{path}: a pickle but not a torch file (no torch magic number); "
                               "give a state dict saved by torch.save")
        protocol = _Unpickler(f, _no_storage).load()
        if protocol != _LEGACY_PROTOCOL:
            raise WeightsError(f"{path}: torch legacy format version {protocol!r}, this tool "
                               f"reads {_LEGACY_PROTOCOL}")
        info = _Unpickler(f, _no_storage).load()
        big = isinstance(info, dict) and info.get("little_endian") is False
        kinds: dict[str, tuple[_StorageType, int]] = {}

        def storage(pid):  # the data follows the object: a reference, resolved below
            _, kind, key, _location, numel = pid[:5]
            kinds.setdefault(key, (kind, int(numel)))
            view = pid[5] if len(pid) > 5 else None  # (view key, offset, size): a storage view
            if view is None:
                return _Deferred(key, 0, int(numel))
            return _Deferred(key, int(view[1]), int(view[2]))

        obj = _DeferringUnpickler(f, storage).load()
        keys = _Unpickler(f, _no_storage).load()
        data = {}
        for key in keys:
            if key not in kinds:
                raise WeightsError(f"{path}: storage {key} is listed but no tensor uses it")
            kind, numel = kinds[key]
            count = struct.unpack(">q" if big else "<q", f.read(8))[0]
            if count != numel:
                raise WeightsError(f"{path}: storage {key} of {numel} elements is stored with "
                                   f"{count}: the file is damaged")
            data[key] = _as_elements(_read_into(f, count * kind.dtype.itemsize), kind, count, big)
    return _resolve(obj, data)


def _no_storage(pid):
    raise pickle.UnpicklingError("a storage outside the object of a torch file")


class _Deferred:
    """A storage of the legacy format before its bytes are read (``offset`` and ``size``: the
    part of it that an old storage view covers)."""

    def __init__(self, key: str, offset: int, size: int):
        self.key, self.offset, self.size = key, offset, size


class _DeferredTensor:
    def __init__(self, storage: _Deferred, args):
        self.storage, self.args = storage, args


class _DeferringUnpickler(_Unpickler):
    """The legacy format's object: tensors kept as (storage key, view) until the data is read."""

    _FUNCTIONS: ClassVar[dict] = {
        **_Unpickler._FUNCTIONS,
        ("torch._utils", "_rebuild_tensor_v2"): lambda storage, *args: _DeferredTensor(storage,
                                                                                       args)}


def _resolve(obj, data: dict[str, np.ndarray]):
    if isinstance(obj, _DeferredTensor):
        if obj.storage.key not in data:
            raise WeightsError(f"storage {obj.storage.key} is used but the file has no data for "
                               "it: the file is truncated")
        ref = obj.storage
        return _rebuild_tensor_v2(data[ref.key][ref.offset:ref.offset + ref.size], *obj.args)
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, OrderedDict) else {}
        out.update((k, _resolve(v, data)) for k, v in obj.items())
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, data) for v in obj)
    return obj


def _state_dict(obj, path: Path) -> dict[str, np.ndarray]:
    """The tensors of the state dict in ``obj`` (a checkpoint's ``state_dict``/``model`` entry
    when it is one), without DataParallel's ``module.`` prefix."""
    if isinstance(obj, dict):
        for wrapper in _WRAPPERS:
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: a torch file of {type(obj).__name__}, not of a state dict "
                           "(save model.state_dict(), not the model)")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
    storages = set()  # tensors that are a whole storage are views of it: one each, copy the rest
    for k, v in tensors.items():
        root = v if v.base is None else v.base
        if id(root) in storages:
            tensors[k] = v.copy()
        storages.add(id(root))
    odd = [k for k, v in tensors.items() if v.dtype.kind not in "fiub"]
    if odd:
        raise WeightsError(f"{path}: {', '.join(odd[:5])} not numeric tensors: not a state dict")
    if not tensors:
        raise WeightsError(f"{path}: a torch file without tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


# --------------------------------------------------------------------------- writing
_STORAGE_OF = {np.dtype(v).newbyteorder("<"): k for k, v in _STORAGES.items()
               if k != "BFloat16Storage"}
_ALIGN = 64  # torch aligns each record's data to 64 bytes (torch.load(mmap=True) needs it)


def write(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """``tensors`` as ``torch.save(OrderedDict)`` writes them (the zip format, protocol 2), each
    tensor its own contiguous little-endian storage; ``torch.load(weights_only=True)`` reads it."""
    arrays = {}
    for name, value in tensors.items():
        array = np.asarray(value, order="C")  # (ascontiguousarray makes a 0-d array 1-d)
        dtype = array.dtype.newbyteorder("<")
        if dtype not in _STORAGE_OF:
            raise WeightsError(f"{name}: a {array.dtype} array cannot be written as a torch "
                               "tensor")
        arrays[name] = array.astype(dtype, copy=False)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        _aligned(z, "archive/data.pkl", _pickle_state_dict(arrays))
        _aligned(z, "archive/byteorder", b"little")
        for i, array in enumerate(arrays.values()):
            _aligned(z, f"archive/data/{i}", array.tobytes())
        _aligned(z, "archive/version", b"3\n")
    atomic_write_bytes(Path(path), buffer.getvalue())


def _aligned(z: zipfile.ZipFile, name: str, data: bytes) -> None:
    """A stored record whose data starts at a multiple of 64 (padding in an extra field, as
    torch's writer does)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = z.fp.tell() + 30 + len(name.encode()) + 4  # local header, name, extra field header
    info.extra = struct.pack("<HH", 0x4246, -start % _ALIGN) + b"Z" * (-start % _ALIGN)
    z.writestr(info, data)


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])                      # BININT1
    if -2 ** 31 <= v < 2 ** 31:
        return b"J" + struct.pack("<i", v)            # BININT
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw           # LONG1


def _str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw   # BINUNICODE


def _tuple(items: list[bytes]) -> bytes:
    return b")" if not items else b"(" + b"".join(items) + b"t"  # EMPTY_TUPLE / MARK..TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _pickle_state_dict(arrays: dict[str, np.ndarray]) -> bytes:
    """The opcodes ``torch.save`` writes for an OrderedDict of tensors (no memo needed)."""
    out = [b"\x80\x02", _global("collections", "OrderedDict"), b")R"]
    if arrays:
        out.append(b"(")
        for i, (name, array) in enumerate(arrays.items()):
            storage = _STORAGE_OF[array.dtype]
            pid = _tuple([_str("storage"), _global("torch", storage), _str(str(i)), _str("cpu"),
                          _int(array.size)]) + b"Q"     # BINPERSID
            strides = [s // array.itemsize for s in array.strides] if array.size else \
                [math.prod(array.shape[j + 1:]) for j in range(array.ndim)]
            args = _tuple([pid, _int(0), _tuple([_int(n) for n in array.shape]),
                           _tuple([_int(s) for s in strides]), b"\x89",          # NEWFALSE
                           _global("collections", "OrderedDict") + b")R"])
            out += [_str(name), _global("torch._utils", "_rebuild_tensor_v2"), args, b"R"]
        out.append(b"u")                                   # SETITEMS
    out.append(b".")
    return b"".join(out)
