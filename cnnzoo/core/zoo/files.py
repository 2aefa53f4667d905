"""What a weights file is, told from its first bytes (its suffix only names a format that the
bytes cannot: a torch file and an .npz are both zip archives), and its tensors."""
from __future__ import annotations

import importlib
import zipfile
from pathlib import Path

import numpy as np

from ..errors import WeightsError

FORMATS = ("pth", "safetensors", "h5", "params", "npz")  # also each format's file suffix
# the module of formats/ that reads and writes each (npz: cnnzoo.core.weights)
_MODULES = {"pth": "torch_pickle", "safetensors": "safetensors", "h5": "keras_h5",
            "params": "gluon_params"}
# the layout (<name>_layout module) of a format's tensor names when no zoo model names one;
# an .npz holds canonical weights already
LAYOUT_OF = {"pth": "torch", "safetensors": "torch", "h5": "keras", "params": "gluon",
             "npz": None}

_HDF5 = b"\x89HDF\r\n\x1a\n"
_MXNET_LIST = (0x112).to_bytes(8, "little")  # mxnet.nd.save's list magic
_PICKLE = b"\x80"  # a pickle stream (protocol 2+): torch's legacy (pre-1.6) format


def detect(path: Path) -> str:
    """The format of ``path`` (one of FORMATS), from its content."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_HDF5):
        return "h5"
    if head.startswith(_MXNET_LIST):
        return "params"
    if head.startswith(b"PK"):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.endswith("data.pkl") for n in names):
            return "pth"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise WeightsError(f"{path}: a zip archive that is neither a torch file (no data.pkl) "
                           "nor an .npz of weights")
    if head.startswith(_PICKLE):
        return "pth"
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, JSON header
        return "safetensors"
    raise WeightsError(f"{path}: not a weights file this tool reads ({', '.join(FORMATS)}); "
                       "give a torch .pth, .safetensors, Keras .h5, Gluon .params or .npz")


def read_tensors(path: Path, fmt: str | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """``(format, tensors)`` of a weights file; ``fmt`` None: told from the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist: give the path of a weights "
                           "file or a zoo model's name (README, \"Pretrained weights\")")
    if fmt is not None and fmt not in FORMATS:
        raise WeightsError(f"unknown weights format '{fmt}': use one of {', '.join(FORMATS)}")
    try:
        fmt = fmt or detect(path)
        return fmt, _reader(fmt)(path)
    except WeightsError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise WeightsError(f"{path}: cannot read it as {fmt or 'weights'} "
                           f"({type(err).__name__}: {err}); the file is damaged or truncated: "
                           "replace it") from None


def write_tensors(path: Path, fmt: str, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` (the format's own names and layouts) as a ``fmt`` file, atomically."""
    if fmt == "npz":
        from ..weights import save_weights
        save_weights(path, tensors)
    else:
        _module(fmt).write(path, tensors)


def _reader(fmt: str):
    """The format's ``read`` (its module imported only when used: h5py is not needed for a
    torch file)."""
    if fmt == "npz":
        from ..weights import load_weights
        return load_weights
    return _module(fmt).read


def _module(fmt: str):
    return importlib.import_module(f"{__package__}.formats.{_MODULES[fmt]}")
