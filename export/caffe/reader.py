"""A Caffe model (``deploy.prototxt`` + ``.caffemodel``) -> cnnzoo's canonical weights for a spec.

``caffe_weights(prototxt, caffemodel, spec, input_size)`` reads the network's structure from the
prototxt (modern ``layer`` or the old V1 ``layers`` with its enum types) and the blobs from the
caffemodel (V1 or V2, matched by layer name; legacy 4-D blob headers too), pairs Caffe's
parametrised layers (Convolution, InnerProduct, BatchNorm with its Scale) with the spec's
(Conv2d, Dense, BatchNorm) and returns the canonical weights (``cnnzoo.core.weights``).

Pairing, in this order:

1. by name: every parametrised spec node has a Caffe layer of its name (files cnnzoo wrote: a
   BatchNorm node ``n`` is the Caffe BatchNorm ``n/normalized`` + the Scale ``n``);
2. by order: the i-th parametrised Caffe layer is the spec's i-th (BVLC's VGG-16: conv1_1 ..
   conv5_3, fc6, fc7, fc8 are the spec's conv1_1 .. conv5_3, fc1, fc2, fc3).

Either way each pair must be the same layer (type, kernel, stride, padding, groups, dilation,
outputs, bias, batch-norm eps, input channels or features), and what feeds it must agree: the
pooling layers (kind, kernel, stride, padding, and the output size each rounding gives at
``input_size``), activations, constant scales and the merges (Concat, Eltwise SUM) on the way back
to the previous parametrised layer, which must be the counterpart of the spec's. Layers without
effect at inference are skipped: Input/Data, Dropout, Split, Flatten, a Softmax at the end, loss
and accuracy layers. Every refusal is one line (``WeightsError``, unreadable files
included) naming the first difference.

Two translations of cnnzoo's Caffe export cannot be undone and are refused, each naming an input
size to export at instead: an adaptive pooling folded into the InnerProduct that reads it, and a
depthwise convolution of a 1x1 map written as the one tap that sees the pixel.

Caffe's BatchNorm stores its statistics multiplied by a scale factor (its third blob): they are
divided by it (a zero factor means zero statistics). A BatchNorm without a Scale has gamma 1 and
beta 0; a Scale without bias, beta 0. Auxiliary classifiers (training only; cnnzoo's export leaves
them out) get initial weights: He-normal (seed 0) kernels, zero biases, batch-norm gamma 1, beta 0,
mean 0, variance 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from architectures import spec as S
from cnnzoo.core.errors import WeightsError
from cnnzoo.core.weights import check_weights, expected_shapes, parametrised

from . import cnnzoo_caffe_pb2 as pb
from .files import blob_array, input_shape, read_caffemodel, read_prototxt
from .writer import caffe_avg_divisors, caffe_pool_size, depthwise_on_one_pixel, needed_nodes

# --------------------------------------------------------------------------- Caffe's layer types
# the V1 enum's names as the modern type strings (BVLC's UpgradeV1LayerType)
V1_TYPES = {
    "CONCAT": "Concat", "CONVOLUTION": "Convolution", "DATA": "Data", "DROPOUT": "Dropout",
    "ELTWISE": "Eltwise", "FLATTEN": "Flatten", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "TANH": "TanH",
    # BVLC's other V1 types (cnnzoo's architectures have none: named in refusals)
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONTRASTIVE_LOSS": "ContrastiveLoss", "DECONVOLUTION": "Deconvolution",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "EXP": "Exp",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col", "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SLICE": "Slice", "THRESHOLD": "Threshold", "WINDOW_DATA": "WindowData",
}
_INPUTS = {"Input", "Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "WindowData"}
_TRAINING = {"Accuracy", "Silence", "HDF5Output"}  # and every "...Loss" layer
_PASS = {"Dropout", "Split"}  # their tops are their bottom at inference
# what the layers cnnzoo's architectures do not have are, for the refusal
_UNSUPPORTED = {
    "LRN": "local response normalisation", "PReLU": "a ReLU with learned slopes",
    "ELU": "an exponential linear unit", "Deconvolution": "a transposed convolution",
    "MVN": "mean-variance normalisation", "Normalize": "L2 normalisation",
    "AbsVal": "absolute value", "BNLL": "softplus", "Exp": "exponential", "Log": "logarithm",
    "Threshold": "a step function", "Bias": "a learned bias outside a convolution",
    "Slice": "a channel split", "Crop": "cropping", "Reshape": "reshaping",
    "Interp": "interpolation", "Upsample": "upsampling", "SPP": "spatial pyramid pooling",
    "Im2col": "im2col", "ArgMax": "arg max", "Embed": "an embedding", "LSTM": "a recurrent layer",
    "RNN": "a recurrent layer", "Tile": "tiling", "Reduction": "a reduction",
    "Python": "a Python layer", "Permute": "a permutation", "PriorBox": "SSD's prior boxes",
    "Softmax": "a softmax inside the network (cnnzoo's architectures end in logits)",
}

# the kinds of node of the Caffe graph
INPUT, CONV, DENSE, BN, POOL, ACT, POWER, CONCAT, ADD, FLATTEN = (
    "input", "conv", "dense", "batchnorm", "pool", "act", "power", "concat", "add", "flatten")
PARAM_KINDS = (CONV, DENSE, BN)
_SPEC_KIND = {S.Conv2d: CONV, S.Dense: DENSE, S.BatchNorm: BN}
_KIND_NAME = {CONV: "Convolution", DENSE: "InnerProduct", BN: "BatchNorm"}
_SPEC_NAME = {CONV: "Conv2d", DENSE: "Dense", BN: "BatchNorm"}
_RAW = -1  # a blob read between a BatchNorm and its Scale (or a pooling and its rescaling)
_SOFTMAX = -2  # the output of a Softmax (only the network's end may have one)


def _refuse(name: str, kind: str, what: str | None = None) -> WeightsError:
    why = f" ({what})" if what else ""
    return WeightsError(f"Caffe layer '{name}' is {kind}{why}, which cnnzoo's architectures "
                        "do not have")


# --------------------------------------------------------------------------- reading the files
@dataclass
class _Layer:
    """One prototxt layer, V1 or modern, as (name, modern type, bottoms, tops, message)."""

    name: str
    type: str
    bottom: list[str]
    top: list[str]
    msg: object  # pb.LayerParameter or pb.V1LayerParameter (same parameter field names)


def _layers(net: pb.NetParameter) -> list[_Layer]:
    if net.layer:
        return [_Layer(m.name, m.type, list(m.bottom), list(m.top), m) for m in net.layer]
    enum = pb.V1LayerParameter.LayerType
    return [_Layer(m.name, V1_TYPES.get(enum.Name(m.type), enum.Name(m.type)), list(m.bottom),
                   list(m.top), m) for m in net.layers]


def _blobs(net: pb.NetParameter) -> dict[str, list]:
    out: dict[str, list] = {}
    for m in [*net.layer, *net.layers]:
        if m.blobs and m.name not in out:
            out[m.name] = list(m.blobs)
    return out


# --------------------------------------------------------------------------- Caffe's parameters
def _hw(repeated, h_w: tuple | None, default: int, what: str, name: str) -> tuple[int, int]:
    """Caffe's (h, w) of a kernel, stride, padding or dilation: ``x_h``/``x_w`` when set, else
    the repeated field's one value (both) or two."""
    if h_w is not None:
        return h_w
    values = list(repeated)
    if not values:
        return (default, default)
    if len(values) == 1:
        return (int(values[0]), int(values[0]))
    if len(values) == 2:
        return (int(values[0]), int(values[1]))
    raise _refuse(name, f"a {len(values)}-D {what}", None)


