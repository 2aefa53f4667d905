"""Keras' weights (keras.applications' files, read by ``formats.keras_h5``) <-> canonical weights.

keras.applications names many layers itself (``conv2d_57``, ``batch_normalization_12``, numbered
in the order the model's code creates them, from wherever Keras' counters stood), and Keras 3's
``.weights.h5`` renames every layer after its class, numbered in ``Model.layers`` order
(``conv2d``, ``conv2d_1``...). Names cannot be mapped to the spec's nodes; the order can. Both
formats give the layers in ``Model.layers`` order, within each kind of layer at least: a legacy
file lists them so, and a Keras 3 file's names sort so (``formats.keras_h5``). That order is
Keras' depth sort of the functional graph, which ``keras_layer_order`` reproduces on the spec's
graph (a depthwise convolution whose only consumer is a 1x1 convolution is one
``SeparableConv2D``). The file's layers and the spec's parametrised nodes are then paired in
that order within each kind of Keras layer: a convolution with or without bias, a separable or
depthwise convolution, a dense layer, a batch norm. For keras.applications' VGG, Xception,
Inception-v3 and Inception-ResNet-v2 the tests prove the pairing exact.

Layouts: convolution kernels (kh, kw, in, out) -> OIHW; depthwise kernels (kh, kw, C, 1) ->
(C, 1, kh, kw); dense kernels (in, out) -> (out, in), and the first dense layer after a
Flatten of an (h, w, c) feature map has its rows re-ordered from Keras' channels-last flatten
to the spec's (c, h, w); batch norm gamma, beta, moving_mean, moving_variance -> weight, bias,
running_mean, running_var, where a batch norm without gamma (``scale=False``) is gamma = 1.

``from_canonical`` writes what ``Model.load_weights`` of the Keras model loads by position:
the layers in ``Model.layers`` order, named as Keras names layers itself (``conv2d``,
``conv2d_1``...), and a batch norm whose gamma is all ones without it (keras.applications'
``scale=False`` batch norms).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from architectures import spec as S

from ..errors import WeightsError
from ..weights import BATCHNORM, CONV, DENSE, key, parametrised

SEPARABLE, DEPTHWISE = "separable", "depthwise"
# Keras' own name for a layer of each kind (the prefix of the names it numbers)
_KERAS_NAME = {CONV: "conv2d", SEPARABLE: "separable_conv2d", DEPTHWISE: "depthwise_conv2d",
               DENSE: "dense", BATCHNORM: "batch_normalization"}
_LABEL = {CONV: "convolutions", SEPARABLE: "separable convolutions",
          DEPTHWISE: "depthwise convolutions", DENSE: "dense layers", BATCHNORM: "batch norms"}
_BN = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
       ("running_var", "moving_variance"))


@dataclass(frozen=True)
class Unit:
    """One Keras layer with weights: its kind, whether it has a bias, and the spec node(s)
    it is (a separable convolution: the depthwise node, then the pointwise node)."""
    kind: str
    bias: bool
    nodes: tuple[str, ...]

    @property
    def signature(self) -> tuple[str, bool]:
        return self.kind, self.bias


@dataclass(frozen=True)
class FileLayer:
    name: str
    kind: str
    bias: bool
    weights: dict

    @property
    def signature(self) -> tuple[str, bool]:
        return self.kind, self.bias


# --------------------------------------------------------------------------- the spec's side
def spec_units(spec: S.Spec, input_size: int) -> list[Unit]:
    """The spec's parametrised nodes as Keras layers, in node order."""
    analysis = spec.analyze(input_size)
    nodes = {n.name: n for n in spec.nodes}
    consumers: dict[str, list[str]] = {}
    for node in spec.nodes:
        for i in node.inputs:
            consumers.setdefault(i, []).append(node.name)
    units, merged = [], set()
    for node, kind, _ in parametrised(spec):
        if node.name in merged:
            continue
        layer = node.layer
        if kind == CONV and _is_depthwise(layer, analysis[node.name].in_shape[0]):
            after = consumers.get(node.name, [])
            pointwise = nodes[after[0]] if len(after) == 1 else None
            if pointwise is not None and _is_pointwise(pointwise.layer):
                merged.add(pointwise.name)
                units.append(Unit(SEPARABLE, pointwise.layer.bias, (node.name, pointwise.name)))
                continue
            kind = DEPTHWISE
        units.append(Unit(kind, bool(getattr(layer, "bias", False)), (node.name,)))
    return units


