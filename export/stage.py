"""The export stage: backend's ONNX export -> checked ``model.onnx`` with metadata -> verified in
onnxruntime against the native model on real validation images."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .check import Report, check_onnx
from .onnx_model import finalize, opset_of


def export_and_verify(backend, model, images: np.ndarray, export_cfg, out_path: Path,
                      metadata: dict, threads: int | None = None) -> tuple[dict, Report | None]:
    """Export ``model`` to ``out_path`` and verify it on ``images`` (NCHW, preprocessed).

    Returns the results.json ``export`` block and the verification report (None if disabled)."""
    t0 = time.perf_counter()
    # a dynamic batch axis needs an example batch of at least 2
    example = images[:2] if len(images) >= 2 else np.repeat(images, 2, axis=0)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        backend.export_onnx(model, raw, example, export_cfg.opset)
        onnx_model = finalize(raw, out_path, {**metadata, "layout": backend.onnx_layout})
    block = {"path": out_path.name, "opset": opset_of(onnx_model),
             "size_mb": round(out_path.stat().st_size / 1e6, 3),
             "export_s": round(time.perf_counter() - t0, 3), "passed": None}
    if not export_cfg.verify:
        return block, None
    t1 = time.perf_counter()
    report = check_onnx(out_path, images, lambda x: backend.predict(model, x),
                        export_cfg.batch_sizes, export_cfg.atol, export_cfg.rtol,
                        export_cfg.min_top1_agreement, backend.onnx_layout, threads)
    block.update(report.as_dict())
    block["verify_s"] = round(time.perf_counter() - t1, 3)
    return block, report