def _conv(layer: _Layer) -> S.Conv2d:
    cp, n = layer.msg.convolution_param, layer.name

    def hw(rep, h, w, default, what):
        both = cp.HasField(h) or cp.HasField(w)
        return _hw(rep, (getattr(cp, h), getattr(cp, w)) if both else None, default, what, n)

    kernel = hw(cp.kernel_size, "kernel_h", "kernel_w", 0, "convolution")
    if 0 in kernel:
        raise WeightsError(f"Caffe layer '{n}' (Convolution) declares no kernel size")
    return S.Conv2d(int(cp.num_output), kernel, hw(cp.stride, "stride_h", "stride_w", 1, "stride"),
                    hw(cp.pad, "pad_h", "pad_w", 0, "padding"), int(cp.group),
                    bool(cp.bias_term), _hw(cp.dilation, None, 1, "dilation", n))


def _pool(layer: _Layer) -> tuple[str, tuple, tuple, tuple, bool, bool]:
    """(kind, kernel, stride, pad, global, ceil) of a Pooling layer."""
    pp, n = layer.msg.pooling_param, layer.name
    if pp.pool == pb.PoolingParameter.STOCHASTIC:
        raise _refuse(n, "Pooling STOCHASTIC", "stochastic pooling")

    def one(field_, h, w, default):
        if pp.HasField(h) or pp.HasField(w):
            return (getattr(pp, h), getattr(pp, w))
        return (getattr(pp, field_),) * 2 if pp.HasField(field_) else (default, default)

    kind = "max" if pp.pool == pb.PoolingParameter.MAX else "ave"
    kernel = one("kernel_size", "kernel_h", "kernel_w", 0)
    if not pp.global_pooling and 0 in kernel:
        raise WeightsError(f"Caffe layer '{n}' (Pooling) declares no kernel size")
    return (kind, kernel, one("stride", "stride_h", "stride_w", 1), one("pad", "pad_h", "pad_w", 0),
            bool(pp.global_pooling), bool(pp.ceil_mode))


def _plain(p: tuple[int, int], sep: str = "x") -> str:
    return str(p[0]) if p[0] == p[1] else f"{p[0]}{sep}{p[1]}"


def _describe(layer, kind: str) -> str:
    """'Convolution 3x3/1 p1, 64 outputs' (Caffe) or 'Conv2d 3x3/1 p1, 64 outputs' (spec)."""
    if kind == CONV:
        text = S.describe(layer).replace("Conv2d", "Convolution", 1)
        if S.pair(layer.dilation) != (1, 1):
            text += f" d{_plain(S.pair(layer.dilation))}"
        return f"{text}, {layer.out_channels} outputs"
    if kind == DENSE:
        return f"InnerProduct, {layer.out_features} outputs"
    return f"BatchNorm eps {layer.eps:g}"


