"""The export stage: the backend's ONNX export -> checked ``model.onnx`` with metadata, and
optionally Caffe's deploy files from the canonical weights -> each verified in its runtimes
against the native model on real validation images."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .check import Report, summary, verify
from .onnx_model import finalize, opset_of


def export_and_verify(backend, model, images: np.ndarray, export_cfg, out_path: Path,
                      metadata: dict, threads: int | None = None) -> tuple[dict, list[Report]]:
    """Export ``model`` to ``out_path`` and verify it on ``images`` (NCHW, preprocessed) in
    every runtime of ``export_cfg.runtimes`` (default: onnxruntime).

    Returns the results.json ``export`` block and one report per runtime (none if not
    verified)."""
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
    return _verified(block, out_path, list(export_cfg.get("runtimes", ["onnxruntime"])), images,
                     lambda x: backend.predict(model, x), export_cfg, backend.onnx_layout,
                     threads)


def export_caffe(spec, input_size: int, weights: dict[str, np.ndarray], images: np.ndarray,
                 native_predict, export_cfg, folder: Path, metadata: dict,
                 threads: int | None = None) -> tuple[dict, list[Report]]:
    """Caffe's deploy files for ``spec`` at ``input_size`` with canonical ``weights`` in
    ``folder``, verified in OpenCV's DNN module against ``native_predict`` on ``images``."""
    from .caffe import files
    from .caffe.writer import build_net

    t0 = time.perf_counter()
    net, layers = build_net(spec, weights, input_size)
    sidecar = {**metadata, "layout": "NCHW", "input": "data", "output": spec.output}
    paths = files.write(folder, net, layers, sidecar, metadata.get("backend", "cnnzoo"))
    block = {"prototxt": paths["prototxt"].name, "caffemodel": paths["caffemodel"].name,
             "sidecar": paths["sidecar"].name,
             "size_mb": round(paths["caffemodel"].stat().st_size / 1e6, 3),
             "export_s": round(time.perf_counter() - t0, 3), "passed": None}
    return _verified(block, paths["prototxt"], ["opencv"], images, native_predict, export_cfg,
                     "NCHW", threads)


def _verified(block: dict, path: Path, runtimes: list[str], images: np.ndarray, native_predict,
              export_cfg, layout: str, threads: int | None) -> tuple[dict, list[Report]]:
    """``block`` with the verification of ``path`` in ``runtimes`` (unless export_cfg.verify is
    off), and the reports."""
    if not export_cfg.verify:
        return block, []
    t0 = time.perf_counter()
    reports = verify(path, runtimes, images, native_predict, export_cfg, layout, threads)
    block.update(summary(reports))
    block["verify_s"] = round(time.perf_counter() - t0, 3)
    return block, reports
