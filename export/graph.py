"""Edits of an ONNX graph that more than one exporter needs (pure onnx; no framework)."""
from __future__ import annotations

import numpy as np


def rename(graph, names: dict[str, str]) -> None:
    """Rename values of an ONNX graph: inputs, outputs, value infos and every node's references."""
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]


def inputs_to_initializers(graph, weights: dict[str, np.ndarray]) -> None:
    """Give the graph ``weights`` as initializers (raw data) and drop every graph input that an
    initializer now provides: converters are faster and far lighter when weights enter them as
    graph inputs, and a deployed model's only input is its images."""
    from onnx import numpy_helper

    graph.initializer.extend(numpy_helper.from_array(w, name) for name, w in weights.items())
    provided = {t.name for t in graph.initializer}
    kept = [i for i in graph.input if i.name not in provided]
    del graph.input[:]
    graph.input.extend(kept)
