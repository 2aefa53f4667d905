"""ONNX export: ``HybridBlock.export`` of the inference graph, converted by
``mx.onnx.export_model``.

The exporter writes every weight as a Python list (``tolist()``: ~25 s and gigabytes of memory
for AlexNet), so the graph is converted with the weights as inputs and they are attached
afterwards as raw initializers (not graph inputs). Its translations target opset 13, so the
graph is declared 13 and ``onnx.version_converter`` brings it to the requested opset."""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np

from export.graph import inputs_to_initializers, rename

EXPORTER_OPSET = 13  # the newest opset mx.onnx.export_model has translations for


def export_onnx(mx, model, path: Path, example: np.ndarray, opset: int) -> None:
    """Write ``model`` (a ``SpecNet``) as ONNX: input "input" (dynamic batch), output "logits"."""
    import onnx

    graph = model.inference_graph
    hybridized = getattr(graph, "_active", False)
    if not hybridized:  # export needs the traced graph
        graph.hybridize()
    try:
        model.logits(mx.nd.array(example, ctx=mx.cpu(), dtype=np.float32))
        with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".mxnet-") as tmp:
            prefix = str(Path(tmp) / "model")
            graph.export(prefix)
            sym = mx.sym.load(f"{prefix}-symbol.json")
            saved = mx.nd.load(f"{prefix}-0000.params")  # a list when it is empty
            weights = {k.split(":", 1)[1]: v.asnumpy() for k, v in dict(saved).items()}
            raw = Path(tmp) / "graph.onnx"
            with _quiet_root_logger():  # the exporter logs INFO lines to the root logger
                _export_graph(mx, sym, weights, example.shape[1:], raw)
            out_shape = model.spec.analyze(model.input_size)[model.spec.output].out_shape
            finished = _finish(onnx.load(str(raw)), weights, opset, out_shape)
        onnx.save(finished, str(path))
    finally:
        if not hybridized:
            graph.hybridize(False)


def _export_graph(mx, sym, weights: dict, chw, out: Path) -> None:
    """``mx.onnx.export_model`` with a dynamic batch and the weights as (static) graph inputs."""
    names = sym.list_inputs()
    data = [n for n in names if n not in weights]
    if len(data) != 1:
        raise RuntimeError(f"expected one data input, the exported graph has {data}")
    shapes = [(2, *chw) if n in data else weights[n].shape for n in names]
    dynamic = [("N", *chw) if n in data else weights[n].shape for n in names]
    mx.onnx.export_model(sym, {}, in_shapes=shapes, in_types=[np.float32] * len(names),
                         onnx_file_path=str(out), dynamic=True, dynamic_input_shapes=dynamic)


def _finish(model, weights: dict, opset: int, out_shape: tuple[int, ...]):
    """Declare the exporter's opset and convert to ``opset``; name the input "input" and the
    output "logits" (shape ``N x out_shape``); make every weight an initializer that is not a
    graph input."""
    from onnx import helper, version_converter

    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", EXPORTER_OPSET))
    if opset != EXPORTER_OPSET:  # on the weight-free graph: fast
        model = version_converter.convert_version(model, opset)
    g = model.graph
    data = next(i.name for i in g.input if i.name not in weights)
    rename(g, {data: "input", g.output[0].name: "logits"})
    inputs_to_initializers(g, weights)
    out_dims = g.output[0].type.tensor_type.shape.dim
    out_dims[0].dim_param = "N"
    for dim, size in zip(out_dims[1:], out_shape):
        dim.dim_value = size
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    return model


@contextlib.contextmanager
def _quiet_root_logger():
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