def _describe_spec(layer) -> str:
    kind = _SPEC_KIND[type(layer)]
    text = _describe(layer, kind)
    return text.replace("Convolution", "Conv2d", 1).replace("InnerProduct", "Dense", 1)


# --------------------------------------------------------------------------- the Caffe graph
@dataclass
class _Node:
    index: int
    kind: str
    name: str  # the Caffe layer's (a BatchNorm unit's: the BatchNorm's; also `names`)
    layer: _Layer | None
    inputs: list[int]
    shape: tuple[int, ...]
    spec: object = None  # the equivalent spec layer (Conv2d, Dense, BatchNorm) or pooling key
    scale: _Layer | None = None  # a BatchNorm's Scale, an average pooling's rescaling Scale
    in_features: int = 0  # a dense layer's
    consumers: int = 0
    names: set = field(default_factory=set)


class CaffeGraph:
    """The prototxt as a graph of the layers that compute something at inference, with every
    node's output shape at ``input_size`` (Caffe's own rules)."""

    def __init__(self, net: pb.NetParameter, channels: int, input_size: int):
        self.input_size = input_size
        self.nodes = [_Node(0, INPUT, "data", None, [], (channels, input_size, input_size))]
        producer: dict[str, int] = {}
        for layer in _layers(net):
            t = layer.type
            if t in _INPUTS:
                producer.update(dict.fromkeys(layer.top, 0))
                continue
            if t in _TRAINING or t.endswith("Loss"):
                continue
            counted = t not in _PASS and t != "Softmax"
            ins = [self._read(producer, b, layer, counted) for b in layer.bottom]
            if t in _PASS:
                producer.update(dict.fromkeys(layer.top, ins[0] if ins else 0))
                continue
            if not ins:
                raise WeightsError(f"Caffe layer '{layer.name}' ({t}) has no input")
            if t == "Softmax":  # at the end (read by nothing: see _read)
                producer.update(dict.fromkeys(layer.top, _SOFTMAX))
                continue
            if t == "Scale" and self._attach(layer, ins, producer):
                continue
            node = self._node(layer, ins)
            producer.update(dict.fromkeys(layer.top, node.index))
        outputs = [n for n in self.nodes[1:] if n.consumers == 0]
        if not outputs:
            raise WeightsError("the Caffe network computes nothing from its input")
        if len(outputs) > 1:
            names = ", ".join(f"'{n.name}'" for n in outputs[:4])
            raise WeightsError(f"the Caffe network has {len(outputs)} outputs ({names}); "
                               "cnnzoo's architectures have one")
        self.output = outputs[0]
        self.needed = self._ancestors(self.output.index)

    # reading a blob: the node that last wrote it
    def _read(self, producer: dict[str, int], blob: str, layer: _Layer, counted: bool) -> int:
        if blob not in producer:
            return 0  # the network's input (``input:`` or an undeclared blob)
        i = producer[blob]
        if i == _RAW:
            raise WeightsError(f"Caffe layer '{layer.name}' reads '{blob}' between a layer and "
                               "the Scale that completes it, which cnnzoo's architectures do not "
                               "have")
        if i == _SOFTMAX:
            raise WeightsError(f"Caffe layer '{layer.name}' reads the output of a Softmax "
                               f"('{blob}'): cnnzoo's architectures end in logits, with no "
                               "softmax inside")
        if counted:
            self.nodes[i].consumers += 1
        return i

    def _attach(self, layer: _Layer, ins: list[int], producer: dict[str, int]) -> bool:
        """A Scale that completes a BatchNorm (gamma, beta) or an average pooling (cnnzoo's
        rescaling to the real pixels' count): merged into that node."""
        sp, node = layer.msg.scale_param, self.nodes[ins[0]]
        if len(ins) != 1 or node.scale is not None or node.consumers != 1:
            return False
        if node.kind == BN and (sp.axis, sp.num_axes) == (1, 1):
            pass
        elif (node.kind == POOL and node.spec[1] == "ave" and node.spec[4] != (0, 0)
              and (sp.axis, sp.num_axes) == (2, 2) and not sp.bias_term):
            node.spec = (*node.spec[:6], True)  # excludes padding
        else:
            return False
        node.consumers, node.scale = 0, layer
        node.names.add(layer.name)
        for blob, i in list(producer.items()):
            if i == node.index:
                producer[blob] = _RAW
        producer.update(dict.fromkeys(layer.top, node.index))
        return True

    def _node(self, layer: _Layer, ins: list[int]) -> _Node:
        t, n, m = layer.type, layer.name, layer.msg
        x = self.nodes[ins[0]].shape
        node = _Node(len(self.nodes), "", n, layer, ins, x, names={n})
        if n.endswith("/normalized"):
            node.names.add(n[: -len("/normalized")])
        if t in ("Convolution", "Pooling") and len(x) != 3:
            raise WeightsError(f"Caffe layer '{n}' ({t}) reads a flat input of {x[0]} values")
        if t == "Convolution":
            conv = _conv(layer)
            node.kind, node.spec = CONV, conv
            c = x[0]
            if c % conv.groups or conv.out_channels % conv.groups:
                raise WeightsError(f"Caffe layer '{n}' (Convolution): {c} input and "
                                   f"{conv.out_channels} output channels are not divisible by "
                                   f"group {conv.groups}")
            hw = [self._window(n, size, k, s, p, d) for size, k, s, p, d in zip(
                x[1:], conv.kernel, conv.stride, conv.padding, conv.dilation)]
            node.shape = (conv.out_channels, *hw)
        elif t == "InnerProduct":
            ip = m.inner_product_param
            if ip.axis != 1:
                raise _refuse(n, f"InnerProduct over axis {ip.axis}", None)
            node.kind, node.spec = DENSE, S.Dense(int(ip.num_output), bool(ip.bias_term))
            node.in_features = int(np.prod(x))
            node.shape = (int(ip.num_output),)
        elif t == "BatchNorm":
            node.kind = BN
            node.spec = S.BatchNorm(float(m.batch_norm_param.eps))
        elif t == "Pooling":
            kind, k, s, p, glob, ceil = _pool(layer)
            if glob:
                k, s, p = tuple(x[1:]), (1, 1), (0, 0)
            out = tuple(caffe_pool_size(size, kk, ss, pp, ceil) for size, kk, ss, pp in zip(
                x[1:], k, s, p))
            if min(out) < 1 or p[0] >= k[0] or p[1] >= k[1]:
                raise WeightsError(f"Caffe layer '{n}' (Pooling {_plain(k)}/{_plain(s)}) cannot "
                                   f"pool its {x[1]}x{x[2]} input at input size "
                                   f"{self.input_size}")
            node.kind, node.spec, node.shape = POOL, _pool_key(kind, k, s, p, out, False), (
                x[0], *out)
        elif t in ("ReLU", "TanH", "Sigmoid"):
            slope = m.relu_param.negative_slope if t == "ReLU" else 0.0
            if slope:
                raise _refuse(n, f"ReLU with negative_slope {slope:g}", "a leaky ReLU")
            node.kind, node.spec = ACT, ("act", {"ReLU": "relu", "TanH": "tanh",
                                                 "Sigmoid": "sigmoid"}[t])
        elif t == "Power":
            pw = m.power_param
            if pw.power != 1 or pw.shift != 0:
                raise _refuse(n, f"Power with power {pw.power:g} and shift {pw.shift:g}",
                              "cnnzoo's architectures only multiply by a constant")
            node.kind, node.spec = POWER, ("scale", float(np.float32(pw.scale)))
        elif t == "Concat":
            if m.concat_param.axis not in (1, -3):
                raise _refuse(n, f"Concat along axis {m.concat_param.axis}", None)
            shapes = [self.nodes[i].shape for i in ins]
            if any(len(s) != 3 or s[1:] != x[1:] for s in shapes):
                raise WeightsError(f"Caffe layer '{n}' (Concat) joins inputs of different "
                                   f"sizes {shapes} at input size {self.input_size}")
            node.kind, node.shape = CONCAT, (sum(s[0] for s in shapes), *x[1:])
        elif t == "Eltwise":
            ep = m.eltwise_param
            if ep.operation != pb.EltwiseParameter.SUM or any(c != 1 for c in ep.coeff):
                op = pb.EltwiseParameter.EltwiseOp.Name(ep.operation)
                raise _refuse(n, f"Eltwise {op}" + (" with coefficients" if ep.coeff else ""),
                              None)
            if any(self.nodes[i].shape != x for i in ins):
                raise WeightsError(f"Caffe layer '{n}' (Eltwise) adds inputs of different "
                                   f"shapes at input size {self.input_size}")
            node.kind = ADD
        elif t == "Flatten":
            if (m.flatten_param.axis, m.flatten_param.end_axis) != (1, -1):
                raise _refuse(n, "a partial Flatten", None)
            node.kind, node.shape = FLATTEN, (int(np.prod(x)),)
        elif t == "Scale":
            raise _refuse(n, "Scale", "a learned per-channel scale outside batch normalisation")
        else:
            raise _refuse(n, t or "a layer of unknown type", _UNSUPPORTED.get(t))
        self.nodes.append(node)
        return node

    def _window(self, name, size, k, s, p, d) -> int:
        out = (size + 2 * p - (d * (k - 1) + 1)) // s + 1
        if out < 1:
            raise WeightsError(f"Caffe layer '{name}' (Convolution {k}x{k}) gets a {size}-wide "
                               f"input at input size {self.input_size}, too small for it")
        return out

    def _ancestors(self, index: int) -> set[int]:
        seen, todo = set(), [index]
        while todo:
            i = todo.pop()
            if i not in seen:
                seen.add(i)
                todo.extend(self.nodes[i].inputs)
        return seen


