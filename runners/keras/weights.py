"""Canonical (PyTorch-layout, ``cnnzoo.core.weights``) weights <-> a Keras model's variables.

Keras keeps channels-last kernels: Conv2D and grouped Conv2D ``kernel`` (kh, kw, in / groups,
out) = OIHW transposed (2, 3, 1, 0); DepthwiseConv2D ``kernel`` (kh, kw, C, 1) = (C, 1, kh, kw)
transposed (2, 3, 0, 1); Dense ``kernel`` (in, out) = weight.T; batch norm ``gamma``, ``beta``,
``moving_mean``, ``moving_variance``. The spec's Flatten (``FlattenCHW``) already flattens
channels-first, so dense rows need no permutation. Pure numpy, apart from reading the layers.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from cnnzoo.core.weights import (
    BATCHNORM,
    CONV,
    DENSE,
    check_weights,
    expected_shapes,
    float32_contiguous,
    float32_copy,
    key,
    parametrised,
)

from .model import keras

# a spec convolution that became a ``DepthwiseConv2D`` (groups == in == out channels)
DEPTHWISE = "depthwise"

_KERNEL: dict[str, tuple[Callable, Callable]] = {
    # kind -> (canonical -> keras, keras -> canonical)
    CONV: (lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
    DEPTHWISE: (lambda w: w.transpose(2, 3, 0, 1), lambda w: w.transpose(2, 3, 0, 1)),
    DENSE: (lambda w: w.T, lambda w: w.T),
}
_BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
             "running_var": "moving_variance"}


def native_name(kind: str, param: str) -> str:
    """Keras' attribute for canonical parameter ``param`` of a layer of ``kind``."""
    if kind == BATCHNORM:
        return _BN_NAMES.get(param, param)
    return "kernel" if param == "weight" else param


def to_native(kind: str, param: str, value: np.ndarray) -> np.ndarray:
    """A canonical float32 array in Keras' layout (contiguous)."""
    value = np.asarray(value, dtype=np.float32)
    if param == "weight" and kind in _KERNEL:
        value = _KERNEL[kind][0](value)
    return float32_contiguous(value)


def to_canonical(kind: str, param: str, value: np.ndarray) -> np.ndarray:
    """A Keras array as a canonical float32 array (a copy, contiguous)."""
    value = np.asarray(value, dtype=np.float32)
    if param == "weight" and kind in _KERNEL:
        value = _KERNEL[kind][1](value)
    return float32_copy(value)


def parameters(model, spec) -> Iterator[tuple[str, str, str, object]]:
    """(canonical key, kind, param, Keras variable) of every parameter and statistic; a spec
    convolution that became a ``DepthwiseConv2D`` has its own kernel layout."""
    for node, kind, params in parametrised(spec):
        layer = model.get_layer(node.name)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kind = DEPTHWISE
        for p in params:
            yield key(node.name, p), kind, p, getattr(layer, native_name(kind, p))


def get_weights(model, spec) -> dict[str, np.ndarray]:
    return {k: to_canonical(kind, p, np.asarray(v.numpy()))
            for k, kind, p, v in parameters(model, spec)}


def set_weights(model, spec, input_size: int, weights: dict[str, np.ndarray]) -> None:
    """``WeightsError`` naming every problem before anything changes, else every variable set."""
    check_weights(weights, expected_shapes(spec, input_size))
    for k, kind, p, v in parameters(model, spec):
        v.assign(to_native(kind, p, weights[k]))
