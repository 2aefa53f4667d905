"""Keras weight files, read and written with h5py alone (no Keras, no TensorFlow).

Two formats, both read into tensors keyed ``"<layer>/<weight>"`` (``block1_conv1/kernel``,
``batch_normalization_3/moving_mean``) in the file's order:

- the legacy HDF5 format that keras.applications publishes and ``Model.save_weights("x.h5")``
  (Keras 2) writes: the root (or its ``model_weights`` group, in a whole saved model) lists its
  layers in attribute ``layer_names``, each layer's group lists its datasets in attribute
  ``weight_names`` (``block1_conv1/kernel:0``). The layers come in ``Model.layers`` order (the
  functional graph sorted by depth), their weights in Keras' legacy order (trainable first:
  kernel, bias; gamma, beta, moving_mean, moving_variance). Long lists are split into chunked
  attributes ``layer_names0``, ``layer_names1``... when they exceed HDF5's header limit. Files
  saved by Keras 1 (the published VGG16/VGG19 files) name weights ``block1_conv1_W_1:0``: read
  with Keras 2's names (``W`` kernel, ``b`` bias, ``running_std`` moving_variance, which
  Keras 1 kept there);
- Keras 3's ``.weights.h5``: ``layers/<name>/vars/<i>``, where Keras names each layer after its
  class, numbered in ``Model.layers`` order (``conv2d``, ``conv2d_1``, ..., ``conv2d_10``), and
  nothing names a variable. Layers come in natural name order (so each class's layers in
  ``Model.layers`` order), each variable named from its place and shape.

``write`` produces the legacy format, which ``keras.Model.load_weights("x.h5")`` loads by
position: the tensors' order must be the model's ``Model.layers`` order.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import h5py
import numpy as np

from ...errors import WeightsError
from ...rundir import atomic_write_bytes

# what the legacy format's root says about the file: the Keras 2 layouts (no Keras 1 kernel
# conversion on loading) saved by the TensorFlow backend
_KERAS_VERSION, _BACKEND = b"2.15.0", b"tensorflow"
# HDF5 keeps an attribute in the object header, at most 64 KiB: longer lists are chunked
_HEADER_LIMIT = 64512


def read(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a Keras ``.h5`` / ``.weights.h5`` file, in the file's order."""
    try:
        with h5py.File(path, "r") as f:
            return _read(f, path)
    except OSError as err:  # not HDF5, or a dataset cut off
        raise WeightsError(f"{path}: cannot read it as HDF5 ({err}); the file is damaged or "
                           "truncated: download it again") from None


def _read(f: h5py.File, path: Path) -> dict[str, np.ndarray]:
    root = f
    if not _has_list(f, "layer_names") and "model_weights" in f:
        root = f["model_weights"]  # a whole model saved with Model.save("x.h5")
    if _has_list(root, "layer_names"):
        return _read_legacy(root, path)
    if isinstance(f.get("layers"), h5py.Group):
        return _read_keras3(f["layers"])
    raise WeightsError(f"{path}: an HDF5 file, but not Keras weights (neither the 'layer_names' "
                       "of a legacy .h5 nor the 'layers' group of a Keras 3 .weights.h5)")