def _is_depthwise(layer: S.Conv2d, in_channels: int) -> bool:
    return layer.groups > 1 and layer.groups == in_channels == layer.out_channels


def _is_pointwise(layer) -> bool:
    return (isinstance(layer, S.Conv2d) and S.pair(layer.kernel) == (1, 1) and layer.groups == 1
            and S.pair(layer.stride) == (1, 1) and S.pair(layer.padding) == (0, 0))


def keras_layer_order(spec: S.Spec, units: list[Unit]) -> list[Unit]:
    """``units`` in Keras' ``Model.layers`` order: by decreasing depth (the longest path to the
    output), ties in the order a depth-first walk from the output through each layer's inputs
    first reaches them (keras.src.ops.function.map_graph). A separable convolution is one
    layer: its depthwise node is merged into its pointwise node."""
    merged = {u.nodes[0]: u.nodes[1] for u in units if u.kind == SEPARABLE}
    first = {pointwise: depthwise for depthwise, pointwise in merged.items()}
    nodes = {n.name: n for n in spec.nodes}
    inputs: dict[str, list[str]] = {}  # the Keras graph: layer -> its input layers
    for node in spec.nodes:
        if node.name not in merged:
            head = nodes[first.get(node.name, node.name)]
            inputs[node.name] = [merged.get(i, i) for i in head.inputs if i != S.INPUT]
    depth = {spec.output: 0}
    for node in reversed(spec.nodes):
        if node.name in inputs and node.name in depth:
            for i in inputs[node.name]:
                depth[i] = max(depth.get(i, 0), depth[node.name] + 1)
    index: dict[str, int] = {}
    stack = [iter([spec.output])]
    while stack:  # pre-order, iteratively (the graphs are deeper than Python's recursion)
        name = next(stack[-1], None)
        if name is None:
            stack.pop()
        elif name not in index:
            index[name] = len(index)
            stack.append(iter(inputs[name]))
    return sorted(units, key=lambda u: (-depth.get(u.nodes[-1], -1),
                                        index.get(u.nodes[-1], len(index))))


