"""Write a backend's ONNX export as the product's ``model.onnx``: full checker pass, metadata in
``metadata_props``, atomic replacement of any previous file."""
from __future__ import annotations

import json
from pathlib import Path

import onnx

from cnnzoo.core.errors import ExportError
from cnnzoo.core.rundir import atomic_write_bytes

MAX_SINGLE_FILE = 2 * 1024**3  # protobuf's limit for one self-contained .onnx file


def finalize(raw_path: Path, out_path: Path, metadata: dict) -> onnx.ModelProto:
    """Check ``raw_path`` (the backend's export), add ``metadata``, write it to ``out_path``."""
    try:
        onnx.checker.check_model(str(raw_path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"{raw_path.name} fails onnx.checker: {str(err).splitlines()[0]}") from None
    model = onnx.load(str(raw_path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    data = model.SerializeToString()
    if len(data) >= MAX_SINGLE_FILE:
        raise ExportError(f"model is {len(data) / 1024**3:.1f} GiB, over ONNX's 2 GiB single-file "
                          "limit")
    atomic_write_bytes(out_path, data)
    return model


def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, values as stored (JSON text for structures)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
