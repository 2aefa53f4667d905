"""Canonical weights (``cnnzoo.core.weights``) <-> the ``SpecModule``'s tensors.

The canonical layout is PyTorch's own: every parameter and batch-norm statistic keeps its name
(``weight``, ``bias``, ``running_mean``, ``running_var``) and its layout (OIHW kernels, (out, in)
dense weights), so the conversion is a float32 copy each way."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from cnnzoo.core.weights import (
    check_weights,
    expected_shapes,
    float32_contiguous,
    float32_copy,
    key,
    parametrised,
)


def parameters(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical key, tensor) of every parameter and batch-norm statistic of a SpecModule."""
    for node, _kind, params in parametrised(model.spec):
        module = model.layers[model.key(node.name)]
        for p in params:  # torch's attribute names are the canonical ones
            yield key(node.name, p), getattr(module, p)


def get_weights(model) -> dict[str, np.ndarray]:
    return {k: float32_copy(t.detach().cpu().numpy()) for k, t in parameters(model)}


def set_weights(model, weights: dict[str, np.ndarray]) -> None:
    check_weights(weights, expected_shapes(model.spec, model.input_size))
    with torch.no_grad():  # copy_ keeps each tensor's device and memory format
        for k, t in parameters(model):
            t.copy_(torch.from_numpy(float32_contiguous(weights[k])))
