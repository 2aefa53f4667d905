"""PyTorch's window geometry, which every backend reproduces with its own window ops: the
padding a 'valid' window op needs to yield PyTorch's windows (ceil mode included), average-pool
divisors with and without ``count_include_pad``, and adaptive-pool bins. Plain Python, like the
whole spec layer (a backend makes arrays of the lists); the number of windows is the spec's own
rule (``spec.window_count``)."""
from __future__ import annotations

from .spec import window_count


def axis_padding(size: int, k: int, s: int, p: int, d: int = 1,
                 ceil_mode: bool = False) -> tuple[tuple[int, int], int]:
    """((left, right), out) along one axis: ``p`` on the left and, on the right, enough that a
    window op without padding yields PyTorch's ``out`` windows (ceil mode may need more than
    ``p``; the spec's rule guarantees that every window still starts inside)."""
    out = window_count(size, k, s, p, d, ceil_mode)
    covered = (out - 1) * s + d * (k - 1) + 1  # the input extent the windows span
    return (p, max(p, covered - size - p)), out


def avg_divisors(size: int, k: int, s: int, p: int, out: int,
                 count_include_pad: bool) -> list[float]:
    """PyTorch's average-pool divisor at each output position along one axis: the window
    clipped to [-p, size + p) and, without ``count_include_pad``, to the input [0, size)."""
    divisors = []
    for start in range(-p, out * s - p, s):
        end = min(start + k, size + p)
        if not count_include_pad:
            start, end = max(start, 0), min(end, size)
        divisors.append(float(end - start))
    return divisors


def adaptive_bin_ranges(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive-pooling bins along one axis: bin i spans
    [floor(i * size / out), ceil((i + 1) * size / out))."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_bins(size: int, out: int) -> list[list[float]]:
    """(out, size) averaging matrix of ``adaptive_bin_ranges``."""
    return [[1.0 / (hi - lo) if lo <= j < hi else 0.0 for j in range(size)]
            for lo, hi in adaptive_bin_ranges(size, out)]