# --------------------------------------------------------------------------- the file's side
def file_layers(tensors: dict[str, np.ndarray]) -> list[FileLayer]:
    """The file's layers with weights, in the file's order, each with its kind."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for k, value in tensors.items():
        layer, _, weight = k.rpartition("/")
        grouped.setdefault(layer, {})[weight] = np.asarray(value)
    layers, unknown = [], []
    for name, w in grouped.items():
        kernel = w.get("kernel")
        if "moving_mean" in w and "moving_variance" in w:
            kind = BATCHNORM
        elif "depthwise_kernel" in w:
            kind = SEPARABLE if "pointwise_kernel" in w else DEPTHWISE
        elif kernel is not None and kernel.ndim in (2, 4):
            kind = CONV if kernel.ndim == 4 else DENSE
        else:
            unknown.extend(f"{name}/{weight}" for weight in w)
            continue
        layers.append(FileLayer(name, kind, kind != BATCHNORM and "bias" in w, w))
    if unknown:
        raise WeightsError(f"Keras weights of no layer kind cnnzoo knows (convolution, dense, "
                           f"batch norm): {_names(unknown)}")
    return layers


# --------------------------------------------------------------------------- to canonical
def to_canonical(tensors: dict[str, np.ndarray], spec: S.Spec, input_size: int
                 ) -> dict[str, np.ndarray]:
    """The file's tensors (``"<layer>/<weight>"`` in the file's order) as canonical weights."""
    units = keras_layer_order(spec, spec_units(spec, input_size))
    pairs = _pair(file_layers(tensors), units, spec)
    analysis = spec.analyze(input_size)
    out: dict[str, np.ndarray] = {}
    for layer, unit in pairs:
        out.update(_canonical(layer, unit, spec, analysis))
    return out


def _pair(layers: list[FileLayer], units: list[Unit], spec: S.Spec
          ) -> list[tuple[FileLayer, Unit]]:
    """(file layer, unit) by order within each kind; WeightsError naming what is left over."""
    by_kind_file: dict[tuple, list[FileLayer]] = {}
    by_kind_spec: dict[tuple, list[Unit]] = {}
    for layer in layers:
        by_kind_file.setdefault(layer.signature, []).append(layer)
    for unit in units:
        by_kind_spec.setdefault(unit.signature, []).append(unit)
    problems, unplaced, missing = [], [], []
    for sig in dict.fromkeys([*by_kind_spec, *by_kind_file]):
        got, want = by_kind_file.get(sig, []), by_kind_spec.get(sig, [])
        if len(got) != len(want):
            problems.append(f"{_label(sig)}: {len(got)} in the file, {len(want)} in "
                            f"{spec.name}")
            unplaced += [la.name for la in got[len(want):]]
            missing += [u.nodes[-1] for u in want[len(got):]]
    if problems:
        what = "; ".join(problems)
        if unplaced:
            what += f"; the file's layers that cannot be placed: {_names(unplaced)}"
        if missing:
            what += f"; {spec.name}'s layers with nothing in the file: {_names(missing)}"
        raise WeightsError(f"the Keras weights do not fit {spec.name} ({what}): a file of "
                           "another architecture? Give the file of the model's keras.applications "
                           "counterpart")
    pairs = []
    for sig, want in by_kind_spec.items():
        pairs += zip(by_kind_file[sig], want)
    return pairs


def _label(sig: tuple[str, bool]) -> str:
    kind, bias = sig
    if kind == BATCHNORM:
        return _LABEL[kind]
    return f"{_LABEL[kind]} {'with' if bias else 'without'} bias"


def _canonical(layer: FileLayer, unit: Unit, spec: S.Spec, analysis) -> dict[str, np.ndarray]:
    w, node = layer.weights, unit.nodes[-1]
    _require(layer, unit)
    if unit.kind == BATCHNORM:
        mean = w["moving_mean"]
        return {key(node, "weight"): w.get("gamma", np.ones_like(mean)),
                key(node, "bias"): w.get("beta", np.zeros_like(mean)),
                key(node, "running_mean"): mean,
                key(node, "running_var"): w["moving_variance"]}
    out = {}
    if unit.kind == SEPARABLE:
        depthwise, node = unit.nodes
        out[key(depthwise, "weight")] = w["depthwise_kernel"].transpose(2, 3, 0, 1)
        out[key(node, "weight")] = w["pointwise_kernel"].transpose(3, 2, 0, 1)
    elif unit.kind == DEPTHWISE:
        out[key(node, "weight")] = w["depthwise_kernel"].transpose(2, 3, 0, 1)
    elif unit.kind == CONV:
        out[key(node, "weight")] = w["kernel"].transpose(3, 2, 0, 1)
    else:
        out[key(node, "weight")] = _dense_rows(w["kernel"], spec, node, analysis, True).T
    if unit.bias:
        out[key(node, "bias")] = w["bias"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _require(layer: FileLayer, unit: Unit) -> None:
    need = {BATCHNORM: ("moving_mean", "moving_variance"),
            SEPARABLE: ("depthwise_kernel", "pointwise_kernel"),
            DEPTHWISE: ("depthwise_kernel",)}.get(unit.kind, ("kernel",))
    lost = [f"{layer.name}/{n}" for n in need + (("bias",) if unit.bias else ()) if
            n not in layer.weights]
    if lost:
        raise WeightsError(f"Keras layer {layer.name} lacks {', '.join(lost)}")


def _dense_rows(kernel: np.ndarray, spec: S.Spec, node: str, analysis, to_spec: bool
                ) -> np.ndarray:
    """A dense kernel (in, out) whose inputs come from a Flatten of an (c, h, w) feature map
    with its rows re-ordered between Keras' (h, w, c) flatten and the spec's (c, h, w)."""
    shape = _flattened(spec, node, analysis)
    if shape is None or kernel.shape[0] != int(np.prod(shape)):
        return kernel  # nothing to re-order (or another size: load names the mismatch)
    c, h, w = shape
    out = kernel.shape[1]
    if to_spec:
        return kernel.reshape(h, w, c, out).transpose(2, 0, 1, 3).reshape(c * h * w, out)
    return kernel.reshape(c, h, w, out).transpose(1, 2, 0, 3).reshape(c * h * w, out)


def _flattened(spec: S.Spec, node: str, analysis) -> tuple[int, int, int] | None:
    """The (c, h, w) feature map a Flatten turns into ``node``'s input (through dropout), when
    it has more than one position (after a global pool the order is the same)."""
    nodes = {n.name: n for n in spec.nodes}
    source = nodes[node].inputs[0]
    while source in nodes and isinstance(nodes[source].layer, S.Dropout):
        source = nodes[source].inputs[0]
    if source not in nodes or not isinstance(nodes[source].layer, S.Flatten):
        return None
    shape = analysis[source].in_shape
    return shape if len(shape) == 3 and shape[1] * shape[2] > 1 else None


# --------------------------------------------------------------------------- back to Keras
def from_canonical(weights: dict[str, np.ndarray], spec: S.Spec, input_size: int
                   ) -> dict[str, np.ndarray]:
    """Canonical weights as the tensors of a legacy Keras ``.h5`` (``keras_h5.write``) that
    ``Model.load_weights`` of the Keras model with this architecture loads."""
    units = spec_units(spec, input_size)
    wanted = [key(n.name, p) for n, _, params in parametrised(spec) for p in params]
    missing = [k for k in wanted if k not in weights]
    if missing:
        raise WeightsError(f"canonical weights of {spec.name} lack {len(missing)} key(s): "
                           f"{_names(missing)}")
    counts: dict[str, int] = {}
    analysis = spec.analyze(input_size)
    out: dict[str, np.ndarray] = {}
    for unit in keras_layer_order(spec, units):
        base, n = _KERAS_NAME[unit.kind], counts.get(unit.kind, 0)
        counts[unit.kind] = n + 1
        name = base if n == 0 else f"{base}_{n}"
        for weight, value in _native(weights, unit, spec, analysis):
            out[f"{name}/{weight}"] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def _native(weights: dict, unit: Unit, spec: S.Spec, analysis) -> list[tuple[str, np.ndarray]]:
    node = unit.nodes[-1]

    def w(n, p):
        return np.asarray(weights[key(n, p)], dtype=np.float32)

    if unit.kind == BATCHNORM:
        out = [(native, w(node, p)) for p, native in _BN]
        return out[1:] if np.all(out[0][1] == 1) else out  # scale=False: gamma is 1
    if unit.kind == SEPARABLE:
        out = [("depthwise_kernel", w(unit.nodes[0], "weight").transpose(2, 3, 0, 1)),
               ("pointwise_kernel", w(node, "weight").transpose(2, 3, 1, 0))]
    elif unit.kind == DEPTHWISE:
        out = [("depthwise_kernel", w(node, "weight").transpose(2, 3, 0, 1))]
    elif unit.kind == CONV:
        out = [("kernel", w(node, "weight").transpose(2, 3, 1, 0))]
    else:
        out = [("kernel", _dense_rows(w(node, "weight").T, spec, node, analysis, False))]
    return out + ([("bias", w(node, "bias"))] if unit.bias else [])


def _names(names: list[str], shown: int = 6) -> str:
    more = f" ... and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
