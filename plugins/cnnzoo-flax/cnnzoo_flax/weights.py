"""Canonical weights (``cnnzoo.core.weights``: PyTorch's names and layouts) <-> a FlaxModel's
variable trees.

Flax keeps channels-last kernels: a convolution's ``kernel`` is (kh, kw, in / groups, out),
the canonical OIHW (out, in / groups, kh, kw) transposed (2, 3, 1, 0). Grouped and depthwise
convolutions need nothing more: ``feature_group_count`` takes contiguous groups of input and
output channels as PyTorch does, and a depthwise kernel (C, 1, kh, kw) becomes (kh, kw, 1, C)
by the same transpose. A dense ``kernel`` is (in, out) = weight.T; the spec's flatten is
channels-first in this backend too (``model.flatten_chw``), so its rows need no permutation.
Batch norm: ``params`` ``scale`` and ``bias``, ``batch_stats`` ``mean`` and ``var``.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from cnnzoo.core.weights import (
    BATCHNORM,
    check_weights,
    expected_shapes,
    float32_contiguous,
    float32_copy,
    key,
    parametrised,
)

from .model import BATCH_STATS, PARAMS, FlaxModel, scope_name

# canonical parameter -> (collection, native name), per kind of layer
_NATIVE = {"weight": (PARAMS, "kernel"), "bias": (PARAMS, "bias")}
_BN_NATIVE = {"weight": (PARAMS, "scale"), "bias": (PARAMS, "bias"),
              "running_mean": (BATCH_STATS, "mean"), "running_var": (BATCH_STATS, "var")}


def to_native(kind: str, param: str, value: np.ndarray) -> np.ndarray:
    """A canonical array in Flax's layout (float32, contiguous)."""
    value = np.asarray(value, dtype=np.float32)
    if param == "weight" and kind != BATCHNORM:
        value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
    return float32_contiguous(value)


def to_canonical(kind: str, param: str, value) -> np.ndarray:
    """A Flax array as a canonical one (float32, contiguous, a copy)."""
    value = np.asarray(value, dtype=np.float32)
    if param == "weight" and kind != BATCHNORM:
        value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
    return float32_copy(value)


def variables_of(model: FlaxModel) -> Iterator[tuple[str, str, str, str, str, str]]:
    """(canonical key, kind, canonical param, collection, scope, native name) of every
    parameter and batch-norm statistic, in the spec's order."""
    for node, kind, params in parametrised(model.spec):
        names = _BN_NATIVE if kind == BATCHNORM else _NATIVE
        for p in params:
            collection, native = names[p]
            yield key(node.name, p), kind, p, collection, scope_name(node.name), native


def get_weights(model: FlaxModel) -> dict[str, np.ndarray]:
    out = {}
    for k, kind, p, collection, scope, native in variables_of(model):
        out[k] = to_canonical(kind, p, model.variables[collection][scope][native])
    return out


def set_weights(model: FlaxModel, weights: dict[str, np.ndarray]) -> None:
    """``WeightsError`` naming every problem before anything changes; else new variable trees
    (host arrays; training places them on its devices) replace the model's."""
    check_weights(weights, expected_shapes(model.spec, model.input_size))
    variables = {PARAMS: {}, BATCH_STATS: {}}
    for k, kind, p, collection, scope, native in variables_of(model):
        variables[collection].setdefault(scope, {})[native] = to_native(kind, p, weights[k])
    model.variables = variables
