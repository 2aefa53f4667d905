"""Translate a Spec into a functional ``keras.Model``, channels-last (NHWC).

Every spec node becomes one Keras layer with the node's name (``inception3a.branch2.1.conv``,
``fc``), so the names are stable handles for weight transfer between frameworks. The spec's
conventions are PyTorch's, and each layer reproduces them exactly rather than approximately:

- padding is symmetric and explicit. Keras' ``"same"`` pads asymmetrically (more on the right)
  when the total is odd and its amount depends on the input size for strides > 1, so it is used
  only where it is provably identical: stride 1 and a padding of exactly half the (odd,
  dilated) kernel on both axes. Everywhere else a ``ZeroPadding2D`` (named ``<node>.pad``)
  precedes a ``"valid"`` convolution;
- pooling (``SpecPool2D``) pads max-pools with -inf (zeros would win the max next to negative
  activations), lets ceil-mode windows hang over the right edge as PyTorch does, and divides
  average pools by PyTorch's divisor (``count_include_pad`` True or False, windows clipped at
  the padded edge);
- ``AdaptiveAvgPool2D`` uses PyTorch's bins, start = floor(i*in/out), end = ceil((i+1)*in/out),
  also when out > in;
- ``FlattenCHW`` flattens in channels-first order, so a Dense layer's weight rows line up with
  the other backends' (NCHW) flatten;
- weights start from PyTorch's default distribution (``_torch_init``);
- batch norm takes the spec's eps, and its momentum converted (Keras weighs the *old* moving
  statistic: ``momentum = 1 - pytorch_momentum``). Keras updates the moving variance with the
  biased batch variance, PyTorch with the unbiased one: inference is identical for equal
  weights, the statistics a training run accumulates differ by a factor n/(n-1).

TensorFlow is imported here, once, with its C++ start-up lines (oneDNN, CPU features, absl's
"All log messages before absl::InitializeLog()") kept off the terminal: ``TF_CPP_MIN_LOG_LEVEL``
silences most, and stderr is captured during the import to drop the rest.

A spec with ``aux_outputs`` gives a model with outputs ``[logits, *aux_logits]`` (training);
``inference_model`` is the logits-only view (shared layers) used for prediction and export.
The model is a ``SpecModel``: a functional model whose ``loss_hook`` sees every training step's
loss inside the compiled step (the runner's divergence watch).
"""
from __future__ import annotations

import math
import os
import re
import sys
import tempfile

import numpy as np

from architectures import spec as S
from architectures.geometry import adaptive_bins, avg_divisors, axis_padding

# TensorFlow's C++ logging: INFO and WARNING lines (oneDNN, CPU features, XLA) are noise here
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# absl/TSL messages printed while TensorFlow loads, before its logging is set up; they ignore
# TF_CPP_MIN_LOG_LEVEL, so they are captured during the import and dropped (other lines stay)
_STARTUP_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)"
                            r"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\]"
                            r"|To enable the following instructions:)")


