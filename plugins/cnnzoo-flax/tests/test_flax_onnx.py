"""ONNX export (the jaxpr of the inference function, translated): onnxruntime reproduces
``predict`` for every layer type at several batch sizes from one file, and a primitive without
a translation is named in the error."""
import pytest

# cnnzoo's own `pytest` collects these too; without JAX there is nothing to test
pytest.importorskip("jax", reason="the flax plugin's framework is not installed")
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
from cnnzoo_flax import model as flax_model
from cnnzoo_flax.model import BATCH_STATS, build_model
from cnnzoo_flax.onnx import export_onnx, to_onnx
from flax_helpers import images

import architectures
from cnnzoo.conformance import toy_spec
from cnnzoo.core.errors import ExportError


def with_statistics(model, seed=0):
    """Batch-norm running statistics other than 0 and 1, so that they must be exported."""
    rng = np.random.default_rng(seed)
    for stats in model.variables[BATCH_STATS].values():
        stats["mean"] = (0.1 * rng.standard_normal(stats["mean"].shape)).astype(np.float32)
        stats["var"] = (0.5 + rng.random(stats["var"].shape)).astype(np.float32)
    return model


@pytest.mark.parametrize("name, size", [
    ("toy", 17),             # grouped, depthwise, padded max pool, avg pool without the padding
    ("lenet5", 32),          # tanh
    ("alexnet", 63),         # adaptive pooling from 1x1 up to 6x6 (einsum)
    ("inception_v1", 15),    # ceil-mode max pools
    ("inception_v3", 75),    # avg pools counting the padding
])
def test_onnxruntime_reproduces_predict_at_any_batch(tmp_path, name, size):
    spec = toy_spec() if name == "toy" else architectures.build_spec(name, num_classes=7)
    model = with_statistics(build_model(spec, size, seed=0))
    path = tmp_path / "m.onnx"
    export_onnx(model, path, images(2, spec.in_channels, size), 18)
    proto = onnx.load(str(path))
    # runtimes older than this onnx package load it (onnxruntime 1.30 refuses IR 14)
    assert proto.ir_version == 8 < onnx.IR_VERSION
    graph = proto.graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == [
        "logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = images(n, spec.in_channels, size, seed=n)
        want = model.predict(x)
        got = session.run(None, {"input": x})[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), name


def test_a_primitive_without_translation_is_named(tmp_path, monkeypatch):
    model = build_model(architectures.build_spec("lenet5", 4, 1), 32, seed=0)
    monkeypatch.setitem(flax_model._ACTIVATIONS, "tanh", jnp.sin)  # sin: no translation
    with pytest.raises(ExportError, match="JAX primitive 'sin' has no translation"):
        to_onnx(model, 18)
