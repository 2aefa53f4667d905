"""The file formats (image_folder, mnist IDX, cifar10 python batches, npz), the preprocessing
contract they share, bad data, and training from each format through ``run.py``.

Every file here is written by the tests from real images: scikit-learn's embedded 8x8 digits,
resized and converted as each format needs. Nothing is downloaded."""
from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf
from PIL import Image

from cnnzoo.core import backend as plugins
from cnnzoo.core.data import (
    Augment,
    DataError,
    Dataset,
    Preprocess,
    Split,
    epoch_order,
    load_dataset,
)
from cnnzoo.core.data.cifar import SafeUnpickler, read_batch
from cnnzoo.core.data.idx import read_idx
from cnnzoo.core.data.image_folder import FileStore, decode

# ----------------------------------------------------------------------------- real images


def digits(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real handwritten digits as uint8 (n, size, size) images, and their labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    pick = np.random.default_rng(seed).permutation(len(d.target))[:n]
    gray = np.rint(d.images[pick] * (255 / 16)).astype(np.uint8)
    bilinear = Image.Resampling.BILINEAR
    resized = np.stack([np.asarray(Image.fromarray(g).resize((size, size), bilinear))
                        for g in gray])
    return resized, d.target[pick].astype(np.int64)


def colour(gray: np.ndarray) -> np.ndarray:
    """Gray (n, H, W) -> a real RGB rendering (n, H, W, 3): ink in a per-image hue."""
    hues = np.array([[255, 80, 40], [40, 200, 90], [60, 90, 255]], np.float32)
    tint = hues[np.arange(len(gray)) % 3][:, None, None, :] / 255
    return np.rint(gray[..., None] * tint).astype(np.uint8)


# ----------------------------------------------------------------------------- writers

def write_image_folder(root: Path, n_per_class: int = 12, classes=(0, 1, 2, 3),
                       split: bool = False) -> Path:
    """root/<class>/<i>.<ext> (or root/train|val/...): PNG, JPEG and BMP files in several modes
    and sizes, as a real folder of collected images looks."""
    images, labels = digits(2000, 28)
    formats = [("L", "png", 28), ("RGB", "jpg", 32), ("RGBA", "png", 24), ("P", "png", 30),
               ("I;16", "png", 28), ("RGB", "bmp", 20), ("1", "png", 28), ("LA", "png", 26)]
    for c in classes:
        ims = images[labels == c][:n_per_class]
        for i, im in enumerate(ims):
            part = ("val" if i % 4 == 0 else "train") if split else ""
            folder = root / part / f"digit_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            mode, ext, size = formats[i % len(formats)]
            pil = Image.fromarray(im).resize((size, size + i % 3))  # mixed sizes and shapes
            if mode == "RGB":
                pil = Image.fromarray(colour(np.asarray(pil)[None])[0])
            elif mode == "RGBA":
                pil = Image.fromarray(np.dstack([colour(np.asarray(pil)[None])[0],
                                                 np.full(np.asarray(pil).shape, 200, np.uint8)]))
            elif mode == "P":
                pil = Image.fromarray(colour(np.asarray(pil)[None])[0]).convert("P")
            elif mode == "I;16":
                pil = Image.fromarray(np.asarray(pil).astype(np.uint16) * 257)
            else:
                pil = pil.convert(mode)
            pil.save(folder / f"{i:03d}.{ext}")
    return root


def _idx(array: np.ndarray, type_code: int = 0x08) -> bytes:
    dims = b"".join(struct.pack(">I", d) for d in array.shape)
    return bytes([0, 0, type_code, array.ndim]) + dims + array.astype(
        array.dtype.newbyteorder(">")).tobytes()


def write_idx(folder: Path, n_train: int = 240, n_val: int = 60, gz: bool = False) -> Path:
    """MNIST's four IDX files of real digits at 28x28 (optionally .gz, as distributed)."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = digits(n_train + n_val, 28)
    files = {"train-images-idx3-ubyte": x[:n_train], "train-labels-idx1-ubyte": y[:n_train],
             "t10k-images-idx3-ubyte": x[n_train:], "t10k-labels-idx1-ubyte": y[n_train:]}
    for name, array in files.items():
        data = _idx(array.astype(np.uint8))
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def py2_pickle(obj) -> bytes:
    """Pickle ``obj`` the way Python 2's cPickle wrote the CIFAR-10 batches (protocol 2, strings
    as SHORT_BINSTRING/BINSTRING, numpy arrays through _reconstruct): Python 3's pickler cannot
    write Python 2 strings, so this writes the opcodes directly."""
    out = bytearray(b"\x80\x02")

    def put(o):
        if isinstance(o, (bytes, str)):
            b = o.encode() if isinstance(o, str) else o
            short = len(b) < 256
            out.extend((b"U" + bytes([len(b)]) if short else b"T" + struct.pack("<i", len(b))) + b)
        elif o is None:
            out.extend(b"N")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, tuple):
            out.extend(b"(")
            for v in o:
                put(v)
            out.extend(b"t")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                put(v)
            out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                put(k)
                put(v)
            out.extend(b"u")
        elif isinstance(o, np.ndarray):  # what ndarray.__reduce__ emits
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            put((0,))
            put(b"b")
            out.extend(b"\x87R")
            out.extend(b"(")
            put(1)
            put(o.shape)
            out.extend(b"cnumpy\ndtype\n")
            put((o.dtype.str[1:], 0, 1))
            out.extend(b"R")
            put((3, b"|", None, None, None, -1, -1, 0))
            out.extend(b"b")
            put(False)
            put(o.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    put(obj)
    return bytes(out + b".")


def write_cifar(folder: Path, n_batches: int = 2, per_batch: int = 100, n_test: int = 60,
                meta: bool = True) -> Path:
    """A cifar-10-batches-py folder of real digits rendered as 32x32 RGB, in the official
    layout: each row of b'data' the R, G and B planes, row-major."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = digits(n_batches * per_batch + n_test, 32, seed=1)
    rgb = colour(x)
    rows = rgb.transpose(0, 3, 1, 2).reshape(len(rgb), 3072)
    for b in range(n_batches + 1):
        name = f"data_batch_{b + 1}" if b < n_batches else "test_batch"
        sl = slice(b * per_batch, (b + 1) * per_batch) if b < n_batches else slice(-n_test, None)
        batch = {b"batch_label": f"{name} of {n_batches}".encode(),
                 b"labels": [int(v) for v in y[sl]], b"data": np.ascontiguousarray(rows[sl]),
                 b"filenames": [f"img_{i}.png".encode() for i in range(len(y[sl]))]}
        (folder / name).write_bytes(py2_pickle(batch))
    if meta:
        names = [b"zero", b"one", b"two", b"three", b"four", b"five", b"six", b"seven", b"eight",
                 b"nine"]
        (folder / "batches.meta").write_bytes(py2_pickle(
            {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}))
    return folder


