"""ONNX export of the float32 logits-only model through tf2onnx: input "input" (N, H, W, C)
with a dynamic N, output "logits".

- Keras' ``model.export(format="onnx")`` hands tf2onnx a graph with every weight frozen into
  it, and tf2onnx copies that graph many times while converting it: VGG-16 runs out of 23 GB,
  Inception-ResNet-v2 peaks at 11 GB. So weights with at least ``backend.onnx_lift_min_size``
  elements (default 1: all) are fed to the converter as graph inputs (``stateless_call``) and
  attached afterwards as initializers (peak 2 GB, and faster). The graph then computes batch
  norm from its parameters instead of folding it into the convolution weights; onnxruntime
  folds it when it loads the model. ``onnx_lift_min_size: null`` (or no weight that large) is
  exactly ``model.export``.
- tf2onnx 1.17 writes opsets up to 18; a higher ``opset`` is reached with
  ``onnx.version_converter`` (on the graph without the lifted weights).
- tf2onnx's optimizer passes run on the graph in place (``_passes_in_place``); only a
  conversion that fails then is repeated with tf2onnx's default, a copy of the graph per pass.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np

from export.graph import inputs_to_initializers, rename

from .model import tf


def export_onnx(view, path: Path, opset: int, lift_min: int | None) -> None:
    """Write ``view`` (a float32 logits-only Keras model) as ONNX at ``path``."""
    import onnx
    import tf2onnx
    from onnx import version_converter

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # its INFO lines are noise here
    first = min(opset, max(tf2onnx.constants.OPSET_TO_IR_VERSION))
    lifted = [] if lift_min is None else [
        v for v in view.variables if v.dtype == "float32" and math.prod(v.shape) >= lift_min]
    signature = [tf.TensorSpec((None, *view.input_shape[1:]), tf.float32, name="input")]

    def convert():
        if lifted:
            return _convert_with_lifted_weights(view, signature, lifted, first)
        view.export(str(path), format="onnx", verbose=False,
                    input_signature=signature, opset_version=first)
        return onnx.load(str(path)), {}

    with warnings.catch_warnings(), tf.device("/cpu:0"):
        warnings.simplefilter("ignore")  # Keras' numpy-2 shim for tf2onnx warns on numpy 1
        onnx_model, weights = _passes_in_place(convert)
    if opset > first:
        onnx_model = version_converter.convert_version(onnx_model, opset)
    if weights:
        inputs_to_initializers(onnx_model.graph, weights)
    rename(onnx_model.graph, {onnx_model.graph.output[0].name: "logits"})
    onnx.save(onnx_model, str(path))


def _convert_with_lifted_weights(view, signature, lifted, opset: int):
    """tf2onnx on ``view`` with the ``lifted`` variables as extra graph inputs; returns the ONNX
    model and those inputs' values by name."""
    import tf2onnx

    trainable, other = list(view.trainable_variables), list(view.non_trainable_variables)
    lifted_at = {id(v): i for i, v in enumerate(lifted)}
    specs = [tf.TensorSpec(v.shape, tf.float32, name=f"lifted_{i}") for i, v in enumerate(lifted)]

    def forward(x, *weights):
        def values(variables):
            return [weights[lifted_at[id(v)]] if id(v) in lifted_at else v.value
                    for v in variables]
        logits, _ = view.stateless_call(values(trainable), values(other), x, training=False)
        return logits

    fn = tf.function(forward, input_signature=signature + specs)
    onnx_model, _ = tf2onnx.convert.from_function(fn, signature + specs, opset=opset)
    return onnx_model, {spec.name: np.asarray(v.numpy()) for v, spec in zip(lifted, specs)}


def _passes_in_place(convert):
    """``convert()`` with tf2onnx's optimizer passes working on the graph in place
    (``TF2ONNX_CATCH_ERRORS`` set: any value means off). By default tf2onnx deep-copies the whole
    graph before each of its passes (about 40) so that a pass that raises can be skipped: for
    Inception-ResNet-v2, 11 of the 19 s of the passes. In place they give the same model; a
    conversion that fails is repeated with the default (a failing pass skipped, as before).
    A value the user set is left alone."""
    import tf2onnx

    key = tf2onnx.constants.ENV_TF2ONNX_CATCH_ERRORS
    if key in os.environ:
        return convert()
    os.environ[key] = "false"
    try:
        return convert()
    except Exception:  # noqa: BLE001  once more below, exactly as tf2onnx does by default
        pass
    finally:
        os.environ.pop(key, None)
    return convert()