def _pool_key(kind, k, s, p, out, exclude) -> tuple:
    """A pooling as compared: the stride of an axis with one window does not matter, and
    excluding padding only matters with padding."""
    s = tuple(0 if o == 1 else ss for o, ss in zip(out, s))
    return ("pool", kind, tuple(k), s, tuple(p), tuple(out), bool(exclude and p != (0, 0)))


def _pool_text(key: tuple) -> str:
    _, kind, k, s, p, out, exclude = key
    text = f"{'MaxPool' if kind == 'max' else 'AvgPool'} {k[0]}x{k[1]}"
    text += f"/{_plain(s)}" if any(s) else ""
    text += f" p{_plain(p)}" if p != (0, 0) else ""
    text += ", padding excluded" if exclude else ""
    return f"{text} -> {out[0]}x{out[1]}"


# --------------------------------------------------------------------------- traces
@dataclass(frozen=True)
class _Item:
    key: tuple
    text: str


@dataclass(frozen=True)
class _Trace:
    """What feeds a layer: the ops on the way back (nearest first) to where it ends (the input,
    a parametrised layer, or a merge with the traces of its inputs)."""

    items: tuple
    end: _Item
    parts: tuple = ()

    @property
    def key(self) -> tuple:
        return (tuple(i.key for i in self.items), self.end.key,
                tuple(p.key for p in self.parts))