def write(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` (``"<layer>/<weight>"``, in ``Model.layers`` order) as a legacy Keras
    ``.h5`` that ``Model.load_weights`` loads, atomically."""
    layers: dict[str, list[tuple[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        layer, sep, weight = key.rpartition("/")
        if not sep or not layer or not weight:
            raise WeightsError(f"Keras tensor name '{key}' is not '<layer>/<weight>'")
        layers.setdefault(layer, []).append((weight, np.asarray(value)))
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        _set_list(f, "layer_names", list(layers))
        f.attrs["backend"] = _BACKEND
        f.attrs["keras_version"] = _KERAS_VERSION
        # Keras creates the groups sorted by name (no group is created under another's name)
        for layer in sorted(layers):
            group = f.create_group(layer)
            names = [f"{layer}/{weight}:0" for weight, _ in layers[layer]]
            _set_list(group, "weight_names", names)
            for name, (_, value) in zip(names, layers[layer]):
                group.create_dataset(name, data=value)
    atomic_write_bytes(Path(path), buffer.getvalue())


# --------------------------------------------------------------------------- legacy .h5
def _read_legacy(root: h5py.Group, path: Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for layer in _get_list(root, "layer_names"):
        group = root.get(layer)
        if not isinstance(group, h5py.Group):
            raise WeightsError(f"{path}: layer '{layer}' is listed in 'layer_names' but has no "
                               "group: the file is damaged or truncated: download it again")
        for name in _get_list(group, "weight_names"):
            data = group.get(name)
            if not isinstance(data, h5py.Dataset):
                raise WeightsError(f"{path}: weight '{name}' of layer '{layer}' is missing: "
                                   "the file is damaged or truncated: download it again")
            key = f"{layer}/{_short(name, layer)}"
            if key in tensors:
                raise WeightsError(f"{path}: layer '{layer}' has two weights named "
                                   f"'{_short(name, layer)}'")
            tensors[key] = np.asarray(data[()])
    return tensors


# Keras 1's weight names -> Keras 2's
_KERAS1 = {"W": "kernel", "b": "bias", "running_std": "moving_variance",
           "running_mean": "moving_mean"}


def _short(weight_name: str, layer: str) -> str:
    """``block1_conv1/kernel:0`` -> ``kernel`` (Keras 3 writes ``block1_conv1/kernel``);
    Keras 1's ``block1_conv1_W_1:0`` -> ``kernel``."""
    name = weight_name.rsplit("/", 1)[-1].split(":", 1)[0]
    if name.startswith(f"{layer}_"):
        name = re.sub(r"_\d+$", "", name[len(layer) + 1:])
        name = _KERAS1.get(name, name)
    return name


def _has_list(obj, name: str) -> bool:
    return name in obj.attrs or f"{name}0" in obj.attrs


def _get_list(obj, name: str) -> list[str]:
    """A string-list attribute, whole or chunked (``name0``, ``name1``...)."""
    if name in obj.attrs:
        values = list(obj.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in obj.attrs:
            values.extend(obj.attrs[f"{name}{i}"])
            i += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _set_list(obj, name: str, values: list[str]) -> None:
    data = np.array([v.encode("utf8") for v in values]) if values else np.array([], "S1")
    chunks = 1
    while data.nbytes > _HEADER_LIMIT * chunks:
        chunks += 1
    if chunks == 1:
        obj.attrs[name] = data
    else:
        for i, part in enumerate(np.array_split(data, chunks)):
            obj.attrs[f"{name}{i}"] = part


# --------------------------------------------------------------------------- Keras 3 .weights.h5
def natural_key(name: str) -> list:
    """``conv2d_10`` after ``conv2d_9``: digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _read_keras3(layers: h5py.Group) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for layer in sorted(layers, key=natural_key):
        group = layers[layer]
        store = group.get("vars") if isinstance(group, h5py.Group) else None
        if not isinstance(store, h5py.Group) or not len(store):
            continue  # a layer without variables (pooling, activation) or a nested model
        values = [np.asarray(store[k][()]) for k in sorted(store, key=natural_key)]
        for weight, value in zip(_keras3_names(values), values):
            tensors[f"{layer}/{weight}"] = value
    return tensors


def _keras3_names(values: list[np.ndarray]) -> list[str]:
    """Keras' names for a layer's variables, in the order Keras 3 stores them (trainable
    first), told from their shapes: convolutions and dense layers have a kernel (a separable
    convolution two), then a bias; a batch norm has 1-D vectors only."""
    kernels = [v for v in values if v.ndim >= 2]
    if not kernels:  # batch norm: [gamma,] [beta,] moving_mean, moving_variance
        names = ["moving_mean", "moving_variance"]
        return (["gamma", "beta"] if len(values) == 4 else ["beta"] if len(values) == 3
                else [])[: len(values) - 2] + names
    names = ["depthwise_kernel", "pointwise_kernel"] if len(kernels) == 2 else ["kernel"]
    return names + ["bias"] * (len(values) - len(names))
