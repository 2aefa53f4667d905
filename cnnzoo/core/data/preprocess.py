"""The one preprocessing contract: raw images -> the architecture's input, for every backend.

Steps, in this order, on a batch at a time:

1. scale to [0, 1] by the source's bit depth: uint8 / 255, uint16 / 65535; float images are
   taken as already in [0, 1];
2. resize the whole image (no aspect-preserving crop) to ``size`` x ``size`` with Pillow's
   ``interpolation`` filter, computed in float32 (``resize``); or, with ``crop_fraction``
   (what pretrained weights from torchvision, timm and Gluon were evaluated with), resize the
   shorter side to ``size / crop_fraction`` keeping the aspect ratio, then crop the centre
   ``size`` x ``size``;
3. convert channels to ``channels``: gray -> RGB by repetition, RGB -> gray by ITU-R 601 luma
   (0.299 R + 0.587 G + 0.114 B), RGBA -> RGB by dropping alpha. Reductions are applied before
   resizing and repetition after it: both are linear, so the order only saves work;
4. training split only, optional augmentation (``Augment``): zero-pad then random crop back to
   ``size``, and/or horizontal flip; deterministic in (seed, epoch, image);
5. normalise: ``(x - mean) / std`` per channel, after putting the channels in
   ``channel_order`` (BGR for weights trained on Caffe-style inputs, Keras' "caffe" mode).

Output: float32 (N, C, H, W). Backends with another layout transpose it themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from .resize import resize_batch, shorter_side_and_crop

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
_SCALE = {1: 255.0, 2: 65535.0}  # unsigned integer images: itemsize -> full scale


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash (SplitMix64's finaliser), vectorised; wraps modulo 2**64."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def augment_draws(seed: int, epoch, keys) -> np.ndarray:
    """One 64-bit random number per image, a pure function of (seed, epoch, image key): no
    random state is carried, so any backend, worker process or resumed run draws the same."""
    keys = np.asarray(keys, np.uint64)
    epoch = np.broadcast_to(np.asarray(epoch, np.uint64), keys.shape)
    h = _splitmix64(np.full(keys.shape, seed, np.uint64))
    return _splitmix64(_splitmix64(h ^ epoch) ^ keys)


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation; off by default. Applied by the training split only."""
    random_crop_padding: int = 0   # pad each side with zeros (black), then crop back to size
    horizontal_flip: bool = False  # mirror left-right with probability 1/2

    @property
    def enabled(self) -> bool:
        return self.random_crop_padding > 0 or self.horizontal_flip

    def __call__(self, batch: np.ndarray, seed: int, epoch, keys) -> np.ndarray:
        """Augment (N, C, S, S) images in [0, 1] in place; image i is drawn from keys[i]."""
        draws = augment_draws(seed, epoch, keys)
        p = self.random_crop_padding
        if p:
            span = np.uint64(2 * p + 1)
            dys = (draws % span).astype(np.int64)
            dxs = ((draws >> np.uint64(20)) % span).astype(np.int64)
            for i, (dy, dx) in enumerate(zip(dys, dxs)):
                batch[i] = _shift(batch[i], dy - p, dx - p)
        if self.horizontal_flip:
            flip = ((draws >> np.uint64(40)) & np.uint64(1)).astype(bool)
            batch[flip] = batch[flip, :, :, ::-1]
        return batch

    def metadata(self) -> dict:
        return {"random_crop_padding": self.random_crop_padding,
                "horizontal_flip": self.horizontal_flip,
                "applies_to": "training split only (not validation, not inference)",
                "random_crop": "zero-pad each side by random_crop_padding after resizing, "
                               "then crop back to the input size at a random offset",
                "seeded_by": "(seed, epoch, image index): identical on every backend"}


