"""Compare an ONNX model in onnxruntime with the native model on the same real images.

The rule is numpy's allclose, elementwise: |onnx - native| <= atol + rtol * |native|; top-1 classes
must also agree on at least ``min_top1_agreement`` of the images, and no output may be NaN/Inf."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cnnzoo.core.data.preprocess import to_layout


@dataclass
class Comparison:
    batch_size: int
    images: int
    max_abs_diff: float
    max_rel_diff: float
    mean_abs_diff: float
    top1_agreement: float
    non_finite: bool
    within_tolerance: bool


@dataclass
class Report:
    atol: float
    rtol: float
    min_top1_agreement: float
    providers: list[str]
    batches: list[Comparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.batches) and all(
            b.within_tolerance and not b.non_finite and b.top1_agreement >= self.min_top1_agreement
            for b in self.batches)

    def worst(self, key: str) -> float:
        values = [getattr(b, key) for b in self.batches]
        return min(values) if key == "top1_agreement" else max(values)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "atol": self.atol, "rtol": self.rtol,
                "min_top1_agreement": self.min_top1_agreement,
                **{k: self.worst(k) for k in ("max_abs_diff", "max_rel_diff", "mean_abs_diff",
                                              "top1_agreement")},
                "providers": self.providers, "batches": [asdict(b) for b in self.batches]}

    def lines(self) -> list[str]:
        """A short human report, one line per batch size and a verdict."""
        out = []
        for b in self.batches:
            out.append(f"  batch {b.batch_size:>3} x{b.images:>4} images: max abs {b.max_abs_diff:.2e}"
                       f"  max rel {b.max_rel_diff:.2e}  mean abs {b.mean_abs_diff:.2e}"
                       f"  top-1 agree {b.top1_agreement:.3f}"
                       + ("  NaN/Inf!" if b.non_finite else "")
                       + ("" if b.within_tolerance else "  OUT OF TOLERANCE"))
        verdict = "PASSED" if self.passed else "FAILED"
        out.append(f"  {verdict} (atol {self.atol:g}, rtol {self.rtol:g}, "
                   f"top-1 agreement >= {self.min_top1_agreement:g})")
        return out


def compare(onnx_out: np.ndarray, native: np.ndarray, batch_size: int, atol: float,
            rtol: float) -> Comparison:
    diff = np.abs(onnx_out.astype(np.float64) - native.astype(np.float64))
    scale = np.abs(native.astype(np.float64))
    non_finite = not (np.isfinite(onnx_out).all() and np.isfinite(native).all())
    return Comparison(
        batch_size=batch_size, images=len(native),
        max_abs_diff=float(diff.max()), max_rel_diff=float((diff / np.maximum(scale, 1e-12)).max()),
        mean_abs_diff=float(diff.mean()),
        top1_agreement=float((onnx_out.argmax(1) == native.argmax(1)).mean()),
        non_finite=non_finite, within_tolerance=bool((diff <= atol + rtol * scale).all()))


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), opts, providers=providers)


def check_onnx(path: Path, images: np.ndarray, native_predict: Callable[[np.ndarray], np.ndarray],
           batch_sizes, atol: float, rtol: float, min_top1_agreement: float,
           layout: str = "NCHW", threads: int | None = None) -> Report:
    """Run NCHW ``images`` through ``native_predict`` and (in ``layout``) through the ONNX file,
    at every batch size."""
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    report = Report(atol, rtol, min_top1_agreement, sess.get_providers())
    for bs in batch_sizes:
        outs, natives = [], []
        for start in range(0, len(images), bs):
            x = images[start:start + bs]
            outs.append(sess.run(None, {name: to_layout(x, layout)})[0])
            natives.append(native_predict(x))
        report.batches.append(compare(np.concatenate(outs), np.concatenate(natives), bs, atol, rtol))
    return report