def _merge_item(kind: str, name: str, arity: int) -> _Item:
    return _Item(("merge", kind, arity), f"{'Concat' if kind == CONCAT else 'Add'} '{name}' "
                                         f"of {arity} inputs")


def _caffe_trace(g: CaffeGraph, index: int, ids: dict[int, str], depth: int = 2) -> _Trace:
    items = []
    while True:
        node = g.nodes[index]
        if node.kind == INPUT:
            return _Trace(tuple(items), _Item(("input",), "the input"))
        if node.kind in PARAM_KINDS:
            return _Trace(tuple(items), _Item(("param", ids.get(index, f"caffe:{node.name}")),
                                              f"'{node.name}'"))
        if node.kind in (CONCAT, ADD):
            parts = tuple(_caffe_trace(g, i, ids, depth - 1) for i in node.inputs) if depth else ()
            if node.kind == ADD:
                parts = tuple(sorted(parts, key=lambda t: repr(t.key)))
            return _Trace(tuple(items), _merge_item(node.kind, node.name, len(node.inputs)), parts)
        if node.kind == POOL:
            items.append(_Item(node.spec, f"'{node.name}' ({_pool_text(node.spec)})"))
        elif node.kind == ACT:
            items.append(_Item(node.spec, f"'{node.name}' ({node.spec[1]})"))
        elif node.kind == POWER:
            items.append(_Item(node.spec, f"'{node.name}' (scale {node.spec[1]:g})"))
        index = node.inputs[0]


def _spec_trace(rows: dict[str, S.LayerInfo], name: str, depth: int = 2) -> _Trace:
    """``rows``: every spec node's LayerInfo by name (the spec's analysis at the input size)."""
    items = []
    while True:
        if name == S.INPUT:
            return _Trace(tuple(items), _Item(("input",), "the input"))
        info = rows[name]
        node = info.node
        lay = node.layer
        if type(lay) in _SPEC_KIND:
            return _Trace(tuple(items), _Item(("param", name), f"'{name}'"))
        if isinstance(lay, (S.Concat, S.Add)):
            kind = CONCAT if isinstance(lay, S.Concat) else ADD
            parts = tuple(_spec_trace(rows, i, depth - 1)
                          for i in node.inputs) if depth else ()
            if kind == ADD:
                parts = tuple(sorted(parts, key=lambda t: repr(t.key)))
            return _Trace(tuple(items), _merge_item(kind, name, len(node.inputs)), parts)
        item = _spec_item(node, info)
        if item is not None:
            items.append(item)
        name = node.inputs[0]


