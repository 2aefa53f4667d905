"""Translate a Spec into a Flax linen module, channels-last (NHWC), one submodule per spec node.

Why linen and not NNX: a linen module is a pure description; its state lives outside it, in
plain pytrees (``{"params": ..., "batch_stats": ...}``). The training step is then one pure
jitted function of explicit parameters, batch statistics, optimizer state and batch, so a
checkpoint is exactly those arrays and a resume feeds the same arrays to the same function
(bitwise the same run). NNX keeps state inside mutable objects and needs ``nnx.split``/
``nnx.merge`` around every jitted call to get the same purity, for nothing this backend uses.

Every spec node is a submodule whose scope is the node's name (``scope_name``), so the
parameter tree reads like the spec (``params["inception3a.branch2.1.conv"]["kernel"]``). The
layers reproduce the spec's PyTorch conventions exactly:

- convolutions pad symmetrically and explicitly (never XLA's "SAME", which pads more on the
  right when the total is odd); grouped and depthwise convolutions are ``feature_group_count``;
- max pools pad with -inf, ceil-mode windows hang over the right edge as in PyTorch, average
  pools divide by PyTorch's divisor (``count_include_pad`` True or False, windows clipped at the
  padded edge); adaptive pooling uses PyTorch's bins;
- flatten is channels-first (c, h, w), so dense weights line up with the other backends';
- batch norm is PyTorch's: the running variance is updated with the unbiased batch variance
  and ``momentum`` weighs the new statistic (``BatchNorm``, not ``flax.linen.BatchNorm``);
- initial weights follow ``Spec.init`` (PyTorch's default, or torchvision's VGG scheme),
  drawn by ``build_model``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from architectures import spec as S
from architectures.geometry import adaptive_bins, avg_divisors, axis_padding

PARAMS, BATCH_STATS = "params", "batch_stats"


def scope_name(node_name: str) -> str:
    """The node's scope in the variable trees. Linen refuses a top-level scope named "params"
    inside the "params" collection (it takes it for a mistake), so that name gains a leading
    underscore, and so does every name that already starts with one (the mapping stays
    one-to-one: any spec name is allowed)."""
    return f"_{node_name}" if node_name == PARAMS or node_name.startswith("_") else node_name


# --------------------------------------------------------------------------- initial weights
CONV, DENSE, BATCHNORM = "conv", "dense", "batchnorm"


def initial_values(init: str, kind: str, shapes: dict[str, tuple[int, ...]],
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The first values of one layer's variables (native names and shapes: conv ``kernel``
    (kh, kw, in / groups, out), dense ``kernel`` (in, out), ``bias``; batch norm ``scale``,
    ``bias``, ``mean``, ``var``), as ``Spec.init`` says (architectures.spec.INITS).

    "default" is PyTorch's: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases alike
    (Flax's own would be LeCun-normal kernels and zero biases). "kaiming_fan_out" is
    torchvision's VGG: conv kernels N(0, 2/fan_out) with fan_out = out * kh * kw (as torch
    counts it, whatever the groups), dense kernels N(0, 0.01^2), zero biases. Batch norm
    starts at scale 1, shift 0, mean 0, variance 1.

    Drawn with numpy: jax.random compiles one XLA program per distinct shape (20 s for
    Inception-v1's on 2 cores), where numpy draws VGG-16's 138M weights in about a second."""
    if kind == BATCHNORM:
        return {p: np.full(shape, 1.0 if p in ("scale", "var") else 0.0, np.float32)
                for p, shape in shapes.items()}
    kernel = shapes["kernel"]
    if init == "kaiming_fan_out":
        std = math.sqrt(2.0 / (kernel[-1] * math.prod(kernel[:-2]))) if kind == CONV else 0.01
        values = {"kernel": std * rng.standard_normal(kernel, np.float32)}
        return values | {"bias": np.zeros(shapes["bias"], np.float32)} if "bias" in shapes \
            else values
    bound = 1.0 / math.sqrt(math.prod(kernel[:-1]))  # fan_in: all but the output axis
    top = np.float32(bound) if np.float32(bound) <= bound else np.nextafter(np.float32(bound),
                                                                             np.float32(0))
    return {p: np.clip(rng.uniform(-bound, bound, shape).astype(np.float32), -top, top)
            for p, shape in shapes.items()}


