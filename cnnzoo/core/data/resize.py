"""Resizing as matrix products, with Pillow's own coefficients.

Resizing a float image is linear and separable: ``out = Wy @ image @ Wx.T``, where each row of
``Wx``/``Wy`` holds the filter weights of one output pixel. The weights here are computed the
way Pillow's ``Resample.c`` computes them (same filters, same support widening when shrinking,
i.e. antialiasing, same rounding of the window bounds), and nearest-neighbour picks the source
pixel Pillow's affine ``NEAREST`` path picks. So ``resize_batch`` equals ``Image.resize`` on a
float ("F") image up to float32 rounding (Pillow accumulates in double; the tests hold the
difference under 1e-6), while resizing a whole batch with two matrix products instead of one
Pillow call per image and channel.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def _triangle(x: float) -> float:  # Pillow's bilinear filter, support 1
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _cubic(x: float) -> float:  # Pillow's bicubic filter (a = -0.5), support 2
    a, x = -0.5, abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


_FILTERS = {"bilinear": (_triangle, 1.0), "bicubic": (_cubic, 2.0)}


@lru_cache(maxsize=256)
def resize_matrix(in_size: int, out_size: int, interpolation: str) -> np.ndarray:
    """(out_size, in_size) float32 weights: row i says how output pixel i mixes input pixels."""
    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    if interpolation == "nearest":  # Pillow's ImagingScaleAffine: position accumulated
        pos = scale * 0.5
        for i in range(out_size):
            src = -1 if pos < 0.0 else int(pos)
            if 0 <= src < in_size:
                m[i, src] = 1.0
            pos += scale
        return m.astype(np.float32)
    kernel, support = _FILTERS[interpolation]
    filterscale = max(scale, 1.0)  # widen the filter when shrinking (antialiasing)
    support *= filterscale
    for i in range(out_size):  # precompute_coeffs() in Pillow's Resample.c
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = np.array([kernel((x - center + 0.5) / filterscale) for x in range(lo, hi)])
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0.0 else w
    return m.astype(np.float32)


def resize_batch(images: np.ndarray, size: int | tuple[int, int], interpolation: str
                 ) -> np.ndarray:
    """(N, C, H, W) float32 -> (N, C, size, size) (or ``size`` = (height, width)) float32; a
    no-op when already that size.

    Pillow resizes horizontally first, then vertically; so do we. Each pass is one large
    matrix product over the whole batch."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    n, c, h, w = images.shape
    if w != out_w:
        wx = resize_matrix(w, out_w, interpolation)
        images = (images.reshape(-1, w) @ wx.T).reshape(n, c, h, out_w)
    if h != out_h:
        wy = resize_matrix(h, out_h, interpolation)
        # (out_h, h) @ (h, N*C*out_w) in one product: bring H to the front and back
        cols = images.transpose(2, 0, 1, 3).reshape(h, -1)
        images = (wy @ cols).reshape(out_h, n, c, out_w).transpose(1, 2, 0, 3)
    return np.ascontiguousarray(images, dtype=np.float32)


def shorter_side_and_crop(h: int, w: int, size: int, crop_fraction: float
                          ) -> tuple[tuple[int, int], tuple[int, int]]:
    """torchvision's eval transform, ``Resize(floor(size / crop_fraction))`` then
    ``CenterCrop(size)``: the resized (height, width), the shorter side at that length and the
    longer one in proportion (truncated, as torchvision does), and the crop's (top, left)."""
    short = int(size / crop_fraction)
    if h <= w:
        rh, rw = short, int(short * w / h)
    else:
        rh, rw = int(short * h / w), short
    return (rh, rw), (int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0)))

