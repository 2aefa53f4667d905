"""Where two models that should compute the same function part: every spec node's output in
one model against the same node's in the other, in the spec's order, as Polygraphy compares
every tensor of a network.

The first node whose outputs differ beyond |a - b| <= atol + rtol * |b| is where the two models
part (every later node inherits the difference); the report names it, its error statistics and
the smallest tolerance that would pass it (the atol at the configured rtol, and the rtol at the
configured atol), so "a wrong batch-norm epsilon in Mixed_5b.branch1x1.bn" reads as that, not
as "the logits differ by 3e-2"."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class NodeDiff:
    node: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    mean_abs_diff: float
    min_atol: float          # the smallest atol that passes at the configured rtol
    min_rtol: float          # the smallest rtol that passes at the configured atol
    passed: bool


def node_diff(node: str, a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> NodeDiff:
    """``a`` against the reference ``b`` (same shape) under the export rule."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return NodeDiff(node, tuple(a.shape), float("inf"), float("inf"), float("inf"),
                        float("inf"), float("inf"), False)
    diff, scale = np.abs(a - b), np.abs(b)
    finite = np.isfinite(a).all() and np.isfinite(b).all()
    min_atol = float(np.max(diff - rtol * scale, initial=0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        excess = np.where(diff > atol, (diff - atol) / scale, 0.0)
        rel = np.where(scale > 0, diff / scale, np.where(diff > 0, np.inf, 0.0))
    return NodeDiff(node, tuple(a.shape), float(diff.max(initial=0.0)),
                    float(rel.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0,
                    max(min_atol, 0.0), float(np.nan_to_num(excess, nan=np.inf).max(initial=0.0)),
                    bool(finite and min_atol <= atol))


@dataclass
class LayerReport:
    nodes: list[NodeDiff]
    atol: float
    rtol: float

    @property
    def first_failure(self) -> NodeDiff | None:
        return next((n for n in self.nodes if not n.passed), None)

    def line(self, a: str, b: str) -> str:
        """One line: where ``a`` parts from ``b``, or that every node agrees."""
        bad = self.first_failure
        if bad is None:
            return (f"{a} vs {b}: all {len(self.nodes)} layers within atol={self.atol:g}, "
                    f"rtol={self.rtol:g}")
        later = sum(not n.passed for n in self.nodes) - 1
        return (f"{a} vs {b}: first differing layer {bad.node} {list(bad.shape)}: max abs diff "
                f"{bad.max_abs_diff:.3g}, max rel diff {bad.max_rel_diff:.3g}, mean abs diff "
                f"{bad.mean_abs_diff:.3g}; it would pass with atol={bad.min_atol:.3g} (at "
                f"rtol={self.rtol:g}) or rtol={bad.min_rtol:.3g} (at atol={self.atol:g}); "
                f"{later} later layer(s) differ too")

    def as_dict(self) -> dict:
        bad = self.first_failure
        return {"atol": self.atol, "rtol": self.rtol,
                "first_failure": bad.node if bad else None,
                "nodes": [asdict(n) for n in self.nodes]}


def compare_layers(a: dict[str, np.ndarray], b: dict[str, np.ndarray], order: list[str],
                   atol: float, rtol: float) -> LayerReport:
    """Every node of ``order`` that both ``a`` and ``b`` computed, ``a`` against ``b``."""
    return LayerReport([node_diff(n, a[n], b[n], atol, rtol) for n in order if n in a and n in b],
                       atol, rtol)