def _shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The size x size crop at offset (p + dy, p + dx) of the image zero-padded by p."""
    out = np.zeros_like(image)
    h, w = image.shape[-2:]
    out[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        image[:, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out


@dataclass(frozen=True)
class Preprocess:
    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    augment: Augment = field(default_factory=Augment)
    channel_order: str = "RGB"           # RGB or BGR (the normalised planes' order)
    crop_fraction: float | None = None   # None: resize the whole image; else shorter side + crop

    @property
    def image_bytes(self) -> int:
        """The bytes of one preprocessed image (float32, channels x size x size)."""
        return self.channels * self.size * self.size * 4

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One raw (H, W, C) image -> normalised (channels, size, size) float32."""
        return self.batch([image])[0]

    def batch(self, images, seed: int = 0, epoch=0, keys=None) -> np.ndarray:
        """Raw images -> (N, channels, size, size) float32.

        ``images`` is an (N, H, W, C) array or a list of (H, W, C) arrays of any sizes.
        ``keys`` (the images' indices in their dataset) turn on augmentation, which only the
        training split passes."""
        return self.finish(self.resized(images), seed, epoch, keys)

    def resized(self, images) -> np.ndarray:
        """Steps 1-3: raw images -> (N, channels, size, size) float32 in [0, 1]. The same
        for every epoch, so a split may keep them (``Split.keep_in_memory``)."""
        out = np.empty((len(images), self.channels, self.size, self.size), np.float32)
        if isinstance(images, np.ndarray):
            groups = [(slice(None), images)] if len(images) else []
        else:  # mixed sizes: one vectorised pass per distinct (H, W, C, dtype)
            by_shape: dict = {}
            for i, im in enumerate(images):
                by_shape.setdefault((im.shape, im.dtype), []).append(i)
            groups = [(ix, np.stack([images[i] for i in ix])) for ix in by_shape.values()]
        for where, raw in groups:
            out[where] = self._resize_and_adapt(raw)
        return out

    def finish(self, x: np.ndarray, seed: int = 0, epoch=0, keys=None) -> np.ndarray:
        """Steps 4-5, in place on ``resized`` output: augmentation (when ``keys`` are given)
        and normalisation."""
        if keys is not None and self.augment.enabled:
            self.augment(x, seed, epoch, keys)
        if self.channel_order == "BGR" and x.shape[1] == 3:
            x[:] = x[:, ::-1]
        x -= np.asarray(self.mean, np.float32)[:, None, None]
        x /= np.asarray(self.std, np.float32)[:, None, None]
        return x

    def _resize_and_adapt(self, raw: np.ndarray) -> np.ndarray:
        """(n, H, W, C) raw, one dtype -> (n, channels, size, size) in [0, 1] (steps 1-3)."""
        if raw.ndim != 4:
            raise DataError(f"images must be (H, W, C) arrays, got shape {raw.shape[1:]}")
        x = np.ascontiguousarray(raw.transpose(0, 3, 1, 2), dtype=np.float32)
        if raw.dtype.kind == "u":
            x /= np.float32(_SCALE[raw.dtype.itemsize])
        c = x.shape[1]
        self.check_channels(c)
        if c > self.channels:  # reduce first: fewer planes to resize
            x = _luma(x) if self.channels == 1 else x[:, :3]
        if self.crop_fraction is None:
            x = resize_batch(x, self.size, self.interpolation)
        else:
            (rh, rw), (top, left) = shorter_side_and_crop(*x.shape[2:], self.size,
                                                          self.crop_fraction)
            x = resize_batch(x, (rh, rw), self.interpolation)
            x = np.ascontiguousarray(x[:, :, top:top + self.size, left:left + self.size])
        if x.shape[1] < self.channels:  # gray -> RGB (or any count) by repetition
            x = np.repeat(x, self.channels, axis=1)
        return x

    def check_channels(self, c: int) -> None:
        """Raise DataError unless c-channel images convert to ``self.channels``."""
        if c == self.channels or c == 1 or (c in (3, 4) and self.channels in (1, 3)):
            return
        raise DataError(f"cannot convert {c}-channel images to {self.channels} channels; "
                        f"set arch.in_channels={c}")

    def metadata(self) -> dict:
        """What a deployer needs to feed the model; goes into the ONNX metadata."""
        crop = self.crop_fraction
        return {"resize": [self.size, self.size], "interpolation": self.interpolation,
                "crop_fraction": crop,
                "resize_method": "whole image (aspect ratio not kept), Pillow's filter, "
                                 "in float32 after scaling" if crop is None else
                                 f"shorter side to int(size / {crop}) (aspect ratio kept), "
                                 "Pillow's filter, in float32 after scaling, then the centre "
                                 "size x size crop",
                "channels": self.channels,
                "channel_conversion": "gray->RGB: repeat; RGB->gray: 0.299 R + 0.587 G + "
                                      "0.114 B; RGBA->RGB: drop alpha; palette->RGB",
                "scale": "pixel / 255 (to [0, 1]); 16-bit: pixel / 65535; float images "
                         "are taken as already in [0, 1]",
                "order": "scale, channel reduction, resize, channel repetition, augmentation "
                         "(training only), normalise",
                "mean": list(self.mean), "std": list(self.std),
                "normalise": "(x - mean) / std, per channel, in channel_order",
                "channel_order": self.channel_order,
                "augment": self.augment.metadata()}


def to_layout(images: np.ndarray, layout: str) -> np.ndarray:
    """Preprocessed NCHW images in the layout a model's input takes ("NCHW" or "NHWC", as
    recorded in the ONNX metadata): the one place where channels-last models get transposed."""
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1)) if layout == "NHWC" else images


def _luma(x: np.ndarray) -> np.ndarray:
    r, g, b = (x[:, k:k + 1] for k in range(3))
    return LUMA[0] * r + LUMA[1] * g + LUMA[2] * b
