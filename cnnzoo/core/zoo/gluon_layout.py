"""Gluon model-zoo parameters <-> canonical weights (``cnnzoo.core.weights``).

Gluon's tensors already have the canonical layouts (convolutions OIHW, dense (out, in) after a
channels-first flatten, batch norm's four vectors); only the names differ. A Gluon file names
its parameters in one of two forms:

- structural, what ``Block.save_parameters`` writes: the attribute path of each layer and its
  parameter, ``features.0.weight``, ``features.7.3.1.1.running_var``, ``output.bias``;
- prefixed, what older zoo files and ``ParameterDict.save`` hold: the layer's name scope, its
  type and its count in that scope, ``conv0_weight``, ``A1_batchnorm3_gamma``, with or without
  the model's own prefix (``alexnet0_``) and MXNet's ``arg:``/``aux:``.

Neither form names the spec's nodes, but Gluon registers a model's parameters in the order its
layers were created, which is the spec's node order in each zoo model cnnzoo offers. So the
file's layers are paired with the spec's parametrised nodes by order, kind by kind
(convolutions with convolutions, dense with dense, batch norms with batch norms), each pair's
shapes checked. The file's order is Gluon's as long as, within each scope, the layers'
counters rise through the file; a file whose order was lost (saved from a Python 2 dict) is put
back in creation order from its names.

Export back writes the structural names of the Gluon zoo model of the spec's architecture,
derived from how ``gluon.model_zoo.vision`` builds it (``gluon_paths``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from architectures import spec as S

from ..errors import WeightsError
from ..weights import BATCHNORM, CONV, DENSE, expected_shapes, key, parametrised

_TO_CANONICAL = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
                 "running_mean": "running_mean", "running_var": "running_var",
                 "moving_mean": "running_mean", "moving_var": "running_var"}
_BN_ONLY = {"gamma", "beta", "running_mean", "running_var", "moving_mean", "moving_var"}
_GLUON_NAME = {BATCHNORM: {"weight": "gamma", "bias": "beta"}}  # others keep canonical names
_PREFIXED = re.compile(r"^(.+)_(" + "|".join(sorted(_TO_CANONICAL, key=len, reverse=True))
                       + r")$")
_COUNTED = re.compile(r"^(.*?)([A-Za-z]*)(\d+)$")  # a layer's scope, type and count
_KIND_WORDS = {CONV: "convolutions", DENSE: "dense layers", BATCHNORM: "batch norms"}


@dataclass
class _Layer:
    name: str                       # the file's name of the layer, its parameter left off
    keys: dict[str, str] = field(default_factory=dict)  # canonical param -> the file's key
    kind: str | None = None


def _short(items: list[str], n: int = 6) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _natural(text: str) -> tuple:
    """``conv10`` after ``conv9``: digit runs compare as numbers."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


# --------------------------------------------------------------------------- the file's layers
def _layers(tensors: dict[str, np.ndarray]) -> tuple[list[_Layer], list[str], bool]:
    """The file's layers in the file's order, the keys that name no Gluon parameter, and
    whether the names are structural."""
    stripped = {k: k[4:] if k.startswith(("arg:", "aux:")) else k for k in tensors}
    structural = any("." in n for n in stripped.values())
    layers: dict[str, _Layer] = {}
    unknown = []
    for k, name in stripped.items():
        if structural:
            layer, _, param = name.rpartition(".")
        else:
            m = _PREFIXED.match(name)
            layer, param = (m.group(1), m.group(2)) if m else ("", "")
        if not layer or param not in _TO_CANONICAL:
            unknown.append(k)
            continue
        entry = layers.setdefault(layer, _Layer(layer))
        canonical = _TO_CANONICAL[param]
        if canonical in entry.keys:
            unknown.append(k)
            continue
        entry.keys[canonical] = k
        if param in _BN_ONLY:
            entry.kind = BATCHNORM
    for entry in layers.values():
        if entry.kind is None and "weight" in entry.keys:
            entry.kind = {4: CONV, 2: DENSE}.get(tensors[entry.keys["weight"]].ndim)
        if entry.kind is None:
            unknown.extend(entry.keys.values())
    return [e for e in layers.values() if e.kind], unknown, structural


