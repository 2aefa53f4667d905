"""Export to ONNX (``stage``, ``onnx_model``) and Caffe (``caffe``), int8 quantization
(``quantize``), and verification in inference runtimes (``check``, ``runtimes``).

Importing this package loads nothing heavy: onnx and the runtimes load when one of the names
below is first used, so tasks that never export (summary) stay light."""
from cnnzoo.core.errors import ExportError

_LAZY = {"export_and_verify": "stage", "export_caffe": "stage", "read_metadata": "onnx_model"}
__all__ = ["ExportError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
