"""The data layer: embedded digits, synthetic data, the preprocessing contract, the split."""
import numpy as np
import pytest

from cnnzoo.core.data import DataError, Dataset, Preprocess, load_digits, make_synthetic


def test_digits_are_the_real_embedded_dataset():
    d = load_digits()
    assert d.images.shape == (1797, 8, 8, 1) and d.num_classes == 10
    assert d.images.min() == 0.0 and d.images.max() == 1.0


def test_split_is_deterministic_disjoint_and_seeded():
    n = 50  # image i is filled with the value i, so every image says where it came from
    ids = Dataset("ids", np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1).repeat(2, 1).repeat(2, 2),
                  np.arange(n) % 3, ["a", "b", "c"])
    pre = Preprocess(2, 1, (0.0,), (1.0,))
    tr1, va1 = ids.split(pre, 0.2, seed=1)
    tr2, va2 = ids.split(pre, 0.2, seed=1)
    _, va3 = ids.split(pre, 0.2, seed=2)
    def ids_of(split):
        return split.raw(np.arange(len(split)))[:, 0, 0, 0]
    train_ids, val_ids = set(ids_of(tr1)), set(ids_of(va1))
    assert len(val_ids) == 10 and not train_ids & val_ids and len(train_ids | val_ids) == n
    assert np.array_equal(ids_of(va1), ids_of(va2)) and np.array_equal(tr1.labels, tr2.labels)
    assert set(ids_of(va3)) != val_ids


def test_preprocess_resizes_adapts_channels_and_normalises():
    image = np.full((8, 8, 1), 0.75, np.float32)
    out = Preprocess(32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(image)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0, atol=1e-6)  # (0.75 - 0.5) / 0.25
    rgb = np.zeros((4, 4, 3), np.float32)
    rgb[..., 1] = 1.0
    gray = Preprocess(4, 1, (0.0,), (1.0,))(rgb)
    np.testing.assert_allclose(gray, 0.587, atol=1e-6)  # ITU-R 601 luma of pure green


def test_preprocess_refuses_impossible_channel_conversion():
    with pytest.raises(DataError, match="arch.in_channels=2"):
        Preprocess(4, 3, (0.0,) * 3, (1.0,) * 3)(np.zeros((4, 4, 2), np.float32))


def test_split_items_and_batches_agree():
    d = load_digits()
    tr, _ = d.split(Preprocess(16, 1, (0.5,), (0.5,)), 0.2, seed=0, limit=100)
    x, y = tr.batch(0, 5)
    assert x.shape == (5, 1, 16, 16) and len(tr) == 80
    np.testing.assert_array_equal(x[3], tr[3][0])
    assert y[3] == tr[3][1]


def test_synthetic_is_seeded_and_class_dependent():
    a = make_synthetic(200, 4, 16, 3, seed=7)
    b = make_synthetic(200, 4, 16, 3, seed=7)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    means = [a.images[a.labels == k].mean(axis=0) for k in range(4)]
    # each class has its own pattern: class means differ far more than the noise level
    assert min(np.abs(means[i] - means[j]).mean() for i in range(4) for j in range(i)) > 0.05


def test_split_with_too_few_images_is_a_data_error():
    d = make_synthetic(4, 2, 8, 1, seed=0)
    with pytest.raises(DataError, match="val_fraction"):
        d.split(Preprocess(8, 1, (0.0,), (1.0,)), 0.9, seed=0, limit=1)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
def test_vectorised_resize_reproduces_pillow(interpolation):
    """Whole batches are resized with two matrix products built from Pillow's own filter
    coefficients: the result is Pillow's float resize (nearest exactly)."""
    from PIL import Image

    from cnnzoo.core.data.resize import resize_batch
    resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC}[interpolation]
    rng = np.random.default_rng(0)
    for (h, w), size in [((8, 8), 32), ((28, 28), 32), ((32, 32), 28), ((227, 199), 75),
                         ((13, 40), 17), ((1, 5), 3)]:
        images = rng.random((3, 2, h, w), dtype=np.float32)
        out = resize_batch(images, size, interpolation)
        ref = np.stack([[np.asarray(Image.fromarray(ch, mode="F").resize((size, size), resample))
                         for ch in im] for im in images])
        assert out.shape == ref.shape == (3, 2, size, size)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6 if interpolation != "nearest" else 0)


def test_uint8_images_scale_to_the_same_input_as_floats():
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (5, 20, 20, 3), dtype=np.uint8)
    u16 = u8.astype(np.uint16) * 257  # the same levels in 16 bits
    pre = Preprocess(32, 3, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "bicubic")
    want = pre.batch(u8.astype(np.float32) / 255)
    np.testing.assert_allclose(pre.batch(u8), want, atol=1e-6)
    np.testing.assert_allclose(pre.batch(u16), want, atol=1e-6)