def write_npz(path: Path, n: int = 300, compressed: bool = False, **extra) -> Path:
    x, y = digits(n, 28, seed=2)
    arrays = {"x": x, "y": y, "classes": np.array([f"d{k}" for k in range(10)]), **extra}
    arrays = {k: v for k, v in arrays.items() if v is not None}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def data_cfg(name: str, path: Path | None = None, **keys):
    """The composed ``data`` config of ``name`` with its path and overrides."""
    cfg = compose_cfg(f"data={name}", *([f"data.path={path}"] if path else []))
    for k, v in keys.items():
        OmegaConf.update(cfg, f"data.{k}", v, merge=False)
    return cfg.data


PRE = Preprocess(32, 1, (0.5,), (0.5,))


# ----------------------------------------------------------------------------- image_folder

def test_image_folder_reads_sorted_classes_lazily_from_mixed_files(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=(3, 0, 7))
    d = load_dataset(data_cfg("image_folder", root), seed=0)
    assert d.classes == ["digit_0", "digit_3", "digit_7"] and len(d.labels) == 36
    assert isinstance(d.images, FileStore) and d.images.cache is None  # paths only, streamed
    assert d.channels == {1, 3}  # L, 1, LA, I;16 -> 1; RGB, RGBA, P -> 3
    tr, va = d.split(Preprocess(32, 3, (0.5,) * 3, (0.5,) * 3), 0.25, seed=0)
    x, y = tr.take(np.arange(len(tr)))
    assert x.shape == (27, 3, 32, 32) and x.dtype == np.float32 and len(va) == 9
    # a batch of mixed sizes and modes equals its images preprocessed one by one
    np.testing.assert_array_equal(x[5], tr.preprocess(tr.raw([5])[0]))
    assert [d.classes[k] for k in y] == [Path(tr.source.paths[i]).parent.name for i in tr.index]


