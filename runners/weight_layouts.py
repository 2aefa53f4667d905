"""Framework-neutral weights: one canonical layout, and every conversion to and from the
frameworks' own layouts (pure numpy; no framework is imported here).

The canonical layout is PyTorch's. A set of weights is a ``dict[str, np.ndarray]`` of float32
arrays keyed ``"<spec node name>/<param>"``; on disk it is an ``.npz`` with the same keys:

==========  ================================================================================
Conv2d      ``weight`` (out, in / groups, kh, kw) (OIHW; a depthwise kernel is (C, 1, kh, kw));
            ``bias`` (out,) when the layer has one. Groups are contiguous: output channels
            [g*out/G, (g+1)*out/G) see input channels [g*in/G, (g+1)*in/G).
Dense       ``weight`` (out, in), the inputs in the spec's channels-first flatten order
            (c, h, w); ``bias`` (out,) when the layer has one.
BatchNorm   ``weight`` (gamma), ``bias`` (beta), ``running_mean``, ``running_var``, each (C,).
==========  ================================================================================

Nothing else is stored (no optimizer state, no step counters). ``expected_shapes`` derives the
keys and shapes from the spec alone, so a file describes the architecture, not a framework.

Per framework (``to_native`` / ``to_canonical``, by parameter):

- torch: identical (same names, same layouts);
- mxnet (Gluon): same layouts; batch norm's ``weight``/``bias`` are ``gamma``/``beta``;
- keras: channels-last kernels. Conv2d and grouped Conv2D ``kernel`` (kh, kw, in / groups, out)
  = OIHW transposed (2, 3, 1, 0); DepthwiseConv2D ``kernel`` (kh, kw, C, 1) = (C, 1, kh, kw)
  transposed (2, 3, 0, 1); Dense ``kernel`` (in, out) = weight.T; batch norm ``gamma``,
  ``beta``, ``moving_mean``, ``moving_variance``. Keras' Flatten of the spec (``FlattenCHW``)
  already flattens channels-first, so dense rows need no permutation.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from architectures import spec as S

# canonical parameter names per parametrised layer type (bias only where the layer has one)
_PARAMS = {S.Conv2d: ("weight", "bias"), S.Dense: ("weight", "bias"),
           S.BatchNorm: ("weight", "bias", "running_mean", "running_var")}

# the kinds of native layer a spec node can become; "depthwise" exists in Keras only
CONV, DEPTHWISE, DENSE, BATCHNORM = "conv", "depthwise", "dense", "batchnorm"
_KIND = {S.Conv2d: CONV, S.Dense: DENSE, S.BatchNorm: BATCHNORM}

_BN_NAMES = {"torch": {}, "mxnet": {"weight": "gamma", "bias": "beta"},
             "keras": {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                       "running_var": "moving_variance"}}


class WeightsError(ValueError):
    """A set of weights that does not fit the model: every problem, one per line."""


def key(node_name: str, param: str) -> str:
    return f"{node_name}/{param}"


def parametrised(spec: S.Spec) -> Iterator[tuple[S.Node, str, tuple[str, ...]]]:
    """Every node with parameters: (node, kind, its canonical parameter names)."""
    for node in spec.nodes:
        params = _PARAMS.get(type(node.layer))
        if params is None:
            continue
        if not getattr(node.layer, "bias", True):
            params = tuple(p for p in params if p != "bias")
        yield node, _KIND[type(node.layer)], params


def expected_shapes(spec: S.Spec, input_size: int) -> dict[str, tuple[int, ...]]:
    """The canonical key -> shape of every parameter of ``spec`` at ``input_size``."""
    analysis = spec.analyze(input_size)
    shapes = {}
    for node, _, params in parametrised(spec):
        layer, c_in = node.layer, analysis[node.name].in_shape[0]
        if isinstance(layer, S.Conv2d):
            kh, kw = S.pair(layer.kernel)
            own = {"weight": (layer.out_channels, c_in // layer.groups, kh, kw),
                   "bias": (layer.out_channels,)}
        elif isinstance(layer, S.Dense):
            own = {"weight": (layer.out_features, c_in), "bias": (layer.out_features,)}
        else:
            own = dict.fromkeys(params, (c_in,))
        shapes.update({key(node.name, p): own[p] for p in params})
    return shapes


def check_weights(weights: dict, expected: dict[str, tuple[int, ...]], what: str = "weights"):
    """Raise WeightsError naming every missing, unexpected, mis-shaped or non-float key."""
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
    for k, shape in expected.items():
        if k not in weights:
            continue
        value = np.asarray(weights[k])
        if tuple(value.shape) != tuple(shape):
            problems.append(f"{k} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        elif not np.issubdtype(value.dtype, np.floating):
            problems.append(f"{k} has dtype {value.dtype}, expected floating point")
    if problems:
        raise WeightsError(f"{what} do not fit the model:\n" + "\n".join(
            f"  {p}" for p in problems))


def _names(keys: list[str], shown: int = 8) -> str:
    more = f" ... and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


# --------------------------------------------------------------------------- conversions
_KERAS_KERNEL: dict[str, tuple[Callable, Callable]] = {
    # kind -> (canonical -> keras, keras -> canonical)
    CONV: (lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
    DEPTHWISE: (lambda w: w.transpose(2, 3, 0, 1), lambda w: w.transpose(2, 3, 0, 1)),
    DENSE: (lambda w: w.T, lambda w: w.T),
}


def native_name(framework: str, kind: str, param: str) -> str:
    """The framework's name for canonical parameter ``param`` of a layer of ``kind``."""
    if kind == BATCHNORM:
        return _BN_NAMES[framework].get(param, param)
    if framework == "keras" and param == "weight":
        return "kernel"
    return param


def to_native(framework: str, kind: str, param: str, value: np.ndarray) -> np.ndarray:
    """A canonical float32 array in the framework's layout (contiguous)."""
    value = np.asarray(value, dtype=np.float32)
    if framework == "keras" and param == "weight" and kind in _KERAS_KERNEL:
        value = _KERAS_KERNEL[kind][0](value)
    return np.ascontiguousarray(value)


def to_canonical(framework: str, kind: str, param: str, value: np.ndarray) -> np.ndarray:
    """A framework's array as a canonical float32 array (a copy, contiguous)."""
    value = np.asarray(value, dtype=np.float32)
    if framework == "keras" and param == "weight" and kind in _KERAS_KERNEL:
        value = _KERAS_KERNEL[kind][1](value)
    return np.array(value, dtype=np.float32, order="C", copy=True)


# --------------------------------------------------------------------------- files
def save_weights(path: Path, weights: dict[str, np.ndarray]) -> None:
    """Write canonical weights as an uncompressed ``.npz`` (atomically: a crash never leaves
    half a file where a good one was)."""
    from cnnzoo.rundir import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """Read an ``.npz`` of canonical weights (no pickled objects are ever loaded)."""
    try:
        with np.load(Path(path), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:  # missing, not a zip, or an object array
        raise WeightsError(f"cannot read weights from {path}: {err}") from None
