"""The spec and canonical weights -> a Caffe deploy network (``NetParameter``) and its blobs.

Every spec node becomes one Caffe layer; the layer that gives a node's output and its top blob
carry the node's name (``net.forward("layer1.0")`` in OpenCV), except:

- BatchNorm -> Caffe's ``BatchNorm`` (statistics, ``use_global_stats``) + ``Scale`` (gamma, beta);
- Dropout -> nothing (inference): its consumers read its input;
- Scale(factor) -> ``Power`` (scale = factor);
- AvgPool with ``count_include_pad=False`` and padding -> ``Pooling`` + a ``Scale`` over (H, W)
  that turns Caffe's divisor (padding counted) into the count of real pixels;
- AdaptiveAvgPool -> nothing when it is the identity, ``Pooling`` when the input is a multiple of
  the output, else folded into the ``InnerProduct`` that reads it through Flatten (the pooling is
  linear, so W' = W . P computes the same function on the smaller map);
- a depthwise convolution of a 1x1 map (Xception at small inputs) -> its one tap that sees the
  pixel, as a 1x1 convolution (OpenCV computes the padded one wrongly);
- auxiliary classifiers (training only) are left out, as in ONNX.

Pooling: Caffe rounds the output size up (ceil mode) by default, the spec (like PyTorch) down
unless a layer says ``ceil_mode``. For each pooling layer the writer computes both sizes and keeps
the rounding whose windows are the spec's: Caffe's default where they agree, else OpenCV's
``ceil_mode: false`` (see cnnzoo_caffe.proto). A size neither rounding gives is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from architectures import spec as S
from architectures.geometry import adaptive_bins
from cnnzoo.core.errors import ExportError

from . import cnnzoo_caffe_pb2 as pb

INPUT_BLOB = "data"  # the input's name in Caffe deploy files by convention


@dataclass
class CaffeLayer:
    """One layer: its NetParameter entry (no blobs) and its blobs, kept apart so that large
    weights are encoded once, straight from numpy (see files.caffemodel_bytes)."""

    proto: pb.LayerParameter
    blobs: list[np.ndarray] = field(default_factory=list)


# --------------------------------------------------------------------------- pooling rounding
def caffe_pool_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """Caffe's (and OpenCV's) pooled size: ceil or floor of (size + 2p - k) / s, plus one; in
    ceil mode a last window that would start in the right padding is dropped (only with
    padding: Caffe's rule)."""
    span = size + 2 * p - k
    out = (math.ceil(span / s) if ceil_mode else span // s) + 1
    if ceil_mode and p > 0 and (out - 1) * s >= size + p:
        out -= 1
    return out


def pool_ceil_mode(spec_out: tuple[int, int], in_hw: tuple[int, int], k, s, p, name: str) -> bool:
    """The Caffe rounding (True: ceil, Caffe's default) whose output size is the spec's; windows
    start at -p every s pixels in both, so an equal size means equal windows."""
    for ceil in (True, False):
        if all(caffe_pool_size(n, kk, ss, pp, ceil) == o
               for n, kk, ss, pp, o in zip(in_hw, k, s, p, spec_out)):
            return ceil
    raise ExportError(f"Caffe export: pooling layer '{name}' gives {spec_out} in the spec, which "
                      "neither Caffe rounding gives; export at another input size")


def caffe_avg_divisors(n: int, k: int, s: int, p: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output position along one axis: Caffe's divisor (the window clipped to the padded
    input) and the number of real pixels in the window."""
    start = np.arange(out) * s - p
    padded = np.minimum(start + k, n + p) - start
    real = np.minimum(start + k, n) - np.maximum(start, 0)
    return padded.astype(np.float64), real.astype(np.float64)


# --------------------------------------------------------------------------- the network
def _layer(name: str, kind: str, bottoms, top: str) -> pb.LayerParameter:
    layer = pb.LayerParameter(name=name, type=kind, top=[top])
    layer.bottom.extend(bottoms)
    return layer


def needed_nodes(spec: S.Spec) -> set[str]:
    """The nodes the output depends on (auxiliary heads are not)."""
    by_name = {n.name: n for n in spec.nodes}
    needed, todo = set(), [spec.output]
    while todo:
        name = todo.pop()
        if name in needed or name == S.INPUT:
            continue
        needed.add(name)
        todo.extend(by_name[name].inputs)
    return needed


def _folds(spec: S.Spec, analysis: S.Analysis,
           needed: set[str]) -> dict[str, tuple[np.ndarray, int]]:
    """AdaptiveAvgPool nodes no Caffe pooling can express, folded into the dense layer that reads
    them: dense node name -> (the (oh*ow, ih*iw) pooling matrix of one channel, channels)."""
    consumers: dict[str, list[S.Node]] = {}
    for node in spec.nodes:
        if node.name in needed:
            for i in node.inputs:
                consumers.setdefault(i, []).append(node)
    folds = {}
    for node in spec.nodes:
        if node.name not in needed or not isinstance(node.layer, S.AdaptiveAvgPool):
            continue
        c, ih, iw = analysis[node.name].in_shape
        _, oh, ow = analysis[node.name].out_shape
        if (ih, iw) == (oh, ow) or (ih % oh == 0 and iw % ow == 0):
            continue  # identity or a plain pooling
        # the dense layer it feeds through Flatten (and Dropout), each the only reader
        chain, name = [], node.name
        while len(consumers.get(name, [])) == 1 and isinstance(
                consumers[name][0].layer, (S.Flatten, S.Dropout)):
            chain.append(consumers[name][0].layer)
            name = consumers[name][0].name
        dense = consumers.get(name, [])
        if not (len(dense) == 1 and isinstance(dense[0].layer, S.Dense)
                and any(isinstance(layer, S.Flatten) for layer in chain)):
            raise ExportError(f"Caffe export: adaptive pooling '{node.name}' from {ih}x{iw} to "
                              f"{oh}x{ow} has no Caffe equivalent here (no dense layer reads it "
                              "through Flatten); export at an input size whose feature map there "
                              f"is a multiple of {oh}x{ow}")
        per_channel = np.kron(np.asarray(adaptive_bins(ih, oh)), np.asarray(adaptive_bins(iw, ow)))
        folds[dense[0].name] = (per_channel, c)
    return folds


def build_net(spec: S.Spec, weights: dict[str, np.ndarray], input_size: int,
              name: str | None = None) -> tuple[pb.NetParameter, list[CaffeLayer]]:
    """The deploy network (input ``data`` of shape 1 x C x H x W; output blob named after the
    spec's output node: the logits) and its layers with blobs."""
    analysis = spec.analyze(input_size)
    needed = needed_nodes(spec)
    folds = _folds(spec, analysis, needed)
    net = pb.NetParameter(name=name or spec.name)
    data = _layer(INPUT_BLOB, "Input", [], INPUT_BLOB)
    data.input_param.shape.add().dim.extend([1, *analysis.input_shape])
    layers = [CaffeLayer(data)]
    blob = {S.INPUT: INPUT_BLOB}  # spec node -> the Caffe blob holding its output

    def w(node, param):
        return np.asarray(weights[f"{node.name}/{param}"], dtype=np.float32)

    for node in spec.nodes:
        if node.name not in needed:
            continue
        lay, n, bottoms = node.layer, node.name, [blob[i] for i in node.inputs]
        info = analysis[n]
        blob[n] = n
        if isinstance(lay, S.Conv2d):
            proto = _layer(n, "Convolution", bottoms, n)
            cp = proto.convolution_param
            (cp.kernel_h, cp.kernel_w), (cp.stride_h, cp.stride_w) = map(
                S.pair, (lay.kernel, lay.stride))
            cp.pad_h, cp.pad_w = S.pair(lay.padding)
            cp.num_output, cp.bias_term, cp.group = lay.out_channels, lay.bias, lay.groups
            if S.pair(lay.dilation) != (1, 1):
                cp.dilation.extend(S.pair(lay.dilation))
            weight = w(node, "weight")
            if depthwise_on_one_pixel(lay, info):
                # OpenCV 4.11 computes a padded depthwise convolution of a 1x1 map wrongly
                # (errors of the order of the outputs, measured); only the tap over the pixel
                # sees it, so that tap alone, as a 1x1 convolution, is the same function
                ph, pw = S.pair(lay.padding)
                weight = np.ascontiguousarray(weight[:, :, ph:ph + 1, pw:pw + 1])
                cp.kernel_h = cp.kernel_w = 1
                cp.pad_h = cp.pad_w = 0
            layers.append(CaffeLayer(proto, [weight] + ([w(node, "bias")] if lay.bias else [])))
        elif isinstance(lay, S.BatchNorm):
            norm = _layer(f"{n}/normalized", "BatchNorm", bottoms, f"{n}/normalized")
            norm.batch_norm_param.use_global_stats = True
            norm.batch_norm_param.eps = lay.eps
            layers.append(CaffeLayer(norm, [w(node, "running_mean"), w(node, "running_var"),
                                            np.ones(1, np.float32)]))  # Caffe's scale factor
            affine = _layer(n, "Scale", [f"{n}/normalized"], n)
            affine.scale_param.bias_term = True
            layers.append(CaffeLayer(affine, [w(node, "weight"), w(node, "bias")]))
        elif isinstance(lay, S.Activation):
            kind = {"relu": "ReLU", "tanh": "TanH", "sigmoid": "Sigmoid"}[lay.kind]
            layers.append(CaffeLayer(_layer(n, kind, bottoms, n)))
        elif isinstance(lay, (S.MaxPool, S.AvgPool)):
            layers += _pooling(node, bottoms, info)
        elif isinstance(lay, S.AdaptiveAvgPool):
            (_, ih, iw), (_, oh, ow) = info.in_shape, info.out_shape
            if ih % oh == 0 and iw % ow == 0 and (ih, iw) != (oh, ow):
                proto = _layer(n, "Pooling", bottoms, n)
                pp = proto.pooling_param
                pp.pool = pb.PoolingParameter.AVE
                pp.kernel_h, pp.kernel_w = ih // oh, iw // ow
                pp.stride_h, pp.stride_w = ih // oh, iw // ow
                layers.append(CaffeLayer(proto))
            else:  # the identity, or folded into the dense layer that reads it (_folds)
                blob[n] = bottoms[0]
        elif isinstance(lay, S.GlobalAvgPool):
            proto = _layer(n, "Pooling", bottoms, n)
            proto.pooling_param.pool = pb.PoolingParameter.AVE
            proto.pooling_param.global_pooling = True
            layers.append(CaffeLayer(proto))
        elif isinstance(lay, S.Flatten):
            layers.append(CaffeLayer(_layer(n, "Flatten", bottoms, n)))
        elif isinstance(lay, S.Dense):
            proto = _layer(n, "InnerProduct", bottoms, n)
            proto.inner_product_param.num_output = lay.out_features
            proto.inner_product_param.bias_term = lay.bias
            weight = w(node, "weight")
            if n in folds:
                matrix, channels = folds[n]
                out = weight.shape[0]
                weight = np.einsum("ocp,pq->ocq", weight.astype(np.float64).reshape(
                    out, channels, matrix.shape[0]), matrix).reshape(out, -1).astype(np.float32)
            layers.append(CaffeLayer(proto, [weight] + ([w(node, "bias")] if lay.bias else [])))
        elif isinstance(lay, S.Dropout):
            blob[n] = bottoms[0]
        elif isinstance(lay, S.Concat):
            layers.append(CaffeLayer(_layer(n, "Concat", bottoms, n)))
        elif isinstance(lay, S.Add):
            proto = _layer(n, "Eltwise", bottoms, n)
            proto.eltwise_param.operation = pb.EltwiseParameter.SUM
            layers.append(CaffeLayer(proto))
        elif isinstance(lay, S.Scale):
            proto = _layer(n, "Power", bottoms, n)
            proto.power_param.scale = lay.factor
            layers.append(CaffeLayer(proto))
        else:
            raise ExportError(f"Caffe export: no Caffe layer for '{n}' ({S.describe(lay)})")
    if blob[spec.output] != spec.output:  # the output must be a blob of its own name
        raise ExportError(f"Caffe export: the output node '{spec.output}' is not a layer")
    for layer in layers:
        net.layer.append(layer.proto)
    return net, layers


def depthwise_on_one_pixel(lay: S.Conv2d, info: S.LayerInfo) -> bool:
    """A depthwise convolution of a 1x1 map: written as its one tap that sees the pixel."""
    channels, ph, pw = info.in_shape[0], *S.pair(lay.padding)
    kh, kw = S.pair(lay.kernel)
    return (lay.groups == channels > 1 and info.in_shape[1:] == (1, 1)
            and info.out_shape[1:] == (1, 1) and S.pair(lay.dilation) == (1, 1)
            and (kh, kw) != (1, 1) and ph < kh and pw < kw)


def _pooling(node: S.Node, bottoms: list[str], info: S.LayerInfo) -> list[CaffeLayer]:
    lay, n = node.layer, node.name
    k, p = S.pair(lay.kernel), S.pair(lay.padding)
    s = S.pair(lay.kernel if lay.stride is None else lay.stride)
    in_hw, out_hw = info.in_shape[1:], info.out_shape[1:]
    ceil = pool_ceil_mode(out_hw, in_hw, k, s, p, n)
    exclude_pad = isinstance(lay, S.AvgPool) and not lay.count_include_pad and p != (0, 0)
    top = f"{n}/padded_mean" if exclude_pad else n
    proto = _layer(top, "Pooling", bottoms, top)
    pp = proto.pooling_param
    pp.pool = pb.PoolingParameter.MAX if isinstance(lay, S.MaxPool) else pb.PoolingParameter.AVE
    (pp.kernel_h, pp.kernel_w), (pp.stride_h, pp.stride_w), (pp.pad_h, pp.pad_w) = k, s, p
    if not ceil:
        pp.ceil_mode = False
    out = [CaffeLayer(proto)]
    if exclude_pad:  # Caffe divides by the padded window; rescale to the real pixels' count
        (ph, rh), (pw, rw) = (caffe_avg_divisors(*args) for args in zip(in_hw, k, s, p, out_hw))
        factor = (np.outer(ph, pw) / np.outer(rh, rw)).astype(np.float32)
        rescale = _layer(n, "Scale", [top], n)
        rescale.scale_param.axis, rescale.scale_param.num_axes = 2, 2
        rescale.scale_param.bias_term = False
        out.append(CaffeLayer(rescale, [factor]))
    return out