def _import_tensorflow():
    """``import tensorflow, keras`` with the C++ start-up chatter on stderr filtered out."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras
            import tensorflow as tf
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [ln for ln in captured.read().decode(errors="replace").splitlines(True)
                    if not _STARTUP_NOISE.match(ln)]
            sys.stderr.write("".join(kept))
    tf.get_logger().setLevel("ERROR")  # e.g. retracing notes from Keras' internals
    return tf, keras


tf, keras = _import_tensorflow()

from keras import layers, ops  # noqa: E402  (after the quiet import)

PACKAGE = "cnnzoo"


# --------------------------------------------------------------------------- padding
def _same_is_exact(kernel: S.Pair, stride: S.Pair, padding: S.Pair,
                   dilation: S.Pair = (1, 1)) -> bool:
    """Keras 'same' equals symmetric padding p when stride is 1 and d*(k-1) == 2p per axis."""
    return stride == (1, 1) and all(d * (k - 1) == 2 * p
                                    for k, p, d in zip(kernel, padding, dilation))


# --------------------------------------------------------------------------- custom layers
@keras.saving.register_keras_serializable(package=PACKAGE)
class SpecPool2D(layers.Layer):
    """Max or average pooling with PyTorch's semantics (see the module docstring).

    Average pooling is computed as a 'valid' pool over the zero-padded input (a sum divided by
    kh*kw) times a constant map kh*kw / divisor, which is 1 wherever the window lies inside the
    padded input; the map is built from the static input size and left out when it is all ones.
    """

    def __init__(self, mode: str, kernel, stride, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("max", "avg"):
            raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
        self.mode, self.ceil_mode, self.count_include_pad = mode, ceil_mode, count_include_pad
        self.kernel, self.stride = S.pair(kernel), S.pair(stride)
        self.padding = S.pair(padding)

    def build(self, input_shape):
        _, h, w, _ = input_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        pad_h, oh = axis_padding(h, kh, sh, ph, ceil_mode=self.ceil_mode)
        pad_w, ow = axis_padding(w, kw, sw, pw, ceil_mode=self.ceil_mode)
        self._pads = ((0, 0), tuple(pad_h), tuple(pad_w), (0, 0))
        self._out = (oh, ow)
        # TF's 'same' pooling ignores the padded cells: exact for max, and for avg exactly
        # count_include_pad=False (stride 1, so no ceil-mode overhang either)
        self._same = _same_is_exact(self.kernel, self.stride, self.padding) and (
            self.mode == "max" or not self.count_include_pad)
        self._scale = None
        if self.mode == "avg" and not self._same:
            scale = kh * kw / np.outer(
                avg_divisors(h, kh, sh, ph, oh, self.count_include_pad),
                avg_divisors(w, kw, sw, pw, ow, self.count_include_pad))
            if not np.allclose(scale, 1.0):
                self._scale = scale[None, :, :, None].astype(np.float32)

    def call(self, x):
        pool = ops.max_pool if self.mode == "max" else ops.average_pool
        if self._same:
            return pool(x, self.kernel, self.stride, padding="same")
        if any(sum(p) for p in self._pads):
            # -inf never wins a max; zeros are the sum's neutral element for the average
            fill = -np.inf if self.mode == "max" else 0.0
            x = ops.pad(x, self._pads, constant_values=fill)
        y = pool(x, self.kernel, self.stride, padding="valid")
        if self._scale is not None:
            y = y * ops.convert_to_tensor(self._scale, dtype=y.dtype)
        return y

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        return (n, axis_padding(h, kh, sh, ph, ceil_mode=self.ceil_mode)[1],
                axis_padding(w, kw, sw, pw, ceil_mode=self.ceil_mode)[1], c)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "kernel": self.kernel,
                "stride": self.stride, "padding": self.padding, "ceil_mode": self.ceil_mode,
                "count_include_pad": self.count_include_pad}


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedConv2D(layers.Conv2D):
    """``Conv2D(groups > 1)`` running TensorFlow's native grouped convolution.

    Keras routes grouped convolutions on the CPU through a nested XLA-compiled function, which
    tf2onnx cannot convert (it stays an opaque ``StatefulPartitionedCall``). TensorFlow 2.21
    runs grouped ``Conv2D`` natively on CPU and GPU, forward and backward, and tf2onnx turns it
    into one ONNX ``Conv`` with ``group``; same weights, same output."""

    def convolution_op(self, inputs, kernel):
        return tf.nn.convolution(inputs, kernel, strides=list(self.strides),
                                 padding=self.padding.upper(), dilations=list(self.dilation_rate))


@keras.saving.register_keras_serializable(package=PACKAGE)
class AdaptiveAvgPool2D(layers.Layer):
    """PyTorch's ``AdaptiveAvgPool2d``: identity when sizes match, a plain pool when the input
    is a multiple of the output, else two constant averaging matrices (exact for any sizes)."""

    def __init__(self, output_size, **kwargs):
        super().__init__(**kwargs)
        self.output_size = S.pair(output_size)

    def build(self, input_shape):
        _, h, w, _ = input_shape
        (oh, ow) = self.output_size
        self._identity = (h, w) == (oh, ow)
        self._pool = None if self._identity or h % oh or w % ow else (h // oh, w // ow)
        self._bins = (np.asarray(adaptive_bins(h, oh), np.float32),
                      np.asarray(adaptive_bins(w, ow), np.float32))

    def call(self, x):
        if self._identity:
            return x
        if self._pool is not None:
            return ops.average_pool(x, self._pool, self._pool, padding="valid")
        rows, cols = (ops.convert_to_tensor(m, dtype=x.dtype) for m in self._bins)
        x = ops.einsum("ih,nhwc->niwc", rows, x)
        return ops.einsum("jw,niwc->nijc", cols, x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.output_size, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "output_size": self.output_size}


@keras.saving.register_keras_serializable(package=PACKAGE)
class FlattenCHW(layers.Layer):
    """(N, H, W, C) -> (N, C*H*W) in channels-first order, the spec's flatten convention."""

    def call(self, x):
        _, h, w, c = x.shape
        if h * w > 1:  # with a 1x1 map both orders coincide: skip the transpose
            x = ops.transpose(x, (0, 3, 1, 2))
        return ops.reshape(x, (-1, c * h * w))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], math.prod(input_shape[1:]))


