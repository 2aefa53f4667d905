"""Framework-neutral weights: one canonical layout, its keys and shapes from the spec, its file
(pure numpy; no framework is imported here).

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

Each backend converts between this layout and its framework's own (its ``weights`` module).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np

from architectures import spec as S

from .errors import WeightsError
from .npzfile import open_npz
from .rundir import atomic_write_bytes

# canonical parameter names per parametrised layer type (bias only where the layer has one)
_PARAMS = {S.Conv2d: ("weight", "bias"), S.Dense: ("weight", "bias"),
           S.BatchNorm: ("weight", "bias", "running_mean", "running_var")}

# the kinds of parametrised spec layer (a backend may refine one, e.g. a depthwise conv)
CONV, DENSE, BATCHNORM = "conv", "dense", "batchnorm"
_KIND = {S.Conv2d: CONV, S.Dense: DENSE, S.BatchNorm: BATCHNORM}


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


def float32_copy(value) -> np.ndarray:
    """A framework's array as a canonical one: float32, C-contiguous, and a copy (changing it
    leaves the model alone)."""
    return np.array(value, dtype=np.float32, order="C", copy=True)


def float32_contiguous(value) -> np.ndarray:
    """A canonical array as a framework takes it: float32 and C-contiguous."""
    return np.ascontiguousarray(np.asarray(value, dtype=np.float32))


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


# --------------------------------------------------------------------------- files
def save_weights(path: Path, weights: dict[str, np.ndarray]) -> None:
    """Write canonical weights as an uncompressed ``.npz`` (atomically: a crash never leaves
    half a file where a good one was)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """Read an ``.npz`` of canonical weights (no pickled objects are ever loaded)."""
    try:
        with open_npz(Path(path)) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:  # missing, not a zip, or an object array
        raise WeightsError(f"cannot read weights from {path}: {err}") from None
