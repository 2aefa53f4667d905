"""``data=image_folder``: one folder per class, images decoded lazily from disk.

Layout: ``root/<class>/<image>`` (any depth below the class folder), or ``root/train/<class>/...``
plus ``root/val/<class>/...`` for a predefined validation split. Class names are the training
class folders, sorted. PNG, JPEG and BMP files are read (by extension, case-insensitive);
other files and hidden folders are ignored.

Memory: only paths and labels are held; each image is decoded by Pillow when a batch needs it.
``data.cache=true`` keeps decoded images in memory after their first use (small datasets).

Pillow modes map to channels as follows (``image_array``): 1, L, LA -> 1 channel uint8;
I;16* and I (16-bit gray) -> 1 channel uint16; F -> 1 channel float clipped to [0, 1];
RGB, RGBA, P, PA, CMYK, YCbCr and every other mode -> 3 channels uint8 RGB. Alpha is dropped
(not composited), palettes are expanded. ``Preprocess`` then converts to ``arch.in_channels``.

Unreadable files: with ``data.verify=true`` (the default) every image is decoded once while
loading, so a corrupt or truncated file stops the run before training, naming the file;
``data.skip_bad_files=true`` leaves such files out instead and logs how many. With
``verify=false`` only the headers are read at load and a file that fails later stops the run.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .dataset import Dataset

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
_GRAY_MODES = {"1", "L", "LA", "I", "F"}  # plus every "I;16..." mode
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
log = logging.getLogger(__name__)


def mode_channels(mode: str) -> int:
    """Channels an image of Pillow ``mode`` decodes to (see the module docstring)."""
    return 1 if mode in _GRAY_MODES or mode.startswith("I;16") else 3


def image_array(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> (H, W, 1 or 3) array: uint8, uint16 (16-bit gray) or float32."""
    mode = im.mode
    if mode == "L":
        a = np.asarray(im)
    elif mode in ("1", "LA"):
        a = np.asarray(im.convert("L"))
    elif mode.startswith("I;16") or mode == "I":
        a = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
    elif mode == "F":
        a = np.clip(np.asarray(im, np.float32), 0.0, 1.0)
    elif mode == "RGB":
        a = np.asarray(im)
    elif mode in ("RGBA", "P", "PA"):  # via RGBA: palettes with transparency convert cleanly
        a = np.asarray(im if mode == "RGBA" else im.convert("RGBA"))[:, :, :3]
    else:  # CMYK, YCbCr, LAB, HSV, ...
        a = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(a if a.ndim == 3 else a[:, :, None])


def decode(path: str) -> np.ndarray:
    """Read one image file fully; Pillow's errors propagate (truncation included).
    The file is read in one call and decoded from memory: for small images that is faster
    than Pillow's many small reads and seeks on the file."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return image_array(im)


def why_unreadable(err: Exception) -> str:
    """Pillow's error in words that make sense next to the file name."""
    if isinstance(err, UnidentifiedImageError):
        return "not a readable PNG, JPEG or BMP image"
    return str(err) or type(err).__name__


def _header_channels(path: str) -> int:
    """Identify the file from its header only (cheap): raises on a non-image."""
    with Image.open(path) as im:
        return mode_channels(im.mode)


class FileStore:
    """Images as files, decoded on demand; an optional in-memory cache of decoded arrays."""

    def __init__(self, paths: list[str], channels: np.ndarray, cache: bool):
        self.paths, self.channel_counts = paths, channels
        self.cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def channels(self) -> set[int]:
        return {int(c) for c in np.unique(self.channel_counts)}

    def get(self, positions) -> list[np.ndarray]:
        return [self._image(int(i)) for i in positions]

    def _image(self, i: int) -> np.ndarray:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        try:
            image = decode(self.paths[i])
        except _READ_ERRORS as err:
            raise DataError(f"image_folder: cannot read {self.paths[i]}: {why_unreadable(err)}; "
                            "fix or delete it (data.verify=true finds every such file before "
                            "training)") from None
        if self.cache is not None:
            self.cache[i] = image
        return image


def _class_folders(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    """Image files below ``folder``, in a stable (sorted) order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(EXTENSIONS) and not f.startswith(".")]
    return found


def _scan(root: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Paths and labels of ``root/<class>/...`` for the given classes (folders may be absent
    in a validation folder, but one that exists must hold images)."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        if not (root / name).is_dir():
            continue
        files = _image_files(root / name)
        if not files:
            raise DataError(f"image_folder: class folder {root / name} has no images "
                            f"({', '.join(EXTENSIONS)}): add images or remove the folder")
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, np.int64)


def _check_files(paths, labels, verify: bool, skip_bad: bool, cache: bool):
    """Read every file (fully when ``verify``) before training starts; return the readable
    ones, their labels and channel counts, and the decoded images when caching."""
    keep, channels, decoded, bad = [], [], {}, []
    for i, path in enumerate(paths):
        try:
            if verify:
                image = decode(path)
                channels.append(image.shape[-1])
                if cache:
                    decoded[len(keep)] = image
            else:
                channels.append(_header_channels(path))
        except _READ_ERRORS as err:
            if not skip_bad:
                raise DataError(f"image_folder: cannot read {path}: {why_unreadable(err)}; fix "
                                "or delete it, or set data.skip_bad_files=true to leave such "
                                "files out") from None
            bad.append((path, why_unreadable(err)))
            continue
        keep.append(i)
    if bad:
        log.warning("image_folder: skipped %d unreadable image file(s) (data.skip_bad_files=true);"
                    " first: %s (%s)", len(bad), bad[0][0], bad[0][1])
    return ([paths[i] for i in keep], labels[keep], np.asarray(channels, np.int8), decoded)


def _store(root: Path, classes, cfg) -> tuple[FileStore, np.ndarray]:
    paths, labels = _scan(root, classes)
    paths, labels, channels, decoded = _check_files(
        paths, labels, cfg.get("verify", True), cfg.get("skip_bad_files", False),
        cfg.get("cache", False))
    for label, name in enumerate(classes):
        if (root / name).is_dir() and not np.any(labels == label):
            raise DataError(f"image_folder: class folder {root / name} has no readable images "
                            "(all were skipped as unreadable)")
    store = FileStore(paths, channels, cfg.get("cache", False))
    if store.cache is not None:
        store.cache.update(decoded)
    return store, labels


def load(path: Path, cfg):
    """The dataset in folder ``path`` (see the module docstring for the layout)."""

    if not path.is_dir():
        raise DataError(f"data.path={str(path)!r} is a file: image_folder needs a folder of "
                        "class folders (root/<class>/<image>)")
    train_root = path / "train" if (path / "train").is_dir() else path
    if train_root == path and (path / "val").is_dir():
        raise DataError(f"image_folder: {path} has val/ but no train/: add train/<class>/... "
                        "or move the class folders up into the root")
    classes = _class_folders(train_root)
    if not classes:
        raise DataError(f"image_folder: no class folders in {train_root}: expected "
                        "root/<class>/<image> (or root/train/<class>/... and root/val/<class>/...)")
    images, labels = _store(train_root, classes, cfg)
    val_images = val_labels = None
    if train_root != path and (path / "val").is_dir():
        unknown = sorted(set(_class_folders(path / "val")) - set(classes))
        if unknown:
            raise DataError(f"image_folder: val/ has class folders that train/ lacks: "
                            f"{', '.join(unknown)}; add them to train/ or remove them")
        val_images, val_labels = _store(path / "val", classes, cfg)
    return Dataset("image_folder", images, labels, classes, val_images, val_labels,
                   path=str(path))