def _in_creation_order(layers: list[_Layer]) -> bool:
    """Within each scope and layer type, do the counters rise through the file (Gluon's own
    order), as a Python 2 dict's order would almost never have them?"""
    last: dict[tuple[str, str], int] = {}
    for layer in layers:
        m = _COUNTED.match(layer.name)
        if m:
            scope, count = (m.group(1), m.group(2)), int(m.group(3))
            if count <= last.get(scope, -1):
                return False
            last[scope] = count
    return True


def _creation_key(structural: bool):
    """The order Gluon created the layers in, from their names alone: child indices as
    numbers; in the prefixed form a scope's own layers before its sub-scopes' (a model's stem
    is built before its blocks)."""
    if structural:
        return lambda layer: tuple(_natural(p) for p in layer.name.split("."))

    def key_of(layer: _Layer) -> tuple:
        *scopes, leaf = layer.name.split("_")
        return tuple((1, _natural(s)) for s in scopes) + ((0, _natural(leaf)),)
    return key_of


def _file_layers(tensors: dict[str, np.ndarray]) -> tuple[list[_Layer], list[str]]:
    layers, unknown, structural = _layers(tensors)
    if not _in_creation_order(layers):
        layers = sorted(layers, key=_creation_key(structural))
    return layers, unknown


# --------------------------------------------------------------------------- to canonical
def _classifiers(spec: S.Spec) -> set[str]:
    return {spec.output, *spec.aux_outputs}


def to_canonical(tensors: dict[str, np.ndarray], spec: S.Spec,
                 input_size: int) -> dict[str, np.ndarray]:
    """A Gluon file's tensors (either name form) as canonical weights of ``spec``: its layers
    paired with the spec's parametrised nodes by order and kind, shapes checked (a classifier of
    another class count passes, for ``load`` to leave out)."""
    layers, problems = _file_layers(tensors)
    unplaced = list(problems)
    missing, mismatched, counts = [], [], []
    shapes = expected_shapes(spec, input_size)
    by_kind: dict[str, list] = {}
    for node, kind, params in parametrised(spec):
        by_kind.setdefault(kind, []).append((node, params))
    out: dict[str, np.ndarray] = {}
    for kind in (CONV, BATCHNORM, DENSE):
        nodes = by_kind.get(kind, [])
        found = [layer for layer in layers if layer.kind == kind]
        if len(found) != len(nodes):
            counts.append(f"{len(found)} {_KIND_WORDS[kind]} in the file, {len(nodes)} in "
                          f"{spec.name}")
        for layer in found[len(nodes):]:
            unplaced.extend(layer.keys.values())
        for (node, params), layer in zip(nodes, found):
            for p in params:
                k = key(node.name, p)
                if p not in layer.keys:
                    missing.append(k)
                    continue
                value, want = tensors[layer.keys[p]], shapes[k]
                if value.shape != want and not (
                        node.name in _classifiers(spec) and value.shape[1:] == want[1:]):
                    mismatched.append(f"{layer.keys[p]} {tuple(value.shape)} for {k} {want}")
                out[k] = value
            unplaced.extend(v for p, v in layer.keys.items() if p not in params)
        missing.extend(key(node.name, p) for node, params in nodes[len(found):] for p in params)
    if counts or unplaced or missing or mismatched:
        raise WeightsError(_problem(spec, counts, unplaced, missing, mismatched))
    return out


def _problem(spec, counts, unplaced, missing, mismatched) -> str:
    parts = []
    if counts:  # another network: its layers' shapes and names would only repeat that
        parts.append("; ".join(counts))
    elif mismatched:
        parts.append(f"shapes that do not fit: {_short(mismatched, 3)}")
    if unplaced:
        parts.append(f"tensors that cannot be placed: {_short(unplaced, 4)}")
    if missing:
        parts.append(f"{spec.name} parameters with nothing in the file: {_short(missing, 4)}")
    return (f"the Gluon file does not fit {spec.name} ({'; '.join(parts)}): give the Gluon "
            f"model zoo's file of {spec.name}, or the architecture the file was saved from")


# --------------------------------------------------------------------------- export back
def _basic(path: str) -> list[tuple[str, str]]:
    """Gluon's Inception basic conv, a Sequential of Conv2D (no bias), BatchNorm, ReLU."""
    return [(f"{path}.0", CONV), (f"{path}.1", BATCHNORM)]


