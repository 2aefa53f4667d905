"""ONNX export of a SpecModule with torch's dynamo exporter."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch


def export_onnx(model, path: Path, example: np.ndarray, opset: int) -> None:
    """Write ``model`` (moved to the CPU in float32, eval mode) as ONNX: input "input" with a
    dynamic batch, output "logits"."""
    model = model.cpu().float().eval()
    batch = torch.export.Dim("batch")  # traced at batch 2, valid for any batch
    # the exporter's progress lines and "torchvision is not installed" notes are noise here
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(example),), str(path), dynamo=True,
                          external_data=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_shapes=({0: batch},),
                          verbose=False)