# --------------------------------------------------------------------------- pooling
def pool(x, layer: S.MaxPool | S.AvgPool):
    """Max or average pooling of an NHWC batch with PyTorch's semantics."""
    _, h, w, _ = x.shape
    (kh, kw), (ph, pw) = S.pair(layer.kernel), S.pair(layer.padding)
    sh, sw = S.pair(layer.kernel if layer.stride is None else layer.stride)
    pad_h, oh = axis_padding(h, kh, sh, ph, ceil_mode=layer.ceil_mode)
    pad_w, ow = axis_padding(w, kw, sw, pw, ceil_mode=layer.ceil_mode)
    window, strides, pads = (1, kh, kw, 1), (1, sh, sw, 1), ((0, 0), pad_h, pad_w, (0, 0))
    if isinstance(layer, S.MaxPool):  # the padding takes the init value: -inf never wins
        return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)
    total = lax.reduce_window(x, 0.0, lax.add, window, strides, pads)
    divisor = np.outer(avg_divisors(h, kh, sh, ph, oh, layer.count_include_pad),
                       avg_divisors(w, kw, sw, pw, ow, layer.count_include_pad))
    if np.all(divisor == divisor.flat[0]):  # one divisor everywhere: a scalar
        return total / jnp.asarray(divisor.flat[0], total.dtype)
    return total / jnp.asarray(divisor[None, :, :, None], total.dtype)


