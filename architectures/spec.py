"""The framework-neutral architecture spec.

An architecture is a small directed graph of typed layers (``Node``), built by a plain Python
function with ``GraphBuilder``. Layers store only what they produce (output channels, kernel,
stride, ...); input sizes are inferred, so one spec serves any input size, channel count and
number of classes. Everything here is pure Python: no framework and no numpy is imported, so
``task=summary`` and config validation stay instant.

Conventions (shared by every backend):
- tensors are described channels-first: ``(C, H, W)`` for images, ``(F,)`` after flattening;
- padding is symmetric, given as ``p`` or ``(ph, pw)``; ceil-mode pooling follows PyTorch's rule
  (the last window must start inside the input or its left padding);
- FLOPs are 2 x multiply-accumulates of convolution and dense layers; nothing else is counted;
- parameters are the learnable ones (weights, biases, batch-norm scale and shift).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

Pair = tuple[int, int]
IntOrPair = Union[int, Pair]
Shape = tuple[int, ...]

ACTIVATIONS = ("relu", "tanh", "sigmoid")
# how every backend draws the initial conv and dense weights (Spec.init):
# "default": PyTorch's default, U(+-1/sqrt(fan_in)) for weights and biases alike;
# "kaiming_fan_out": torchvision's VGG, conv weights N(0, 2/fan_out), dense weights
# N(0, 0.01^2), zero biases (He et al. 2015: a deep ReLU stack without batch norm keeps its
# signal, where the default's smaller weights let it fade)
INITS = ("default", "kaiming_fan_out")


def pair(v: IntOrPair) -> Pair:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# --------------------------------------------------------------------------- layer types
@dataclass(frozen=True)
class Conv2d:
    out_channels: int
    kernel: IntOrPair
    stride: IntOrPair = 1
    padding: IntOrPair = 0
    groups: int = 1  # groups == in_channels == out_channels is a depthwise convolution
    bias: bool = True
    dilation: IntOrPair = 1


@dataclass(frozen=True)
class BatchNorm:
    eps: float = 1e-5
    momentum: float = 0.1  # PyTorch convention: weight of the new batch statistic


@dataclass(frozen=True)
class Activation:
    kind: str  # one of ACTIVATIONS


@dataclass(frozen=True)
class MaxPool:
    kernel: IntOrPair
    stride: IntOrPair | None = None  # None: same as kernel
    padding: IntOrPair = 0
    ceil_mode: bool = False


@dataclass(frozen=True)
class AvgPool:
    kernel: IntOrPair
    stride: IntOrPair | None = None
    padding: IntOrPair = 0
    ceil_mode: bool = False
    count_include_pad: bool = True


@dataclass(frozen=True)
class AdaptiveAvgPool:
    """Average pooling to a fixed output size (torchvision's VGG/AlexNet use it before the head)."""

    output_size: IntOrPair


@dataclass(frozen=True)
class GlobalAvgPool:
    """Mean over H and W, keeping (C, 1, 1); follow with Flatten for a vector."""


@dataclass(frozen=True)
class Flatten:
    """(C, H, W) -> (C*H*W,), in channels-first order (backends with other layouts must match)."""


@dataclass(frozen=True)
class Dense:
    out_features: int
    bias: bool = True


@dataclass(frozen=True)
class Dropout:
    p: float


@dataclass(frozen=True)
class Concat:
    """Concatenate along channels (Inception branches)."""


@dataclass(frozen=True)
class Add:
    """Elementwise sum of same-shaped inputs (residual connections)."""


@dataclass(frozen=True)
class Scale:
    """Multiply by a constant (Inception-ResNet scales its residual branches)."""

    factor: float


Layer = Union[Conv2d, BatchNorm, Activation, MaxPool, AvgPool, AdaptiveAvgPool, GlobalAvgPool,
              Flatten, Dense, Dropout, Concat, Add, Scale]


@dataclass(frozen=True)
class Node:
    name: str
    layer: Layer
    inputs: tuple[str, ...]


INPUT = "input"


class ShapeError(ValueError):
    """An input that the architecture cannot process (too small, mismatched branches)."""


# --------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class Spec:
    name: str
    in_channels: int
    num_classes: int
    nodes: tuple[Node, ...]  # topological order; the last node is the output (logits)
    input_size: int  # canonical input size (square)
    # auxiliary classifiers (GoogLeNet, Inception-v3): logits nodes used only in training, where
    # the loss is main + aux_weight * sum(aux losses); inference and export use the output alone
    aux_outputs: tuple[str, ...] = ()
    aux_weight: float = 0.0
    init: str = "default"  # one of INITS

    @property
    def output(self) -> str:
        return self.nodes[-1].name

    def analyze(self, input_size: int | None = None) -> "Analysis":
        """Infer every node's shape, parameters and FLOPs for a square input of ``input_size``."""
        size = self.input_size if input_size is None else input_size
        shapes: dict[str, Shape] = {INPUT: (self.in_channels, size, size)}
        rows = []
        for node in self.nodes:
            in_shapes = [shapes[i] for i in node.inputs]
            try:
                out = output_shape(node.layer, in_shapes)
            except ShapeError as err:
                raise ShapeError(f"layer '{node.name}' ({describe(node.layer)}): {err}") from None
            shapes[node.name] = out
            rows.append(LayerInfo(node, tuple(in_shapes), out,
                                  count_params(node.layer, in_shapes[0]),
                                  count_flops(node.layer, in_shapes[0], out)))
        return Analysis(self, size, rows)

    def min_input_size(self) -> int:
        """Smallest square input the graph accepts, found by bisection over the shape rules."""
        def ok(s: int) -> bool:
            try:
                self.analyze(s)
                return True
            except ShapeError:
                return False

        hi = max(self.input_size, 1)
        if not ok(hi):
            raise ShapeError(f"{self.name} does not accept its own canonical input size {hi}")
        lo = 1
        while lo < hi:  # every architecture here is monotone: larger inputs never fail
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
        return lo

    def check_input_size(self, input_size: int) -> None:
        """Raise a one-line ShapeError naming the failing layer and the minimum input size."""
        try:
            self.analyze(input_size)
        except ShapeError as err:
            raise ShapeError(f"input_size {input_size} is too small for {self.name}: {err}; "
                             f"use input_size >= {self.min_input_size()}") from None


@dataclass(frozen=True)
class LayerInfo:
    node: Node
    in_shapes: tuple[Shape, ...]
    out_shape: Shape
    params: int
    flops: int

    @property
    def in_shape(self) -> Shape:
        return self.in_shapes[0]


@dataclass(frozen=True)
class Analysis:
    spec: Spec
    input_size: int
    layers: list[LayerInfo] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.layers)

    @property
    def input_shape(self) -> Shape:
        return (self.spec.in_channels, self.input_size, self.input_size)

    def __getitem__(self, name: str) -> LayerInfo:
        for row in self.layers:
            if row.node.name == name:
                return row
        raise KeyError(name)