def test_image_folder_train_and_val_folders_and_cache(tmp_path):
    root = write_image_folder(tmp_path / "imgs", split=True)
    d = load_dataset(data_cfg("image_folder", root, cache=True), seed=0)
    assert (len(d.labels), len(d.val_labels)) == (36, 12)
    assert all("/val/" in p for p in d.val_images.paths)
    assert len(d.images.cache) == 36  # verified while loading, kept decoded
    tr, va = d.split(PRE, 0.2, seed=0)
    assert (len(tr), len(va)) == (36, 12)
    uncached = load_dataset(data_cfg("image_folder", root), seed=0).split(PRE, 0.2, seed=0)[0]
    np.testing.assert_array_equal(tr.take(range(36))[0], uncached.take(range(36))[0])


@pytest.mark.parametrize("mode, channels, dtype", [
    ("1", 1, np.uint8), ("L", 1, np.uint8), ("LA", 1, np.uint8), ("I;16", 1, np.uint16),
    ("RGB", 3, np.uint8), ("RGBA", 3, np.uint8), ("P", 3, np.uint8), ("CMYK", 3, np.uint8)])
def test_pillow_modes_map_to_documented_channels(tmp_path, mode, channels, dtype):
    rgb = colour(digits(1, 16)[0])[0]
    im = Image.fromarray(rgb)
    im = (Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257) if mode == "I;16"
          else im.convert(mode))
    path = tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")
    im.save(path)
    a = decode(str(path))
    assert a.shape == (16, 16, channels) and a.dtype == dtype
    if mode in ("RGB", "RGBA"):
        np.testing.assert_array_equal(a, rgb)  # alpha dropped, colours kept
    if mode == "I;16":  # 16-bit scaled by 65535: the same [0, 1] values as 8-bit gray * 257
        np.testing.assert_allclose(PRE(a), PRE((a // 257).astype(np.uint8)), atol=1e-6)


def test_palette_with_transparency_decodes_as_rgb(tmp_path):
    p = Image.fromarray(colour(digits(1, 8)[0])[0]).convert("P")
    p.info["transparency"] = 0
    p.save(tmp_path / "t.png", transparency=0)
    assert decode(str(tmp_path / "t.png")).shape == (8, 8, 3)


# ----------------------------------------------------------------------------- mnist (IDX)

def test_idx_plain_files_are_memory_mapped_and_gz_equal_them(tmp_path):
    plain = load_dataset(data_cfg("mnist", write_idx(tmp_path / "plain")), seed=0)
    packed = load_dataset(data_cfg("mnist", write_idx(tmp_path / "gz", gz=True)), seed=0)
    assert isinstance(plain.images, np.memmap) and plain.images.dtype == np.uint8
    assert plain.images.shape == (240, 28, 28, 1) and plain.val_images.shape == (60, 28, 28, 1)
    assert not isinstance(packed.images, np.memmap)  # .gz: decompressed into memory
    np.testing.assert_array_equal(plain.images, packed.images)
    np.testing.assert_array_equal(plain.val_labels, packed.val_labels)
    assert plain.classes == [str(k) for k in range(10)]
    x, y = digits(300, 28)
    np.testing.assert_array_equal(plain.images[..., 0], x[:240])  # the real pixels
    tr, va = plain.split(PRE, 0.2, seed=0, limit=100)
    assert (len(tr), len(va)) == (100, 60)  # t10k is the validation split; limit per split
    for f in (tmp_path / "gz").iterdir():  # both kinds in one folder: the memory-mappable wins
        (tmp_path / "plain" / f.name).write_bytes(f.read_bytes())
    assert isinstance(load_dataset(data_cfg("mnist", tmp_path / "plain"), 0).images, np.memmap)


def test_idx_without_t10k_is_split_by_seed(tmp_path):
    folder = write_idx(tmp_path / "m")
    for f in folder.glob("t10k-*"):
        f.unlink()
    tr, va = load_dataset(data_cfg("mnist", folder), seed=0).split(PRE, 0.25, seed=0)
    assert (len(tr), len(va)) == (180, 60)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"\x00\x00\x08\x05" + p.read_bytes()[4:]),
     "train-images-idx3-ubyte has .* bytes but its header"),
    (lambda p: p.write_bytes(b"\x12\x34\x56\x78" + p.read_bytes()[4:]),
     "not an IDX file: magic number 0x12345678"),
    (lambda p: p.write_bytes(gzip.compress(p.read_bytes())), "still gzip-compressed"),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "the file is truncated"),
])
def test_idx_damaged_images_file(tmp_path, damage, message):
    folder = write_idx(tmp_path / "m")
    damage(folder / "train-images-idx3-ubyte")
    with pytest.raises(DataError, match=message):
        load_dataset(data_cfg("mnist", folder), seed=0)