def _alexnet(spec: S.Spec) -> list[tuple[str, str]]:
    # features: 5 Conv2D(relu) with max-pools after the 1st, 2nd and 5th, Flatten,
    # Dense(relu), Dropout, Dense(relu), Dropout; then output
    return [(f"features.{i}", CONV) for i in (0, 2, 4, 5, 6)] + [
        ("features.9", DENSE), ("features.11", DENSE), ("output", DENSE)]


def _vgg(spec: S.Spec) -> list[tuple[str, str]]:
    # features: per block (Conv2D, Activation) x n and a MaxPool2D, then Dense(relu), Dropout,
    # Dense(relu), Dropout; then output. The blocks' sizes are the spec's convs between pools.
    out, i = [], 0
    for node in spec.nodes:
        if isinstance(node.layer, S.Conv2d):
            out.append((f"features.{i}", CONV))
            i += 2
        elif isinstance(node.layer, S.MaxPool):
            i += 1
    return out + [(f"features.{i}", DENSE), (f"features.{i + 2}", DENSE), ("output", DENSE)]


# Gluon's Inception3 blocks (features.7 ... features.17): per branch, whether it opens with a
# pool and its count of basic convs; "E" is the block with the split 1x3/3x1 branches
_V3_BLOCKS = {"A": ((0, 1), (0, 2), (0, 3), (1, 1)), "B": ((0, 1), (0, 3), (1, 0)),
              "C": ((0, 1), (0, 3), (0, 5), (1, 1)), "D": ((0, 2), (0, 4), (1, 0))}


def _inception_v3(spec: S.Spec) -> list[tuple[str, str]]:
    out = [p for i in (0, 1, 2, 4, 5) for p in _basic(f"features.{i}")]  # 3, 6: max-pools
    for i, block in enumerate("AAABCCCCDEE", start=7):
        f = f"features.{i}"
        if block == "E":  # branch 1: [basic, split]; branch 2: [[basic, basic], split]
            out += _basic(f"{f}.0.0")
            out += _basic(f"{f}.1.0.0") + _basic(f"{f}.1.1.0.0") + _basic(f"{f}.1.1.1.0")
            out += _basic(f"{f}.2.0.0") + _basic(f"{f}.2.0.1")
            out += _basic(f"{f}.2.1.0.0") + _basic(f"{f}.2.1.1.0")
            out += _basic(f"{f}.3.1")
            continue
        for b, (pooled, convs) in enumerate(_V3_BLOCKS[block]):
            for j in range(convs):
                out += _basic(f"{f}.{b}.{j + pooled}")
    return out + [("output", DENSE)]


_GLUON_MODELS = {"alexnet": _alexnet, "vgg16": _vgg, "vgg19": _vgg,
                 "inception_v3": _inception_v3}


def gluon_paths(spec: S.Spec) -> list[tuple[str, str]]:
    """(structural path, kind) of each parametrised layer of the Gluon zoo model of ``spec``'s
    architecture, in Gluon's order."""
    make = _GLUON_MODELS.get(spec.name)
    if make is None:
        raise WeightsError(f"the Gluon model zoo has no model of {spec.name}: export Gluon "
                           f"weights of {', '.join(sorted(_GLUON_MODELS))}")
    return make(spec)


def from_canonical(weights: dict[str, np.ndarray], spec: S.Spec,
                   input_size: int) -> dict[str, np.ndarray]:
    """Canonical weights of ``spec`` under the structural names of the Gluon zoo model
    (``Block.load_parameters`` of ``gluon.model_zoo.vision.get_model(...)`` reads them)."""
    paths = gluon_paths(spec)
    nodes = list(parametrised(spec))
    kinds = [kind for _, kind, _ in nodes]
    if kinds != [kind for _, kind in paths]:
        raise WeightsError(f"{spec.name} with these options is not the Gluon zoo's model "
                           f"({len(nodes)} parametrised layers, Gluon's has {len(paths)}): "
                           "export it with the architecture's default options")
    out = {}
    for (node, kind, params), (path, _) in zip(nodes, paths):
        for p in params:
            k = key(node.name, p)
            if k not in weights:
                raise WeightsError(f"the weights have no {k}: give complete weights of "
                                   f"{spec.name}")
            out[f"{path}.{_GLUON_NAME.get(kind, {}).get(p, p)}"] = weights[k]
    return out
