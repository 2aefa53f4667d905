"""Compare an exported model, run in an inference runtime, with the native model on the same real
images.

The rule is numpy's allclose, elementwise: |exported - native| <= atol + rtol * |native|; top-1
classes must also agree on at least ``min_top1_agreement`` of the images, and no output may be
NaN/Inf. A runtime that cannot load or run the model fails, with its error in the report."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cnnzoo.core.errors import ExportError

from . import runtimes

DIFFS = ("max_abs_diff", "max_rel_diff", "mean_abs_diff", "top1_agreement")


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
    """One exported model in one runtime, at every verification batch size."""

    atol: float
    rtol: float
    min_top1_agreement: float
    runtime: str  # its name in export.runtimes (onnxruntime, opencv, openvino)
    version: str = ""  # the runtime's version and device
    batches: list[Comparison] = field(default_factory=list)
    error: str | None = None  # why the runtime could not load or run the model

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.batches) and all(
            b.within_tolerance and not b.non_finite and b.top1_agreement >= self.min_top1_agreement
            for b in self.batches)

    def worst(self, key: str) -> float | None:
        values = [getattr(b, key) for b in self.batches]
        return None if not values else min(values) if key == "top1_agreement" else max(values)

    def as_dict(self) -> dict:
        return {"runtime": self.version or self.runtime, "passed": self.passed,
                **{k: self.worst(k) for k in DIFFS}, "error": self.error,
                "batches": [asdict(b) for b in self.batches]}

    def lines(self) -> list[str]:
        """A short human report, one line per batch size and a verdict."""
        out = [f"  {self.runtime} cannot run the model: {self.error}"] if self.error else []
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


def check_model(runner: runtimes.Runner, images: np.ndarray,
                native_predict: Callable[[np.ndarray], np.ndarray], batch_sizes, atol: float,
                rtol: float, min_top1_agreement: float) -> Report:
    """Run NCHW ``images`` through ``native_predict`` and through ``runner`` at every batch
    size."""
    report = Report(atol, rtol, min_top1_agreement, runner.runtime, runner.version)
    for bs in batch_sizes:
        outs, natives = [], []
        for start in range(0, len(images), bs):
            x = images[start:start + bs]
            outs.append(runner.run(x))
            natives.append(native_predict(x))
        report.batches.append(compare(np.concatenate(outs), np.concatenate(natives), bs, atol, rtol))
    return report


def verify(path: Path, names: list[str], images: np.ndarray,
           native_predict: Callable[[np.ndarray], np.ndarray], cfg, layout: str = "NCHW",
           threads: int | None = None) -> list[Report]:
    """The model at ``path`` verified in each runtime of ``names`` under ``cfg``'s rule
    (``batch_sizes``, ``atol``, ``rtol``, ``min_top1_agreement``)."""
    reports = []
    for name in names:
        try:
            runner = runtimes.load(name, path, threads, layout)
            reports.append(check_model(runner, images, native_predict, cfg.batch_sizes, cfg.atol,
                                       cfg.rtol, cfg.min_top1_agreement))
        except Exception as err:  # noqa: BLE001  a runtime's failure is a finding, reported
            why = runtimes.one_line(err)
            reports.append(Report(cfg.atol, cfg.rtol, cfg.min_top1_agreement, name,
                                  error=why if isinstance(err, ExportError) else
                                  f"{type(err).__name__}: {why}"))
    return reports


def summary(reports: list[Report]) -> dict:
    """The export block's verification fields: the rule, the worst differences over every
    runtime and batch size, and each runtime's own report."""
    first = reports[0]
    worst = {}
    for key in DIFFS:
        values = [v for r in reports if (v := r.worst(key)) is not None]
        worst[key] = (min(values) if key == "top1_agreement" else max(values)) if values else None
    return {"passed": all(r.passed for r in reports), "atol": first.atol, "rtol": first.rtol,
            "min_top1_agreement": first.min_top1_agreement, **worst,
            "runtimes": {r.runtime: r.as_dict() for r in reports}}
