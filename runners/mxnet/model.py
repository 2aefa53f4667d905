"""Translate a Spec into a Gluon ``HybridBlock`` (NCHW), one Gluon layer per spec node.

Each layer is keyed by its node name with dots replaced by underscores (the torch backend's
keys): parameters are named ``<key>_weight``, ``<key>_gamma``, ``<key>_running_mean``... and
``save_parameters`` files hold them as ``<key>.weight``, ``<key>.gamma``...: stable names for
weight transfer between frameworks. All shapes are known from ``spec.analyze``, so every
layer is built with its input channels and parameters are allocated at once (no deferred
initialisation and no shape-inference forward pass).

Where MXNet's operators differ from the spec's (PyTorch's) conventions:

- ceil-mode pooling: MXNet's ``pooling_convention="full"`` keeps a last window that starts in
  the right padding, PyTorch (and onnxruntime) drop it; the extra row/column is sliced off, so
  MXNet, the exported ONNX model and the spec agree on every shape;
- adaptive average pooling: ``contrib.AdaptiveAvgPooling2D`` computes PyTorch's bins but has no
  ONNX export, so the bins are average poolings over slices (one plain average pooling when the
  input divides evenly);
- batch norm momentum: MXNet's is the weight of the running value, ``1 - momentum`` of PyTorch.
"""
from __future__ import annotations

import math

import numpy as np

from .compat import patch_mxnet

patch_mxnet()  # before mxnet is imported: numpy.bool and onnx.mapping shims

from mxnet import autograd, gluon  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

from architectures import spec as S  # noqa: E402
from architectures.geometry import adaptive_bin_ranges  # noqa: E402


def key(name: str) -> str:
    """The Gluon child / prefix name of spec node ``name`` (dots are path separators in Gluon)."""
    return name.replace(".", "_")


class Pool(gluon.HybridBlock):
    """Max or average pooling with the spec's (PyTorch's) rules.

    Two ceil-mode cases need care; both keep MXNet, the exported ONNX model and the spec equal:
    - MXNet's ``"full"`` convention keeps a last window that starts in the right padding, where
      PyTorch and onnxruntime drop it: the extra row/column is sliced off;
    - PyTorch accepts a window wider than the padded input (e.g. 3x3 on 2x2), MXNet refuses: the
      input is padded on the right/bottom up to the window (max pooling pads with the lowest
      float, which never wins; average pooling pads with zeros and rescales, since with a single
      window per axis MXNet's divisor differs from PyTorch's by a constant factor)."""

    def __init__(self, layer: S.MaxPool | S.AvgPool, in_shape, out_shape, **kwargs):
        super().__init__(**kwargs)
        kernel, pad = S.pair(layer.kernel), S.pair(layer.padding)
        stride = S.pair(layer.kernel if layer.stride is None else layer.stride)
        is_max = isinstance(layer, S.MaxPool)
        include_pad = not is_max and layer.count_include_pad
        self._attrs = dict(kernel=kernel, stride=stride, pad=pad,
                           pool_type="max" if is_max else "avg",
                           pooling_convention="full" if layer.ceil_mode else "valid",
                           count_include_pad=include_pad)
        sizes, extra, self._factor = [], [], 1.0
        for n, k, p in zip(in_shape[1:], kernel, pad):
            e = max(0, k - 2 * p - n)  # only possible in ceil mode (else the spec rejects it)
            extra.append(e)
            sizes.append(n + e)
            if e and not is_max:  # MXNet divides by k or n + e, PyTorch by n + 2p or n
                self._factor *= k / (n + 2 * p) if include_pad else (n + e) / n
        self._pad_width = (0, 0, 0, 0, 0, extra[0], 0, extra[1]) if any(extra) else None
        self._pad_value = float(np.finfo(np.float32).min) if is_max else 0.0
        full = tuple(math.ceil((n + 2 * p - k) / s) + 1 if layer.ceil_mode else
                     (n + 2 * p - k) // s + 1
                     for n, k, s, p in zip(sizes, kernel, stride, pad))
        self._crop = tuple(out_shape[1:]) if full != tuple(out_shape[1:]) else None

    def hybrid_forward(self, F, x):
        if self._pad_width:
            x = F.pad(x, mode="constant", pad_width=self._pad_width,
                      constant_value=self._pad_value)
        y = F.Pooling(x, **self._attrs)
        if self._crop:
            y = F.slice(y, begin=(None, None, 0, 0), end=(None, None, *self._crop))
        return y * self._factor if self._factor != 1.0 else y