def test_idx_mismatched_counts_and_missing_pair(tmp_path):
    folder = write_idx(tmp_path / "m")
    labels = folder / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx(np.array(read_idx(labels)[:-1], np.uint8)))
    with pytest.raises(DataError, match="239 labels but train-images-idx3-ubyte has 240 images"):
        load_dataset(data_cfg("mnist", folder), seed=0)
    labels.unlink()
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        load_dataset(data_cfg("mnist", folder), seed=0)
    folder = write_idx(tmp_path / "m2")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k images file but not its pair"):
        load_dataset(data_cfg("mnist", folder), seed=0)


# ----------------------------------------------------------------------------- cifar10

def test_cifar_batches_as_python2_wrote_them(tmp_path):
    d = load_dataset(data_cfg("cifar10", write_cifar(tmp_path / "c")), seed=0)
    assert d.classes[:3] == ["zero", "one", "two"] and d.num_classes == 10
    assert d.images.shape == (200, 32, 32, 3) and d.images.dtype == np.uint8
    assert d.val_images.shape == (60, 32, 32, 3)
    x, y = digits(260, 32, seed=1)
    np.testing.assert_array_equal(d.images, colour(x)[:200])  # planes -> HWC, exact pixels
    np.testing.assert_array_equal(d.labels, y[:200])


def test_cifar_reader_also_takes_python3_pickles(tmp_path):
    rows = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": rows, b"labels": [1, 0]}, protocol=4))
    assert np.array_equal(read_batch(path)["data"], rows)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload", [
    lambda m: {b"data": _Exploit(m), b"labels": []},
    lambda m: {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Exploit(m)},
])
def test_cifar_refuses_malicious_pickle_without_running_it(tmp_path, payload):
    marker = tmp_path / "pwned"
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps(payload(marker), protocol=4))
    with pytest.raises(DataError, match=r"refused to load global '(posix|os|nt)\.system'"):
        load_dataset(data_cfg("cifar10", folder), seed=0)
    assert not marker.exists()


def test_safe_unpickler_allows_only_numpy_reconstruction():
    import io
    for module, name in [("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen"),
                         ("numpy.core.multiarray", "scalar")]:
        with pytest.raises(pickle.UnpicklingError, match="refused"):
            SafeUnpickler(io.BytesIO(b"")).find_class(module, name)


