"""Canonical (``cnnzoo.core.weights``) <-> Gluon weights.

Gluon's layouts are the canonical ones (PyTorch's): convolution kernels OIHW, dense weights
(out, in), no transposes. Only names differ: a batch norm's ``weight``/``bias`` are Gluon's
``gamma``/``beta``; every other parameter keeps its canonical name."""
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

BN_NAMES = {"weight": "gamma", "bias": "beta"}


def native_name(kind: str, param: str) -> str:
    """Gluon's attribute name for canonical parameter ``param`` of a layer of ``kind``."""
    return BN_NAMES.get(param, param) if kind == BATCHNORM else param


def parameters(model) -> Iterator[tuple[str, object]]:
    """(canonical key, Gluon Parameter) of every parameter and statistic of a ``SpecNet``."""
    for node, kind, params in parametrised(model.spec):
        layer = model.layer(node.name)
        for p in params:
            yield key(node.name, p), getattr(layer, native_name(kind, p))


def get_weights(model) -> dict[str, np.ndarray]:
    return {k: float32_copy(param.list_data()[0].asnumpy()) for k, param in parameters(model)}


def set_weights(mx, model, weights: dict[str, np.ndarray]) -> None:
    """Check ``weights`` against the spec (``WeightsError`` before anything changes), then set
    them in place on every context each parameter lives on (a hybridized graph sees them)."""
    check_weights(weights, expected_shapes(model.spec, model.input_size))
    for k, param in parameters(model):
        param.set_data(mx.nd.array(float32_contiguous(weights[k]), dtype=np.float32))