# --------------------------------------------------------------------------- shape rules
def window_count(size: int, k: int, s: int, p: int, d: int = 1, ceil_mode: bool = False) -> int:
    """The textbook out = (W - F + 2P) / S + 1, with PyTorch's ceil-mode correction."""
    span = d * (k - 1) + 1
    if ceil_mode:  # windows may hang over the edge, as long as each one starts inside
        out = math.ceil((size + 2 * p - span) / s) + 1
        if (out - 1) * s >= size + p:  # the last window would start in the right padding
            out -= 1
    else:
        out = (size + 2 * p - span) // s + 1
    if out < 1:
        padded = f" (+{p} padding each side)" if p else ""
        raise ShapeError(f"its input is {size} wide{padded}, too small for the {span}-wide window")
    return out


def _spatial(shape: Shape) -> Shape:
    if len(shape) != 3:
        raise ShapeError(f"expects a (C, H, W) input, got {shape}")
    return shape


def output_shape(layer: Layer, ins: list[Shape]) -> Shape:
    x = ins[0]
    if isinstance(layer, Conv2d):
        c, h, w = _spatial(x)
        if c % layer.groups or layer.out_channels % layer.groups:
            raise ShapeError(f"{c} input and {layer.out_channels} output channels are not "
                             f"divisible by groups={layer.groups}")
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(
            pair, (layer.kernel, layer.stride, layer.padding, layer.dilation))
        return (layer.out_channels, window_count(h, kh, sh, ph, dh),
                window_count(w, kw, sw, pw, dw))
    if isinstance(layer, (MaxPool, AvgPool)):
        c, h, w = _spatial(x)
        (kh, kw), (ph, pw) = pair(layer.kernel), pair(layer.padding)
        sh, sw = pair(layer.kernel if layer.stride is None else layer.stride)
        if 2 * max(ph, pw) > max(kh, kw):
            raise ShapeError("padding must be at most half the kernel")
        return (c, window_count(h, kh, sh, ph, ceil_mode=layer.ceil_mode),
                window_count(w, kw, sw, pw, ceil_mode=layer.ceil_mode))
    if isinstance(layer, AdaptiveAvgPool):
        c, _, _ = _spatial(x)
        return (c, *pair(layer.output_size))
    if isinstance(layer, GlobalAvgPool):
        c, _, _ = _spatial(x)
        return (c, 1, 1)
    if isinstance(layer, Flatten):
        return (math.prod(x),)
    if isinstance(layer, Dense):
        if len(x) != 1:
            raise ShapeError(f"expects a flat (F,) input, got {x}; add a Flatten first")
        return (layer.out_features,)
    if isinstance(layer, Concat):
        if any(len(s) != 3 or s[1:] != x[1:] for s in ins):
            raise ShapeError(f"branches have different spatial sizes {ins}")
        return (sum(s[0] for s in ins), *x[1:])
    if isinstance(layer, Add):
        if any(s != x for s in ins):
            raise ShapeError(f"inputs have different shapes {ins}")
        return x
    if isinstance(layer, (BatchNorm, Activation, Dropout, Scale)):
        return x
    raise TypeError(f"unknown layer type {type(layer).__name__}")