def test_cifar_labels_outside_the_class_names(tmp_path):
    folder = write_cifar(tmp_path / "c")
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": [b"a", b"b", b"c"]}))
    with pytest.raises(DataError, match=r"label \d+ \(image \d+\) is outside the 3 classes 0..2"):
        load_dataset(data_cfg("cifar10", folder), seed=0)


def test_cifar_truncated_batch_names_the_file(tmp_path):
    folder = write_cifar(tmp_path / "c")
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="cannot read data_batch_2"):
        load_dataset(data_cfg("cifar10", folder), seed=0)


# ----------------------------------------------------------------------------- npz

def test_npz_uncompressed_is_memory_mapped_compressed_is_loaded(tmp_path):
    a = load_dataset(data_cfg("npz", write_npz(tmp_path / "a.npz")), seed=0)
    b = load_dataset(data_cfg("npz", write_npz(tmp_path / "b.npz", compressed=True)), seed=0)
    assert isinstance(a.images, np.memmap) and not isinstance(b.images, np.memmap)
    assert a.images.shape == (300, 28, 28, 1) and a.classes[:2] == ["d0", "d1"]
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.images[..., 0], digits(300, 28, seed=2)[0])


def test_npz_float_and_colour_images(tmp_path):
    x, y = digits(40, 16)
    rgb = colour(x)
    np.savez(tmp_path / "f.npz", x=rgb.astype(np.float32) / 255, y=y)
    np.savez(tmp_path / "u.npz", x=rgb, y=y)
    f, u = (load_dataset(data_cfg("npz", tmp_path / n), seed=0) for n in ("f.npz", "u.npz"))
    pre = Preprocess(32, 3, (0.5,) * 3, (0.5,) * 3)
    np.testing.assert_allclose(f.split(pre, 0.2, 0)[0].take(range(8))[0],
                               u.split(pre, 0.2, 0)[0].take(range(8))[0], atol=1e-6)


@pytest.mark.parametrize("arrays, message", [
    (dict(x=None), "has no x array"),
    (dict(y=None, classes=None), "has no y array"),
    (dict(classes=np.array(["a", "b"])), r"label \d \(image \d+\) is outside the 2 classes"),
    (dict(y=np.arange(300) - 1), "negative label"),
    (dict(y=np.zeros(299, np.int64)), "one integer label per image"),
])
def test_npz_bad_arrays(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message):
        load_dataset(data_cfg("npz", write_npz(tmp_path / "d.npz", **arrays)), seed=0)


def test_npz_object_arrays_are_refused(tmp_path):
    x, y = digits(10, 8)
    np.savez(tmp_path / "o.npz", x=x, y=np.array(list(y), dtype=object))
    with pytest.raises(DataError, match="allow_pickle=False"):
        load_dataset(data_cfg("npz", tmp_path / "o.npz"), seed=0)


# ----------------------------------------------------------------------------- bad image files

def _corrupt_folder(tmp_path) -> tuple[Path, Path, Path]:
    root = write_image_folder(tmp_path / "imgs", classes=(0, 1))
    pngs = sorted((root / "digit_1").glob("*.png"))
    truncated, garbage = pngs[0], pngs[1]
    truncated.write_bytes(truncated.read_bytes()[:60])
    garbage.write_bytes(b"this is not an image")
    return root, truncated, garbage


def test_corrupt_images_name_the_file_or_are_skipped_and_counted(tmp_path, caplog):
    root, truncated, garbage = _corrupt_folder(tmp_path)
    with pytest.raises(DataError, match=f"cannot read {truncated}.*data.skip_bad_files=true"):
        load_dataset(data_cfg("image_folder", root), seed=0)
    with caplog.at_level(logging.WARNING):
        d = load_dataset(data_cfg("image_folder", root, skip_bad_files=True), seed=0)
    assert len(d.labels) == 22 and str(truncated) not in d.images.paths
    assert "skipped 2 unreadable image file(s)" in caplog.text