@keras.saving.register_keras_serializable(package=PACKAGE)
class Scale(layers.Layer):
    """Multiply by a constant (Inception-ResNet's residual scaling)."""

    def __init__(self, factor: float, **kwargs):
        super().__init__(**kwargs)
        self.factor = float(factor)

    def call(self, x):
        return x * ops.cast(self.factor, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SpecModel(keras.Model):
    """The functional model of a spec. ``loss_hook``, when set, is called with each training
    step's loss tensor inside the compiled step (so it may only record it in variables, never
    read it back); it is not part of the model's config or saved state."""

    loss_hook = None

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        if training and self.loss_hook is not None:
            self.loss_hook(loss)
        return loss


# --------------------------------------------------------------------------- spec -> layers
def _regularizers(l2: float, *names: str) -> dict:
    """``{<name>_regularizer: L2}`` so that the gradient gains ``weight_decay * w``, PyTorch's
    coupled weight decay (Keras' L2(f) adds f * sum(w^2) to the loss: f = weight_decay / 2)."""
    if not l2:
        return {}
    return {f"{n}_regularizer": keras.regularizers.L2(l2 / 2) for n in names}


def _initializers(init: str, kind: str, fan_in: int, weight: str) -> dict:
    """The initializers of a conv (``kind`` "conv") or dense layer's ``weight`` and bias, as
    the spec's ``init`` says (architectures.spec.INITS), so every backend starts from the same
    distribution. "default" is PyTorch's, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and
    biases alike (kaiming_uniform with a=sqrt(5)); Keras' default would be Glorot and zero
    biases. Keras' fan_out of a conv kernel (kh, kw, in, out) is torch's, out * kh * kw."""
    if init == "kaiming_fan_out":
        first = (keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")
                 if kind == "conv" else keras.initializers.RandomNormal(0.0, 0.01))
        return {f"{weight}_initializer": first, "bias_initializer": "zeros"}
    bound = 1.0 / math.sqrt(fan_in)
    return {f"{n}_initializer": keras.initializers.RandomUniform(-bound, bound)
            for n in (weight, "bias")}


def _conv(layer: S.Conv2d, in_channels: int, name: str, dtype, weight_decay: float, init: str):
    """The convolution, and the explicit symmetric padding layer before it (or None)."""
    kernel, stride = S.pair(layer.kernel), S.pair(layer.stride)
    padding, dilation = S.pair(layer.padding), S.pair(layer.dilation)
    same = _same_is_exact(kernel, stride, padding, dilation)
    pad = None
    if not same and padding != (0, 0):
        pad = layers.ZeroPadding2D(((padding[0],) * 2, (padding[1],) * 2), name=f"{name}.pad",
                                   dtype=dtype)
    common = dict(kernel_size=kernel, strides=stride, padding="same" if same else "valid",
                  dilation_rate=dilation, use_bias=layer.bias, name=name, dtype=dtype)
    fan_in = in_channels // layer.groups * kernel[0] * kernel[1]
    if layer.groups > 1 and layer.groups == in_channels == layer.out_channels:
        conv = layers.DepthwiseConv2D(depth_multiplier=1, **common,
                                      **_initializers(init, "conv", fan_in, "depthwise"),
                                      **_regularizers(weight_decay, "depthwise", "bias"))
    else:
        cls = GroupedConv2D if layer.groups > 1 else layers.Conv2D
        conv = cls(layer.out_channels, groups=layer.groups, **common,
                   **_initializers(init, "conv", fan_in, "kernel"),
                   **_regularizers(weight_decay, "kernel", "bias"))
    return pad, conv


def keras_layer(layer: S.Layer, in_shape: S.Shape, name: str, dtype=None,
                weight_decay: float = 0.0, init: str = "default"):
    """The Keras layer for one spec node: a layer, or a (padding, conv) pair for Conv2d;
    ``init``: the spec's (architectures.spec.INITS)."""
    if isinstance(layer, S.Conv2d):
        return _conv(layer, in_shape[0], name, dtype, weight_decay, init)
    if isinstance(layer, S.BatchNorm):
        return layers.BatchNormalization(axis=-1, epsilon=layer.eps, momentum=1.0 - layer.momentum,
                                         name=name, dtype=dtype,
                                         **_regularizers(weight_decay, "gamma", "beta"))
    if isinstance(layer, S.Activation):
        return layers.Activation(layer.kind, name=name, dtype=dtype)
    if isinstance(layer, (S.MaxPool, S.AvgPool)):
        stride = layer.kernel if layer.stride is None else layer.stride
        if isinstance(layer, S.MaxPool):
            return SpecPool2D("max", layer.kernel, stride, layer.padding, layer.ceil_mode,
                              name=name, dtype=dtype)
        return SpecPool2D("avg", layer.kernel, stride, layer.padding, layer.ceil_mode,
                          layer.count_include_pad, name=name, dtype=dtype)
    if isinstance(layer, S.AdaptiveAvgPool):
        return AdaptiveAvgPool2D(layer.output_size, name=name, dtype=dtype)
    if isinstance(layer, S.GlobalAvgPool):
        return layers.GlobalAveragePooling2D(keepdims=True, name=name, dtype=dtype)
    if isinstance(layer, S.Flatten):
        if len(in_shape) == 1:
            return layers.Identity(name=name, dtype=dtype)
        return FlattenCHW(name=name, dtype=dtype)
    if isinstance(layer, S.Dense):
        return layers.Dense(layer.out_features, use_bias=layer.bias, name=name, dtype=dtype,
                            **_initializers(init, "dense", in_shape[0], "kernel"),
                            **_regularizers(weight_decay, "kernel", "bias"))
    if isinstance(layer, S.Dropout):
        return layers.Dropout(layer.p, name=name, dtype=dtype)
    if isinstance(layer, S.Concat):
        return layers.Concatenate(axis=-1, name=name, dtype=dtype)
    if isinstance(layer, S.Add):
        return layers.Add(name=name, dtype=dtype)
    if isinstance(layer, S.Scale):
        return Scale(layer.factor, name=name, dtype=dtype)
    raise TypeError(f"keras backend cannot build {type(layer).__name__}")


def build_model(spec: S.Spec, input_size: int, dtype_policy: str | None = None,
                weight_decay: float = 0.0) -> SpecModel:
    """The spec as a functional model taking (N, input_size, input_size, C) float32 images.

    ``dtype_policy`` (e.g. "mixed_bfloat16") applies to every layer except the logits layers,
    which stay float32 so the softmax and the loss are computed in full precision.
    ``weight_decay`` > 0 adds PyTorch-style coupled L2 decay to every trainable weight."""
    analysis = spec.analyze(input_size)
    outputs = (spec.output, *spec.aux_outputs)
    inputs = keras.Input((input_size, input_size, spec.in_channels), name=S.INPUT)
    values = {S.INPUT: inputs}
    for row in analysis.layers:
        node = row.node
        dtype = "float32" if node.name in outputs else dtype_policy
        built = keras_layer(node.layer, row.in_shape, node.name, dtype, weight_decay, spec.init)
        args = [values[i] for i in node.inputs]
        x = args if isinstance(node.layer, (S.Concat, S.Add)) else args[0]
        if isinstance(built, tuple):
            pad, built = built
            x = x if pad is None else pad(x)
        values[node.name] = built(x)
    return SpecModel(inputs, [values[o] for o in outputs] if spec.aux_outputs
                     else values[spec.output], name=spec.name)


def inference_model(model: keras.Model) -> keras.Model:
    """The logits-only view of a model with auxiliary heads (shared layers and weights); the
    model itself when it has a single output."""
    if len(model.outputs) == 1:
        return model
    return keras.Model(model.inputs[0], model.outputs[0], name=f"{model.name}_inference")