def count_params(layer: Layer, x: Shape) -> int:
    if isinstance(layer, Conv2d):
        kh, kw = pair(layer.kernel)
        return layer.out_channels * (x[0] // layer.groups) * kh * kw + layer.out_channels * layer.bias
    if isinstance(layer, BatchNorm):
        return 2 * x[0]
    if isinstance(layer, Dense):
        return x[0] * layer.out_features + layer.out_features * layer.bias
    return 0


def count_flops(layer: Layer, x: Shape, out: Shape) -> int:
    if isinstance(layer, Conv2d):
        kh, kw = pair(layer.kernel)
        return 2 * math.prod(out) * (x[0] // layer.groups) * kh * kw
    if isinstance(layer, Dense):
        return 2 * x[0] * layer.out_features
    return 0


def describe(layer: Layer) -> str:
    """Short human form, e.g. 'Conv2d 3x3/2 p1 g32' or 'MaxPool 3x3/2 ceil'."""
    kind = type(layer).__name__
    if isinstance(layer, (Conv2d, MaxPool, AvgPool)):
        kh, kw = pair(layer.kernel)
        stride = getattr(layer, "stride", None)
        s = pair(layer.kernel if stride is None else stride)
        text = f"{kind} {kh}x{kw}" + (f"/{s[0]}" if s[0] == s[1] else f"/{s[0]}x{s[1]}")
        p = pair(layer.padding)
        if p != (0, 0):
            text += f" p{p[0]}" if p[0] == p[1] else f" p{p[0]}x{p[1]}"
        if isinstance(layer, Conv2d) and layer.groups > 1:
            text += f" g{layer.groups}"
        if getattr(layer, "ceil_mode", False):
            text += " ceil"
        return text
    if isinstance(layer, Activation):
        return layer.kind
    if isinstance(layer, Dropout):
        return f"Dropout {layer.p:g}"
    if isinstance(layer, Scale):
        return f"Scale {layer.factor:g}"
    return kind


# --------------------------------------------------------------------------- builder
class GraphBuilder:
    """Build a Spec step by step. Every method returns the new node's name, so branches read as
    ``b = g.conv(x, 64, 1)``; ``x`` may be any earlier node's name (``INPUT`` at the start)."""

    def __init__(self, name: str, in_channels: int, num_classes: int, input_size: int):
        self.name, self.in_channels, self.num_classes = name, in_channels, num_classes
        self.input_size = input_size
        self._nodes: list[Node] = []
        self._names = {INPUT}
        self._counts: dict[str, int] = {}

    def add(self, layer: Layer, *inputs: str, name: str | None = None) -> str:
        if name is None:
            prefix = type(layer).__name__.lower()
            self._counts[prefix] = self._counts.get(prefix, 0) + 1
            name = f"{prefix}{self._counts[prefix]}"
        if name in self._names:
            raise ValueError(f"duplicate layer name '{name}' in {self.name}")
        missing = [i for i in inputs if i not in self._names]
        if missing or not inputs:
            raise ValueError(f"layer '{name}' has unknown or no inputs {missing or inputs}")
        self._names.add(name)
        self._nodes.append(Node(name, layer, tuple(inputs)))
        return name

    # thin helpers for the common layers; anything else goes through add()
    def conv(self, x, out_channels, kernel, stride=1, padding=0, groups=1, bias=True, name=None):
        return self.add(Conv2d(out_channels, kernel, stride, padding, groups, bias), x, name=name)

    def bn(self, x, eps=1e-5, momentum=0.1, name=None):
        return self.add(BatchNorm(eps, momentum), x, name=name)

    def act(self, x, kind="relu", name=None):
        if kind not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{kind}', expected one of {ACTIVATIONS}")
        return self.add(Activation(kind), x, name=name)

    def max_pool(self, x, kernel, stride=None, padding=0, ceil_mode=False, name=None):
        return self.add(MaxPool(kernel, stride, padding, ceil_mode), x, name=name)

    def avg_pool(self, x, kernel, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, name=None):
        return self.add(AvgPool(kernel, stride, padding, ceil_mode, count_include_pad), x,
                        name=name)

    def dense(self, x, out_features, bias=True, name=None):
        return self.add(Dense(out_features, bias), x, name=name)

    def dropout(self, x, p, name=None):
        return self.add(Dropout(p), x, name=name) if p > 0 else x

    def flatten(self, x, name=None):
        return self.add(Flatten(), x, name=name)

    def concat(self, *xs, name=None):
        return self.add(Concat(), *xs, name=name)

    def sum(self, *xs, name=None):
        return self.add(Add(), *xs, name=name)

    def build(self, aux_outputs: tuple[str, ...] = (), aux_weight: float = 0.0,
              init: str = "default") -> Spec:
        """The Spec; its output is the last node added. ``aux_outputs`` name training-only
        classifier heads (see Spec); ``init`` is one of INITS."""
        if init not in INITS:
            raise ValueError(f"unknown init {init!r} in {self.name}: one of {', '.join(INITS)}")
        if not self._nodes:
            raise ValueError(f"{self.name} has no layers")
        unknown = [a for a in aux_outputs if a not in self._names]
        if unknown:
            raise ValueError(f"unknown auxiliary outputs {unknown} in {self.name}")
        return Spec(self.name, self.in_channels, self.num_classes, tuple(self._nodes),
                    self.input_size, tuple(aux_outputs), aux_weight, init)