def test_without_verify_a_truncated_image_fails_when_read_naming_it(tmp_path):
    root, truncated, garbage = _corrupt_folder(tmp_path)
    garbage.unlink()
    d = load_dataset(data_cfg("image_folder", root, verify=False), seed=0)  # headers only
    assert str(truncated) in d.images.paths
    with pytest.raises(DataError, match=f"cannot read {truncated}"):
        Split(d.images, d.labels, PRE).take(np.arange(len(d.labels)))


def test_empty_class_folder_and_missing_layouts(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=(0, 1))
    (root / "digit_9").mkdir()
    (root / "digit_9" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="class folder .*digit_9 has no images"):
        load_dataset(data_cfg("image_folder", root), seed=0)
    (tmp_path / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(data_cfg("image_folder", tmp_path / "flat"), seed=0)


def test_two_channel_images_cannot_become_three():
    with pytest.raises(DataError, match="set arch.in_channels=2"):
        Dataset("d", np.zeros((4, 8, 8, 2), np.uint8), np.zeros(4, np.int64), ["a"]).split(
            Preprocess(8, 3, (0.5,) * 3, (0.5,) * 3), 0.5, seed=0)


# ----------------------------------------------------------------------------- augmentation

def _augmented_split(padding=4, flip=True, seed=5):
    x, y = digits(64, 32)
    pre = Preprocess(32, 1, (0.5,), (0.5,), "bilinear", Augment(padding, flip))
    return Dataset("d", x[..., None], y, [str(k) for k in range(10)]).split(pre, 0.25, seed)


def test_augmentation_is_deterministic_per_seed_epoch_image_and_train_only():
    tr, va = _augmented_split()
    again, _ = _augmented_split()
    idx = np.arange(len(tr))
    e0, e1 = tr.take(idx, epoch=0)[0], tr.take(idx, epoch=1)[0]
    np.testing.assert_array_equal(e0, again.take(idx, epoch=0)[0])
    assert not np.array_equal(e0, e1)  # a new draw every epoch
    # per image, not per batch: the same image gets the same pixels in any batch
    np.testing.assert_array_equal(tr.take(idx[::-1], epoch=1)[0][::-1], e1)
    np.testing.assert_array_equal(tr[(3, 1)][0], e1[3])
    plain = Preprocess(32, 1, (0.5,), (0.5,))
    assert not np.array_equal(e0, plain.batch(tr.raw(idx)))
    assert not va.augments
    np.testing.assert_array_equal(va.take([0, 1], epoch=3)[0], plain.batch(va.raw([0, 1])))
    raw, keys = tr.raw(idx), tr.index[idx]  # another run seed draws differently
    assert not np.array_equal(tr.preprocess.batch(raw, 5, 0, keys),
                              tr.preprocess.batch(raw, 6, 0, keys))
    np.testing.assert_array_equal(tr.preprocess.batch(raw, 5, 0, keys), e0)


def test_random_crop_and_flip_move_pixels_as_specified():
    image = np.zeros((8, 8, 1), np.float32)
    image[2, 5] = 1.0
    pre = Preprocess(8, 1, (0.0,), (1.0,), augment=Augment(2, True))
    out = pre.batch(np.repeat(image[None], 400, 0), seed=0, epoch=0, keys=np.arange(400))[:, 0]
    n, ys, xs = np.nonzero(out)
    assert np.array_equal(n, np.arange(400)) and np.all(out.sum(axis=(1, 2)) == 1)  # moved only
    # shifted by -2..2 rows (pad 2, crop back); columns shifted the same, then mirrored x -> 7-x
    assert set(ys.tolist()) == {0, 1, 2, 3, 4}
    assert set(xs.tolist()) == set(range(8))  # 3..7 unflipped, 0..4 flipped


# ----------------------------------------------------------------------------- backends


def _importable_backends():
    """Installed backends, each a pytest param; one whose module fails to import is skipped
    with the reason (e.g. a backend still being written)."""
    params = []
    for name in plugins.available_backends():
        try:
            plugins.load_backend(name)
            params.append(pytest.param(name, id=name))
        except Exception as err:  # noqa: BLE001  ImportError, missing framework, ...
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(
                reason=f"backend '{name}' does not import: {type(err).__name__}: {err}")))
    return params


