"""Errors of the export stage, importable without loading onnx."""


class ExportError(RuntimeError):
    """The exported model is invalid or could not be written."""