def _spec_item(node: S.Node, info: S.LayerInfo) -> _Item | None:
    lay, name = node.layer, node.name
    hw, out = info.in_shape[1:], info.out_shape
    if isinstance(lay, (S.MaxPool, S.AvgPool)):
        s = S.pair(lay.kernel if lay.stride is None else lay.stride)
        key = _pool_key("max" if isinstance(lay, S.MaxPool) else "ave", S.pair(lay.kernel), s,
                        S.pair(lay.padding), out[1:], isinstance(lay, S.AvgPool)
                        and not lay.count_include_pad)
    elif isinstance(lay, S.GlobalAvgPool):
        key = _pool_key("ave", tuple(hw), (1, 1), (0, 0), (1, 1), False)
    elif isinstance(lay, S.AdaptiveAvgPool):
        if tuple(hw) == tuple(out[1:]):
            return None  # the identity
        if hw[0] % out[1] or hw[1] % out[2]:
            return _Item(("fold", name), f"'{name}' (adaptive average pooling "
                                         f"{hw[0]}x{hw[1]} -> {out[1]}x{out[2]})")
        k = (hw[0] // out[1], hw[1] // out[2])
        key = _pool_key("ave", k, k, (0, 0), out[1:], False)
    elif isinstance(lay, S.Activation):
        return _Item(("act", lay.kind), f"'{name}' ({lay.kind})")
    elif isinstance(lay, S.Scale):
        key = ("scale", float(np.float32(lay.factor)))
        return _Item(key, f"'{name}' (scale {key[1]:g})")
    else:  # Flatten, Dropout: nothing at inference in channels-first order
        return None
    return _Item(key, f"'{name}' ({_pool_text(key)})")


def _trace_diff(c: _Trace, s: _Trace, where: str = "before it") -> tuple[str, _Item | None]:
    """The first difference between what feeds a Caffe layer and what feeds the spec's, as a
    phrase (empty when they agree) and the spec's item there."""
    for i in range(max(len(c.items), len(s.items))):
        ci = c.items[i] if i < len(c.items) else c.end
        si = s.items[i] if i < len(s.items) else s.end
        if ci.key != si.key:
            return (f"{where}, Caffe has {ci.text} where the spec has {si.text}", si)
    if c.end.key != s.end.key:
        return f"{where}, Caffe has {c.end.text} where the spec has {s.end.text}", s.end
    for n, (cp, sp) in enumerate(zip(c.parts, s.parts)):
        text, item = _trace_diff(cp, sp, f"{where}, in input {n + 1} of {s.end.text}")
        if text:
            return text, item
    return "", None


# --------------------------------------------------------------------------- pairing
def _pairing(g: CaffeGraph, spec: S.Spec, needed: set[str]) -> list[tuple[S.Node, _Node | None]]:
    """(spec node, Caffe node) for every parametrised spec node the output needs: by name when
    every one has a Caffe layer of its name, else by order."""
    params = [n for n in spec.nodes if n.name in needed and type(n.layer) in _SPEC_KIND]
    units = [n for n in g.nodes if n.kind in PARAM_KINDS and n.index in g.needed]
    by_name: dict[str, _Node] = {}
    for unit in units:
        for name in sorted(unit.names, key=lambda x: x != unit.name):
            by_name.setdefault(name, unit)
        if unit.scale is not None:
            by_name[unit.scale.name] = unit  # the Scale names a BatchNorm unit first
    if all(n.name in by_name for n in params):
        pairs = [(n, by_name[n.name]) for n in params]
        paired = {id(u) for _, u in pairs}
        extra = [u for u in units if id(u) not in paired]
        return pairs + [(None, u) for u in extra]
    pairs = [(n, u) for n, u in zip(params, units)]
    pairs += [(n, None) for n in params[len(units):]]
    pairs += [(None, u) for u in units[len(params):]]
    return pairs


def _unit_text(u: _Node) -> str:
    text = _describe(u.spec, u.kind)
    if u.kind == BN:
        text += " + Scale" if u.scale is not None else " (no Scale)"
    return text


def _layer_diff(c: _Node, node: S.Node) -> str:
    """The first difference between a Caffe parametrised layer and a spec node's layer."""
    kind, lay, cl = _SPEC_KIND[type(node.layer)], node.layer, c.spec
    if c.kind != kind:
        return f"a {_KIND_NAME[c.kind]} where the spec has a {_SPEC_NAME[kind]}"
    if kind == CONV:
        for what, a, b in (("kernel", cl.kernel, lay.kernel), ("stride", cl.stride, lay.stride),
                           ("padding", cl.padding, lay.padding), ("groups", cl.groups, lay.groups),
                           ("dilation", cl.dilation, lay.dilation)):
            a, b = S.pair(a), S.pair(b)
            if a != b:
                return (f"{what} {_plain(a)} instead of {_plain(b)}" if what != "groups" else
                        f"{a[0]} groups instead of {b[0]}")
        if cl.out_channels != lay.out_channels:
            return f"{cl.out_channels} outputs instead of {lay.out_channels}"
    if kind == DENSE and cl.out_features != lay.out_features:
        return f"{cl.out_features} outputs instead of {lay.out_features}"
    if kind in (CONV, DENSE) and cl.bias != lay.bias:
        return "a bias where the spec has none" if cl.bias else "no bias where the spec has one"
    if kind == BN and abs(cl.eps - lay.eps) > 1e-6 * abs(lay.eps):
        return f"eps {cl.eps:g} instead of {lay.eps:g}"
    return ""


def _size_where(spec: S.Spec, name: str, ok, first: list) -> int | None:
    """An input size (one of ``first``, else the smallest) at which ``ok(LayerInfo of name)``."""
    def works(size):
        try:
            return ok(spec.analyze(size)[name])
        except (S.ShapeError, KeyError):
            return False

    lo = spec.min_input_size()
    return next((s for s in [*first, *range(lo, 4 * spec.input_size + 1)] if s and works(s)),
                None)


def _unfolded(info: S.LayerInfo) -> bool:
    """An adaptive pooling that is the identity or a plain pooling (cnnzoo's export keeps it)."""
    (_, ih, iw), (_, oh, ow) = info.in_shape, info.out_shape
    return ih % oh == 0 and iw % ow == 0


def _check_pairs(g: CaffeGraph, spec: S.Spec, analysis: S.Analysis, pairs, declared) -> None:
    ids = {u.index: n.name for n, u in pairs if n is not None and u is not None}
    rows = {row.node.name: row for row in analysis.layers}
    for node, unit in pairs:
        if unit is None:
            last = [u for _, u in pairs if u is not None]
            raise WeightsError(f"the spec's '{node.name}' ({_describe_spec(node.layer)}) has no "
                               f"counterpart in the Caffe network (its parametrised layers end "
                               f"at '{last[-1].name}')" if last else
                               f"the Caffe network has no parametrised layers for {spec.name}")
        if node is None:
            raise WeightsError(f"Caffe layer '{unit.name}' ({_unit_text(unit)}) has no "
                               f"counterpart in the spec's {spec.name}")
        head = (f"Caffe layer '{unit.name}' ({_unit_text(unit)}) does not match the spec's "
                f"'{node.name}' ({_describe_spec(node.layer)}): ")
        why = _layer_diff(unit, node)
        info = rows[node.name]
        if (why and unit.kind == CONV and isinstance(node.layer, S.Conv2d)
                and depthwise_on_one_pixel(node.layer, info)
                and (S.pair(unit.spec.kernel), S.pair(unit.spec.padding)) == ((1, 1), (0, 0))):
            size = _size_where(spec, node.name, lambda i: i.in_shape[1:] != (1, 1),
                               [declared, spec.input_size])
            raise WeightsError(
                head + f"at input size {analysis.input_size} its input is one pixel, and cnnzoo's "
                "Caffe export keeps only the tap that sees it (a 1x1 convolution), which cannot "
                "be undone; import a model exported at an input size where that input is larger"
                + (f" (e.g. {size})" if size else ""))
        if why:
            raise WeightsError(head + why)
        text, item = _trace_diff(_caffe_trace(g, unit.inputs[0], ids),
                                 _spec_trace(rows, node.inputs[0]))
        if item is not None and item.key[0] == "fold":
            size = _size_where(spec, item.key[1], _unfolded, [declared, spec.input_size])
            raise WeightsError(
                head + f"at input size {analysis.input_size} the spec's {item.text} has no Caffe "
                "layer (cnnzoo's Caffe export folds such a pooling into the InnerProduct that "
                "reads it, which cannot be undone); import a model exported at an input size "
                "where that pooling is the identity or a plain pooling"
                + (f" (e.g. {size})" if size else ""))
        if text:
            raise WeightsError(head + text)
        c_in, s_in = g.nodes[unit.inputs[0]].shape, info.in_shape
        if isinstance(node.layer, S.Dense) and unit.in_features != s_in[0]:
            raise WeightsError(head + f"it reads {unit.in_features} inputs at input size "
                               f"{analysis.input_size} where the spec's reads {s_in[0]}")
        if not isinstance(node.layer, S.Dense) and c_in[0] != s_in[0]:
            raise WeightsError(head + f"its input has {c_in[0]} channels where the spec's has "
                               f"{s_in[0]}")
    text, _ = _trace_diff(_caffe_trace(g, g.output.index, ids),
                          _spec_trace(rows, spec.output), "at the end")
    if text:
        raise WeightsError(f"the Caffe network's output '{g.output.name}' is not the spec's "
                           f"'{spec.output}': {text}")


# --------------------------------------------------------------------------- blobs
class _Blobs:
    def __init__(self, blobs: dict[str, list], prototxt: Path, caffemodel: Path, g: CaffeGraph,
                 declared: int | None, net: pb.NetParameter):
        self.blobs, self.prototxt, self.caffemodel = blobs, Path(prototxt), Path(caffemodel)
        self.g, self.declared, self.net = g, declared, net

    def get(self, layer: _Layer, shapes: list[tuple], what: str) -> list[np.ndarray]:
        """The blobs of ``layer``, one per shape, each in its shape."""
        have = self.blobs.get(layer.name)
        if not have:
            raise WeightsError(f"{self.caffemodel.name} has no weights for Caffe layer "
                               f"'{layer.name}' of {self.prototxt.name} (the .caffemodel of "
                               "another network?)")
        if len(have) != len(shapes):
            raise WeightsError(f"{self.caffemodel.name} holds {len(have)} blobs for Caffe layer "
                               f"'{layer.name}' where {self.prototxt.name} ({what}) needs "
                               f"{len(shapes)}")
        try:
            arrays = [blob_array(b) for b in have]
        except WeightsError as err:  # a blob whose data does not fill its declared shape
            raise WeightsError(f"{self.caffemodel.name}, Caffe layer '{layer.name}': {err} (a "
                               "damaged .caffemodel?)") from None
        return [self._fit(layer, a, shape, what) for a, shape in zip(arrays, shapes)]

    def _fit(self, layer: _Layer, array: np.ndarray, shape: tuple, what: str) -> np.ndarray:
        shape = tuple(int(d) for d in shape)
        if array.shape == shape:
            return array
        if array.size == int(np.prod(shape)) and _squeeze(array.shape) == _squeeze(shape):
            return array.reshape(shape)  # a legacy 4-D header (1 x 1 x out x in)
        hint = ""
        if self.declared and self.declared != self.g.input_size and len(shape) == 2:
            try:
                other = CaffeGraph(self.net, self.g.nodes[0].shape[0], self.declared)
                node = next(n for n in other.nodes if n.name == layer.name)
                if _squeeze(array.shape) in (_squeeze((shape[0], node.in_features)),
                                             _squeeze((node.in_features, shape[0]))):
                    hint = (f"; the network was written for input size {self.declared}: import "
                            "at that size")
            except (WeightsError, StopIteration):
                pass
        raise WeightsError(f"{self.caffemodel.name} holds a {tuple(array.shape)} blob for Caffe "
                           f"layer '{layer.name}' where {self.prototxt.name} ({what}) needs "
                           f"{shape} at input size {self.g.input_size}{hint}")


def _squeeze(shape) -> tuple:
    shape = tuple(int(d) for d in shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _unit_weights(unit: _Node, g: CaffeGraph, blobs: _Blobs) -> dict[str, np.ndarray]:
    """The canonical parameters (name -> array) of a Caffe parametrised layer."""
    lay = unit.spec
    if unit.kind == CONV:
        c = g.nodes[unit.inputs[0]].shape[0]
        kh, kw = lay.kernel
        shapes = [(lay.out_channels, c // lay.groups, kh, kw)] + (
            [(lay.out_channels,)] if lay.bias else [])
        arrays = blobs.get(unit.layer, shapes, "Convolution" + (" with bias" * lay.bias))
        return dict(zip(("weight", "bias"), arrays))
    if unit.kind == DENSE:
        transpose = bool(unit.layer.msg.inner_product_param.transpose)
        w_shape = (unit.in_features, lay.out_features) if transpose else (
            lay.out_features, unit.in_features)
        arrays = blobs.get(unit.layer, [w_shape] + ([(lay.out_features,)] if lay.bias else []),
                           "InnerProduct" + (" with bias" * lay.bias))
        if transpose:
            arrays[0] = np.ascontiguousarray(arrays[0].T)
        return dict(zip(("weight", "bias"), arrays))
    c = g.nodes[unit.inputs[0]].shape[0]
    mean, var, factor = blobs.get(unit.layer, [(c,), (c,), (1,)], "BatchNorm")
    f = float(factor.reshape(-1)[0])
    out = {"running_mean": _divide(mean, f), "running_var": _divide(var, f),
           "weight": np.ones(c, np.float32), "bias": np.zeros(c, np.float32)}
    if unit.scale is not None:
        bias = unit.scale.msg.scale_param.bias_term
        arrays = blobs.get(unit.scale, [(c,), (c,)] if bias else [(c,)],
                           "Scale" + (" with bias" if bias else ""))
        out["weight"] = arrays[0]
        if bias:
            out["bias"] = arrays[1]
    return out


def _divide(stat: np.ndarray, factor: float) -> np.ndarray:
    """Caffe's statistic over its scale factor (zero for a zero factor, as Caffe does)."""
    if factor == 0:
        return np.zeros_like(stat, dtype=np.float32)
    if factor == 1:
        return np.array(stat, dtype=np.float32)
    return (stat.astype(np.float64) / factor).astype(np.float32)


def _check_rescale(node: _Node, g: CaffeGraph, blobs: _Blobs) -> None:
    """cnnzoo's rescaling after an average pooling must be the real pixels' count."""
    _, _, k, s, p, out, _ = node.spec
    stride = tuple(ss or 1 for ss in s)
    in_hw = g.nodes[node.inputs[0]].shape[1:]
    (factor,) = blobs.get(node.scale, [out], "Scale over H and W")
    (ph, rh), (pw, rw) = (caffe_avg_divisors(*a) for a in zip(in_hw, k, stride, p, out))
    if not np.allclose(factor, np.outer(ph, pw) / np.outer(rh, rw), rtol=1e-5, atol=0):
        raise _refuse(node.scale.name, "Scale over H and W", "a per-position scale other than "
                      "excluding the padding from an average")


def _initial(shape: tuple, param: str, rng) -> np.ndarray:
    if param == "weight" and len(shape) > 1:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    value = 1.0 if param in ("weight", "running_var") else 0.0
    return np.full(shape, value, np.float32)


# --------------------------------------------------------------------------- the entry point
def caffe_weights(prototxt: Path, caffemodel: Path, spec: S.Spec,
                  input_size: int) -> dict[str, np.ndarray]:
    """The canonical weights of ``spec`` at ``input_size`` from a Caffe model: the network in
    ``prototxt`` and its blobs in ``caffemodel``. Raises a one-line WeightsError where the two
    are not the same network or a file cannot be read."""
    spec.check_input_size(input_size)
    analysis = spec.analyze(input_size)
    net = read_prototxt(prototxt)
    shape = input_shape(net)
    channels = int(shape[1]) if shape and len(shape) == 4 else spec.in_channels
    declared = int(shape[2]) if shape and len(shape) == 4 and shape[2] == shape[3] else None
    g = CaffeGraph(net, channels, input_size)
    needed = needed_nodes(spec)
    pairs = _pairing(g, spec, needed)
    _check_pairs(g, spec, analysis, pairs, declared)

    model = read_caffemodel(caffemodel)
    blobs = _Blobs(_blobs(model), prototxt, caffemodel, g, declared, net)
    del model
    for node in g.nodes:
        if node.kind == POOL and node.scale is not None and node.index in g.needed:
            _check_rescale(node, g, blobs)
    weights = {}
    for node, unit in pairs:
        for param, array in _unit_weights(unit, g, blobs).items():
            weights[f"{node.name}/{param}"] = array
    rng = np.random.default_rng(0)
    expected = expected_shapes(spec, input_size)
    for node, _, params in parametrised(spec):
        if node.name not in needed:  # auxiliary classifiers: not in the Caffe model
            for param in params:
                k = f"{node.name}/{param}"
                weights[k] = _initial(expected[k], param, rng)
    check_weights(weights, expected, f"the weights read from {Path(caffemodel).name}")
    return weights