class AdaptiveAvgPool(gluon.HybridBlock):
    """PyTorch's ``AdaptiveAvgPool2d`` for a known input size, also when output > input.

    Bin ``i`` of ``out`` over ``n`` covers ``floor(i*n/out)`` to ``ceil((i+1)*n/out)``; bins are
    separable, so rows are averaged first, then columns, each bin an average pooling over a
    slice (MXNet's ``mean`` exports as an opset-13 ReduceMean that its own exporter rejects)."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int], **kwargs):
        super().__init__(**kwargs)
        self.in_hw, self.out_hw = tuple(in_hw), tuple(out_hw)

    def hybrid_forward(self, F, x):
        if self.in_hw == self.out_hw:
            return F.identity(x)
        if all(n % o == 0 for n, o in zip(self.in_hw, self.out_hw)):  # equal, disjoint bins
            kernel = tuple(n // o for n, o in zip(self.in_hw, self.out_hw))
            return F.Pooling(x, kernel=kernel, stride=kernel, pool_type="avg")
        for axis, n, out in zip((2, 3), self.in_hw, self.out_hw):
            if n == out:
                continue
            parts = []
            for a, b in adaptive_bin_ranges(n, out):
                kernel = (b - a, 1) if axis == 2 else (1, b - a)
                parts.append(F.Pooling(F.slice_axis(x, axis=axis, begin=a, end=b),
                                       kernel=kernel, pool_type="avg"))
            x = F.concat(*parts, dim=axis)
        return x


class Concat(gluon.HybridBlock):
    def hybrid_forward(self, F, *xs):
        return F.concat(*xs, dim=1)


class Add(gluon.HybridBlock):
    def hybrid_forward(self, F, *xs):
        return F.add_n(*xs)


class Scale(gluon.HybridBlock):
    def __init__(self, factor: float, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def hybrid_forward(self, F, x):
        return x * self.factor


class GlobalAvgPool(gluon.HybridBlock):
    """Mean over H and W keeping (C, 1, 1); exports as ONNX GlobalAveragePool."""

    def hybrid_forward(self, F, x):
        return F.Pooling(x, global_pool=True, pool_type="avg", kernel=(1, 1))


def gluon_layer(layer: S.Layer, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                prefix: str) -> gluon.HybridBlock:
    """The Gluon block for one spec node, its parameters named ``prefix + ...``."""
    kw = {"prefix": prefix}
    if isinstance(layer, S.Conv2d):
        return nn.Conv2D(layer.out_channels, S.pair(layer.kernel), S.pair(layer.stride),
                         S.pair(layer.padding), S.pair(layer.dilation), layer.groups,
                         use_bias=layer.bias, in_channels=in_shape[0], **kw)
    if isinstance(layer, S.BatchNorm):
        return nn.BatchNorm(axis=1, momentum=1.0 - layer.momentum, epsilon=layer.eps,
                            in_channels=in_shape[0], **kw)
    if isinstance(layer, S.Activation):
        return nn.Activation(layer.kind, **kw)
    if isinstance(layer, (S.MaxPool, S.AvgPool)):
        return Pool(layer, in_shape, out_shape, **kw)
    if isinstance(layer, S.AdaptiveAvgPool):
        return AdaptiveAvgPool(in_shape[1:], out_shape[1:], **kw)
    if isinstance(layer, S.GlobalAvgPool):
        return GlobalAvgPool(**kw)
    if isinstance(layer, S.Flatten):  # (C, H, W) -> C*H*W in channels-first order already
        return nn.Flatten(**kw)
    if isinstance(layer, S.Dense):  # inputs are (N, F) already, so flatten=True is a no-op
        # that exports as Flatten + Gemm (flatten=False adds Shape/Slice/Concat/Reshape nodes)
        return nn.Dense(layer.out_features, use_bias=layer.bias, flatten=True,
                        in_units=in_shape[0], **kw)
    if isinstance(layer, S.Dropout):
        return nn.Dropout(layer.p, **kw)
    if isinstance(layer, S.Concat):
        return Concat(**kw)
    if isinstance(layer, S.Add):
        return Add(**kw)
    if isinstance(layer, S.Scale):
        return Scale(layer.factor, **kw)
    raise TypeError(f"mxnet backend cannot build {type(layer).__name__}")


class SpecGraph(gluon.HybridBlock):
    """Computes the spec nodes that ``outputs`` need, with the given (possibly shared) layers."""

    def __init__(self, nodes, layers: dict[str, gluon.Block], outputs: tuple[str, ...]):
        super().__init__(prefix="")
        needed = set(outputs)
        for node in reversed(nodes):
            if node.name in needed:
                needed.update(node.inputs)
        self._plan = [(key(n.name), n.name, n.inputs) for n in nodes if n.name in needed]
        self._outputs = tuple(outputs)
        for k, _, _ in self._plan:  # structural names = node keys, as in save_parameters files
            self.register_child(layers[k], k)

    def __repr__(self):  # Gluon's lists attribute blocks only; these are registered children
        rows = [f"  ({k}): {block!r}".replace("\n", "\n  ") for k, block in self._children.items()]
        return f"{type(self).__name__}(\n" + "\n".join(rows) + "\n)"

    def hybrid_forward(self, F, x):
        values = self.node_values(x)
        out = tuple(values[o] for o in self._outputs)
        return out if len(out) > 1 else out[0]

    def node_values(self, x) -> dict:
        """Every node's output (and the input's, as ``S.INPUT``), NDArrays or Symbols."""
        values = {S.INPUT: x}
        for k, name, inputs in self._plan:
            values[name] = self._children[k](*[values[i] for i in inputs])
        return values


class SpecNet(SpecGraph):
    """The whole spec as a Gluon HybridBlock: one layer per node, stable names.

    Calling it runs the training graph: the logits, or ``(logits, *aux_logits)`` for a spec with
    auxiliary classifiers (their layers belong to this block, so parameters, checkpoints and
    counts cover them). ``inference_graph`` computes the logits alone, sharing the same layers
    (for a spec without auxiliary classifiers it is this block); predict and export use it."""

    def __init__(self, spec: S.Spec, input_size: int):
        analysis = spec.analyze(input_size)
        layers = {key(r.node.name): gluon_layer(r.node.layer, r.in_shape, r.out_shape,
                                                key(r.node.name) + "_")
                  for r in analysis.layers}
        super().__init__(spec.nodes, layers, (spec.output, *spec.aux_outputs))
        self.spec, self.input_size = spec, input_size
        self.aux_outputs, self.aux_weight = spec.aux_outputs, spec.aux_weight
        # a plain attribute, not a child: the view shares this block's layers and parameters
        self.__dict__["_inference"] = (SpecGraph(spec.nodes, layers, (spec.output,))
                                       if spec.aux_outputs else None)

    @property
    def inference_graph(self) -> gluon.HybridBlock:
        return self if self._inference is None else self._inference

    def layer(self, name: str) -> gluon.Block:
        """The Gluon layer of spec node ``name``."""
        return self._children[key(name)]

    def hybridize(self, active=True, **kwargs):
        """Hybridize (or not) the training and the inference graph alike."""
        gluon.HybridBlock.hybridize(self, active, **kwargs)
        if self._inference is not None:
            self._inference.hybridize(active, **kwargs)

    def logits(self, x):
        """Logits in inference mode (running BN statistics, no dropout)."""
        with autograd.predict_mode():
            return self.inference_graph(x)


def initialize(mx, net: SpecNet, init: str) -> None:
    """The initial weights the spec's ``init`` names (architectures.spec.INITS), on the CPU:
    "default" is torch's U(+-1/sqrt(fan_in)) for conv and dense weights, with zero biases;
    "kaiming_fan_out" redraws conv weights N(0, 2/fan_out) (Xavier with magnitude 2 over the
    fan-out) and dense weights N(0, 0.01^2)."""
    net.initialize(mx.init.Xavier(rnd_type="uniform", factor_type="in", magnitude=1),
                   ctx=mx.cpu())
    if init != "kaiming_fan_out":
        return
    redraw = {S.Conv2d: mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2),
              S.Dense: mx.init.Normal(0.01)}
    for node in net.spec.nodes:
        if type(node.layer) in redraw:
            net.layer(node.name).weight.initialize(redraw[type(node.layer)], ctx=mx.cpu(),
                                                   force_reinit=True)