BACKENDS = _importable_backends()


def _first_batch_nchw(backend_name: str, pipeline) -> tuple[np.ndarray, np.ndarray]:
    batch = next(iter(pipeline))
    x, y = (batch.data[0], batch.label[0]) if hasattr(batch, "label") else batch  # mx.io.DataBatch
    if hasattr(x, "asnumpy"):  # mxnet NDArray
        x, y = x.asnumpy(), y.asnumpy()
    elif hasattr(x, "numpy"):  # torch / tf tensors
        x, y = x.numpy(), y.numpy()
    x = np.asarray(x)
    if backend_name == "keras":
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    return np.ascontiguousarray(x), np.asarray(y)


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_every_backend_gets_the_data_layers_bytes(tmp_path, backend_name, augment):
    cfg = compose_cfg(f"backend={backend_name}", "data.batch_size=16", "seed=7",
                      "arch.in_channels=3",
                      f"data.augment.random_crop_padding={4 if augment else 0}",
                      f"data.augment.horizontal_flip={str(augment).lower()}")
    folder = write_cifar(tmp_path / "c", n_batches=1, per_batch=80, n_test=20)
    dataset = load_dataset(data_cfg("cifar10", folder), cfg.seed)
    pre = Preprocess(32, 3, (0.5,) * 3, (0.25,) * 3, "bilinear", Augment(4 * augment, augment))
    train, _ = dataset.split(pre, 0.2, cfg.seed)
    assert train.augments == augment
    backend = plugins.load_backend(backend_name)(cfg, tmp_path)
    x, y = _first_batch_nchw(backend_name, backend.input_pipeline(train, shuffle=True))
    want_x, want_y = train.take(epoch_order(len(train), cfg.seed, 0)[:16], epoch=0)
    assert x.dtype == want_x.dtype and x.tobytes() == want_x.tobytes()
    np.testing.assert_array_equal(y, want_y)


def test_torch_loader_draws_each_epochs_augmentation(tmp_path):
    """Lightning calls set_epoch; the sampler's keys carry the epoch to the split (also into
    DataLoader worker processes, which never see set_epoch)."""
    pytest.importorskip("torch")
    tr, _ = _augmented_split()
    cfg = compose_cfg("data.batch_size=8", "seed=5", "backend.num_workers=1")
    loader = plugins.load_backend("torch")(cfg, tmp_path).input_pipeline(tr, shuffle=True)
    for epoch in (1, 2):
        loader.sampler.set_epoch(epoch)
        x, _ = next(iter(loader))
        want, _ = tr.take(epoch_order(len(tr), 5, epoch)[:8], epoch=epoch)
        assert x.numpy().tobytes() == want.tobytes()


# ----------------------------------------------------------------------------- through run.py

FORMATS = {
    "image_folder": lambda tmp: ("image_folder", write_image_folder(tmp / "imgs", n_per_class=30,
                                                                    classes=range(10))),
    "mnist": lambda tmp: ("mnist", write_idx(tmp / "mnist", gz=True)),
    "cifar10": lambda tmp: ("cifar10", write_cifar(tmp / "cifar")),
    "npz": lambda tmp: ("npz", write_npz(tmp / "d.npz")),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_lenet5_trains_from_each_format(cli, tmp_path, fmt, backend_name):
    name, path = FORMATS[fmt](tmp_path)
    extra = (["data.augment.random_crop_padding=2", "data.cache=true"] if fmt == "image_folder"
             else [])
    r = cli(f"data={name}", f"data.path={path}", f"backend={backend_name}", "trainer.max_epochs=1",
            "trainer.progress_bar=false", "export.num_images=8", "export.batch_sizes=[1,8]", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    res = r.results()
    assert res["data"]["name"] == name and res["data"]["train_images"] > 100
    assert res["status"] == "ok" and res["export"]["passed"] is True
    assert res["metrics"]["val_acc"] > 0.15  # one epoch on real digits: above chance (0.1)
    pre = res["data"]["preprocess"]
    assert pre["resize"] == [32, 32] and pre["channels"] == 1
    assert pre["augment"]["random_crop_padding"] == (2 if fmt == "image_folder" else 0)
    import onnx
    meta = {p.key: p.value for p in onnx.load(str(r.run_dir / "model.onnx")).metadata_props}
    assert json.loads(meta["preprocess"]) == pre


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_path", "empty_class", "corrupt_image", "bad_magic",
                                  "npz_without_y", "labels_outside_classes",
                                  "num_classes_too_small"])