def adaptive_avg_pool(x, output_size):
    """PyTorch's ``AdaptiveAvgPool2d`` on NHWC: identity when the sizes match, a plain average
    pool when the input is a multiple of the output, else two averaging matrices."""
    _, h, w, _ = x.shape
    oh, ow = S.pair(output_size)
    if (h, w) == (oh, ow):
        return x
    if h % oh == 0 and w % ow == 0:
        k = (1, h // oh, w // ow, 1)
        return lax.reduce_window(x, 0.0, lax.add, k, k, "VALID") / ((h // oh) * (w // ow))
    rows = jnp.asarray(adaptive_bins(h, oh), x.dtype)
    cols = jnp.asarray(adaptive_bins(w, ow), x.dtype)
    return jnp.einsum("jw,niwc->nijc", cols, jnp.einsum("ih,nhwc->niwc", rows, x))


def flatten_chw(x):
    """(N, H, W, C) -> (N, C*H*W) in the spec's channels-first order."""
    if x.ndim == 4 and x.shape[1] * x.shape[2] > 1:  # 1x1 maps: both orders coincide
        x = jnp.transpose(x, (0, 3, 1, 2))
    return x.reshape(x.shape[0], -1)


# --------------------------------------------------------------------------- modules
class BatchNorm(nn.Module):
    """PyTorch's batch norm over the last axis: in training, normalised with the biased batch
    variance while the running variance takes the unbiased one; ``momentum`` weighs the new
    statistic. The statistics are computed in float32 whatever the compute dtype."""
    eps: float
    momentum: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable(BATCH_STATS, "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable(BATCH_STATS, "var", lambda: jnp.ones((c,), jnp.float32))
        x32 = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axes)
            var = jnp.mean(jnp.square(x32 - mean), axes)
            n = x.size // c
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (x32 - mean) * (lax.rsqrt(var + self.eps) * scale) + bias
        return y.astype(self.dtype)


_ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh, "sigmoid": nn.sigmoid}


class SpecNet(nn.Module):
    """The spec's graph. ``__call__(x, train)`` takes an NHWC batch; in training a spec with
    auxiliary classifiers returns ``(logits, *aux_logits)``, in inference the logits alone
    (its auxiliary heads are skipped). ``dtype`` is the compute dtype (bfloat16 for
    bf16-mixed): parameters stay float32 and so do the logits, for the loss and the softmax."""
    spec: S.Spec
    input_size: int
    dtype: Any = jnp.float32
    frozen: frozenset = frozenset()  # nodes whose batch norms keep their statistics in training

    @nn.compact
    def __call__(self, x, train: bool = False):
        spec = self.spec
        outputs = (spec.output, *spec.aux_outputs) if train else (spec.output,)
        values = {S.INPUT: x.astype(self.dtype)}
        for node in needed_nodes(spec, outputs):
            dtype = jnp.float32 if node.name in outputs else self.dtype
            values[node.name] = self.node(node, [values[i] for i in node.inputs], train, dtype)
            # kept only when "intermediates" is mutable (node_outputs, the layer report); the
            # prefix keeps the name apart from the node's own submodule scope
            self.sow("intermediates", "output:" + node.name, values[node.name])
        logits = tuple(values[o].astype(jnp.float32) for o in outputs)
        return logits if len(logits) > 1 else logits[0]

    def node(self, node: S.Node, args: list, train: bool, dtype):
        layer, name, x = node.layer, scope_name(node.name), args[0]
        if isinstance(layer, S.Conv2d):  # weights: build_model, not Flax's initializers
            return nn.Conv(layer.out_channels, S.pair(layer.kernel), S.pair(layer.stride),
                           [(p, p) for p in S.pair(layer.padding)],
                           kernel_dilation=S.pair(layer.dilation),
                           feature_group_count=layer.groups, use_bias=layer.bias, dtype=dtype,
                           name=name)(x)
        if isinstance(layer, S.Dense):
            return nn.Dense(layer.out_features, use_bias=layer.bias, dtype=dtype, name=name)(x)
        if isinstance(layer, S.BatchNorm):
            return BatchNorm(layer.eps, layer.momentum, dtype, name=name)(
                x, train and node.name not in self.frozen)
        if isinstance(layer, S.Dropout):
            return nn.Dropout(layer.p, deterministic=not train, name=name)(x)
        if isinstance(layer, S.Activation):
            return _ACTIVATIONS[layer.kind](x)
        if isinstance(layer, (S.MaxPool, S.AvgPool)):
            return pool(x, layer)
        if isinstance(layer, S.AdaptiveAvgPool):
            return adaptive_avg_pool(x, layer.output_size)
        if isinstance(layer, S.GlobalAvgPool):
            return jnp.mean(x, axis=(1, 2), keepdims=True)
        if isinstance(layer, S.Flatten):
            return flatten_chw(x)
        if isinstance(layer, S.Concat):
            return jnp.concatenate(args, axis=-1)
        if isinstance(layer, S.Add):
            return sum(args[1:], args[0])
        if isinstance(layer, S.Scale):
            return x * jnp.asarray(layer.factor, x.dtype)
        raise TypeError(f"flax backend cannot build {type(layer).__name__}")


def needed_nodes(spec: S.Spec, outputs: tuple[str, ...]) -> list[S.Node]:
    """The nodes ``outputs`` depend on, in the spec's order."""
    needed = set(outputs)
    for node in reversed(spec.nodes):
        if node.name in needed:
            needed.update(node.inputs)
    return [n for n in spec.nodes if n.name in needed]


# --------------------------------------------------------------------------- the model
@dataclass
class FlaxModel:
    """What ``FlaxBackend.build`` returns: the module and its state, which training and
    ``set_weights`` replace (``variables``: {"params": ..., "batch_stats": ...}, float32
    arrays, on the host or a device)."""
    spec: S.Spec
    input_size: int
    module: SpecNet
    variables: dict
    _jitted: dict = field(default_factory=dict, repr=False)

    def param_count(self) -> int:
        return sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(
            self.variables[PARAMS]))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Float32 logits of an NCHW float32 batch, in inference mode (dropout off, batch norm
        with its running statistics); compiled once per batch shape."""
        if "predict" not in self._jitted:
            module = self.module

            def logits(variables, x):
                return module.apply(variables, jnp.transpose(x, (0, 2, 3, 1)), train=False)
            self._jitted["predict"] = jax.jit(logits)
        out = self._jitted["predict"](self.variables, np.asarray(images, np.float32))
        return np.asarray(out, np.float32)

    def node_outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every node's output in inference mode, channels first (the layer report)."""
        _, state = self.module.apply(self.variables, np.transpose(images, (0, 2, 3, 1)),
                                     train=False, mutable=["intermediates"])
        return {name.removeprefix("output:"): np.asarray(
                    np.transpose(v[0], (0, 3, 1, 2)) if v[0].ndim == 4 else v[0], np.float32)
                for name, v in state["intermediates"].items()}


def build_model(spec: S.Spec, input_size: int, seed: int, dtype=jnp.float32) -> FlaxModel:
    """The spec as a ``FlaxModel`` whose weights are drawn from ``seed`` as ``Spec.init`` says.

    Linen's ``init`` is only traced (``jax.eval_shape``: the variables' names and shapes, in
    training mode so the auxiliary heads have theirs too); nothing is compiled or computed
    there. The values are drawn node by node in the spec's order (``initial_values``)."""
    spec.check_input_size(input_size)
    module = SpecNet(spec, input_size, dtype)
    batch = jax.ShapeDtypeStruct((1, input_size, input_size, spec.in_channels), jnp.float32)
    rngs = {PARAMS: jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)}
    shapes = jax.eval_shape(lambda x: module.init(rngs, x, train=True), batch)
    rng = np.random.default_rng(seed)
    variables = {PARAMS: {}, BATCH_STATS: {}}
    for node in spec.nodes:
        scope = scope_name(node.name)
        kind = _KIND.get(type(node.layer))
        if kind is None:
            continue
        native = {collection: dict(shapes.get(collection, {}).get(scope, {}))
                  for collection in variables}
        values = initial_values(spec.init, kind, {p: v.shape for c in native.values()
                                                  for p, v in c.items()}, rng)
        for collection, names in native.items():
            if names:
                variables[collection][scope] = {p: values[p] for p in names}
    return FlaxModel(spec, input_size, module, variables)


_KIND = {S.Conv2d: CONV, S.Dense: DENSE, S.BatchNorm: BATCHNORM}