def test_channel_conversions():
    rgba = np.zeros((1, 4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 7  # pure red, almost transparent
    gray = Preprocess(4, 1, (0.0,), (1.0,)).batch(rgba)
    np.testing.assert_allclose(gray, 0.299, atol=1e-6)  # luma of red; alpha ignored
    rgb = Preprocess(4, 3, (0.0,), (1.0,)).batch(rgba)  # one mean/std for all channels
    np.testing.assert_allclose(rgb[0, :, 0, 0], [1, 0, 0], atol=1e-6)
    g = np.full((1, 4, 4, 1), 51, np.uint8)
    np.testing.assert_allclose(Preprocess(4, 3, (0.0,) * 3, (1.0,) * 3).batch(g), 0.2, atol=1e-6)


def test_split_indexes_its_source_without_copying():
    images = np.zeros((30, 4, 4, 1), np.uint8)
    tr, va = Dataset("z", images, np.arange(30) % 2, ["a", "b"]).split(
        Preprocess(4, 1, (0.0,), (1.0,)), 0.2, seed=0)
    assert tr.source.array is images and va.source.array is images
    assert sorted(np.concatenate([tr.index, va.index]).tolist()) == list(range(30))


def test_metadata_records_the_whole_contract():
    from cnnzoo.core.data import Augment
    meta = Preprocess(32, 3, (0.5,) * 3, (0.5,) * 3, "bicubic", Augment(4, True)).metadata()
    assert meta["resize"] == [32, 32] and meta["interpolation"] == "bicubic"
    assert meta["mean"] == [0.5] * 3 and "255" in meta["scale"] and meta["channels"] == 3
    assert meta["augment"]["random_crop_padding"] == 4 and meta["augment"]["horizontal_flip"]
    assert "training split only" in meta["augment"]["applies_to"]


class _CountingStore:
    """An image store that counts the images read from it."""

    def __init__(self, images):
        self.images, self.read = images, 0

    def __len__(self):
        return len(self.images)

    @property
    def channels(self):
        return {self.images.shape[-1]}

    def get(self, positions):
        self.read += len(positions)
        return self.images[positions]


@pytest.mark.parametrize("augment", [False, True])
def test_kept_split_gives_the_same_batches_and_reads_each_image_once(augment):
    """keep_in_memory only changes where resized images come from: the batches, epochs and
    augmentation are those of the unkept split (to float32 rounding: a resize's last bit
    depends on the batch it runs on) and bitwise independent of the order in which batches
    first ask for them (a resumed run asks in another order); the source is read once."""
    from cnnzoo.core.data import Augment, Split, epoch_order
    from cnnzoo.core.data.dataset import KEEP_BLOCK

    n = 2 * KEEP_BLOCK + 40  # two whole blocks and a partial one
    images = make_synthetic(n, 3, 11, 3, seed=5).images  # 11x11 RGB -> 16x16 gray
    pre = Preprocess(16, 1, (0.5,), (0.25,), "bicubic",
                     Augment(2, True) if augment else Augment())
    labels, index = np.arange(n) % 3, np.arange(n)[::-1].copy()
    plain = Split(images, labels, pre, index, augment_seed=7)
    kept, kept_late = (Split(_CountingStore(images), labels, pre, index, augment_seed=7)
                       for _ in range(2))
    for split in (kept, kept_late):
        assert split.keep_in_memory(n * 16 * 16 * 4) == n * 16 * 16 * 4
    kept_late.take(epoch_order(n, 7, 5)[:50], 5)  # first asked in another epoch's order
    for epoch in range(3):
        order = epoch_order(n, 7, epoch)
        for b in range(0, n, 100):
            x, y = kept.take(order[b:b + 100], epoch)
            want_x, want_y = plain.take(order[b:b + 100], epoch)
            np.testing.assert_allclose(x, want_x, rtol=1e-5, atol=1e-6)
            assert np.array_equal(y, want_y)
            assert np.array_equal(x, kept_late.take(order[b:b + 100], epoch)[0])
    assert kept.source.read == n and kept_late.source.read == n
    x[:] = 0  # a take is a copy: changing it leaves the kept images alone
    assert not np.array_equal(kept.take(order[b:b + 100], 2)[0], x)


def test_a_split_over_its_memory_budget_is_not_kept():
    split, _ = make_synthetic(20, 2, 8, 1, seed=0).split(Preprocess(8, 1, (0.5,), (0.5,)), 0.5, 0)
    assert split.keep_in_memory(10 * 8 * 8 * 4 - 1) == 0 and split.keep_in_memory(0) == 0
    split.fill_memory()  # nothing kept: nothing to fill
    assert split.keep_in_memory(10 * 8 * 8 * 4) == 10 * 8 * 8 * 4
    split.source = _CountingStore(split.source.array)
    split.fill_memory()
    assert split.source.read == 10
    split.take(np.arange(10))
    assert split.source.read == 10


def test_epoch_chunks_are_whole_batches_of_per_batch_takes():
    from cnnzoo.core.data import epoch_chunks, epoch_order

    split, _ = make_synthetic(90, 3, 8, 1, seed=2).split(Preprocess(8, 1, (0.5,), (0.5,)), 0.1, 0)
    assert len(split) == 81  # 10 batches of 8 and one of 1
    chunk_bytes = 3 * 8 * split.preprocess.image_bytes  # three batches
    chunks = list(epoch_chunks(split, 8, 4, 1, True, 11, chunk_bytes))
    assert [len(y) for _, y in chunks] == [24, 24, 24, 8, 1]  # the last batch alone
    x, y = (np.concatenate(part) for part in zip(*chunks))
    order = epoch_order(81, 4, 1)
    for b in range(0, 81, 8):
        want_x, want_y = split.take(order[b:b + 8], 1)
        assert np.array_equal(x[b:b + 8], want_x) and np.array_equal(y[b:b + 8], want_y)
    assert sum(len(y) for _, y in epoch_chunks(split, 8, 4, 1, True, 3, 1)) == 24  # 3 batches