def test_bad_data_is_one_line_and_exit_code_2(cli, tmp_path, case):
    if case == "missing_path":
        args, expect = ["data=mnist", f"data.path={tmp_path / 'nowhere'}"], "does not exist"
    elif case == "empty_class":
        root = write_image_folder(tmp_path / "imgs", n_per_class=3, classes=(0, 1))
        (root / "digit_5").mkdir()
        args, expect = ["data=image_folder", f"data.path={root}"], "digit_5 has no images"
    elif case == "corrupt_image":
        root, truncated, _ = _corrupt_folder(tmp_path)
        args, expect = ["data=image_folder", f"data.path={root}"], f"cannot read {truncated}"
    elif case == "bad_magic":
        folder = write_idx(tmp_path / "m")
        p = folder / "t10k-labels-idx1-ubyte"
        p.write_bytes(b"<htm" + p.read_bytes()[4:])
        args, expect = ["data=mnist", f"data.path={folder}"], "t10k-labels-idx1-ubyte is not an IDX"
    elif case == "npz_without_y":
        path = write_npz(tmp_path / "d.npz", y=None, classes=None)
        args, expect = ["data=npz", f"data.path={path}"], "has no y array"
    elif case == "labels_outside_classes":
        path = write_npz(tmp_path / "d.npz", classes=np.array(["a", "b", "c"]))
        args, expect = ["data=npz", f"data.path={path}"], "is outside the 3 classes"
    else:
        path = write_npz(tmp_path / "d.npz")
        args, expect = ["data=npz", f"data.path={path}", "arch.num_classes=5"], "has 10 classes"
    r = cli(*args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.error_lines) == 1 and expect in r.error_lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (r.run_dir / "results.json").exists() and not (r.run_dir / "model.onnx").exists()
    assert r.frameworks == set()  # stopped before any framework was imported


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("overrides, line", [
    (["data=mnist", "data.path=null"], "data.path=None is invalid: expected the path of the mnist"),
    (["data=npz", "data.path=''"], "data.path='' is invalid"),
    (["data.augment.random_crop_padding=-1"], "data.augment.random_crop_padding=-1 is invalid: "
                                              "expected an integer from 0 (off) to arch.input_size"),
    (["data.augment.random_crop_padding=33"], "data.augment.random_crop_padding=33 is invalid"),
    (["data.augment.horizontal_flip=sometimes"], "data.augment.horizontal_flip='sometimes' is "
                                                 "invalid: expected true or false"),
    (["data=image_folder", "data.cache=1"], "data.cache=1 is invalid: expected true or false"),
    (["data=image_folder", "data.skip_bad_files=null"], "data.skip_bad_files=None is invalid"),
    (["data=imagenet"], "Could not find 'data/imagenet'"),
])
def test_data_options_are_validated_one_line_each(overrides, line):
    from hydra.errors import MissingConfigException

    from cnnzoo.app.validate import validate
    from cnnzoo.core.errors import ConfigError
    try:
        cfg = compose_cfg(*overrides)
    except MissingConfigException as err:  # an unknown format: Hydra lists the options
        assert line in str(err) and "npz" in str(err)
        return
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).splitlines() == [str(err.value)] and str(err.value).startswith(line)
