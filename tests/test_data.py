"""The data layer: embedded digits, synthetic data, the preprocessing contract, the split."""
import numpy as np
import pytest

from cnnzoo.data import DataError, Dataset, Preprocess, load_digits, make_synthetic


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
    train_ids, val_ids = set(tr1.images[:, 0, 0, 0]), set(va1.images[:, 0, 0, 0])
    assert len(val_ids) == 10 and not train_ids & val_ids and len(train_ids | val_ids) == n
    assert np.array_equal(va1.images, va2.images) and np.array_equal(tr1.labels, tr2.labels)
    assert set(va3.images[:, 0, 0, 0]) != val_ids


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
