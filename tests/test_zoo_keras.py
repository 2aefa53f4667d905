"""keras.applications' weights read without Keras (``zoo.formats.keras_h5``, h5py only) and
mapped onto cnnzoo's spec (``zoo.keras_layout``), proved exact: each keras.applications model
with random weights (batch-norm statistics, gamma, beta and biases drawn too, so every array
matters) is saved by Keras' own legacy HDF5 writer, as the published files are, read back by
cnnzoo, loaded into cnnzoo's model and compared with the Keras model's own forward pass on the
same two images. The export back (``from_canonical`` + ``keras_h5.write``) is loaded by
``Model.load_weights``; the readers' and the layout's errors are checked too."""
import gc
import time

import h5py
import keras
import numpy as np
import pytest
from conftest import compose_cfg
from keras.src.legacy.saving import legacy_h5_format

import architectures
from cnnzoo.core.backend import load_backend, usable_backends
from cnnzoo.core.errors import WeightsError
from cnnzoo.core.weights import check_weights, expected_shapes
from cnnzoo.core.zoo import catalog, keras_layout
from cnnzoo.core.zoo.files import detect
from cnnzoo.core.zoo.formats import keras_h5

# (keras.applications model, cnnzoo architecture, input size, the catalog entry's options):
# the smallest size both accept where both compute the same function (VGG's Flatten head needs
# its 224; Xception at 71 pools odd sizes only, where Keras' "same" padding is symmetric)
PAIRS = {
    "VGG16": ("vgg16", 224, {}),
    "VGG19": ("vgg19", 224, {}),
    "Xception": ("xception", 71, {"bn_eps": 1e-3}),
    "InceptionV3": ("inception_v3", 75, {"count_include_pad": False}),
    "InceptionResNetV2": ("inception_resnet_v2", 75, {}),
}
EVERY_BACKEND = "InceptionV3"  # the pair proved in every installed backend
ATOL, RTOL = 1e-4, 1e-3


def _randomize(model, images: np.ndarray, seed: int = 0) -> None:
    """Weights under which every array matters and the logits depend on the image: Keras
    initialises batch norm to the identity and biases to zero (which would hide a swapped
    statistic or a lost bias), and through dozens of layers the signal fades below the biases.
    So: biases, gamma and beta drawn; each batch norm's moving statistics set to its input's
    statistics on the test images and six others (one training-mode pass with momentum 0), so
    that it keeps the signal; a network without batch norm (VGG) gets He's kernel variance
    instead of Glorot's."""
    rng = np.random.default_rng(seed)
    draws = {"gamma": lambda s: rng.uniform(0.5, 1.5, s), "beta": lambda s: rng.normal(0, 0.1, s),
             "bias": lambda s: rng.normal(0, 0.1, s)}
    norms = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    for variable in model.weights:
        kind = variable.path.rsplit("/", 1)[-1]
        if kind in draws:
            variable.assign(draws[kind](variable.shape).astype(np.float32))
        elif kind.endswith("kernel") and not norms:
            variable.assign(np.asarray(variable) * np.float32(np.sqrt(2)))
    if norms:
        for layer in norms:
            layer.momentum = 0.0
        others = rng.standard_normal((6, *images.shape[1:])).astype(np.float32)
        model(np.concatenate([images, others]), training=True)
        for layer in norms:
            layer.momentum = 0.99
            # a channel nearly constant over the images would amplify rounding ~30-fold
            var = np.asarray(layer.moving_variance)
            layer.moving_variance.assign(np.maximum(var, 0.5 * var.mean()))


class Zoo:
    """One keras.applications model: built once, its random weights saved by Keras' legacy
    writer, its logits on two images."""

    def __init__(self, name: str, folder):
        arch, self.size, self.options = PAIRS[name]
        self.name, self.spec = name, architectures.build_spec(arch, **self.options)
        t0 = time.perf_counter()
        self.model = getattr(keras.applications, name)(
            weights=None, include_top=True, input_shape=(self.size, self.size, 3),
            classifier_activation=None)
        self.images = np.random.default_rng(1).standard_normal(
            (2, 3, self.size, self.size)).astype(np.float32)
        _randomize(self.model, self.images.transpose(0, 2, 3, 1))
        self.path = folder / f"{name}.h5"
        with h5py.File(self.path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, self.model)
        self.logits = self.run(self.model)
        self.build_s = time.perf_counter() - t0

    def run(self, model) -> np.ndarray:
        return np.asarray(model(self.images.transpose(0, 2, 3, 1), training=False))

    def canonical(self) -> dict[str, np.ndarray]:
        return keras_layout.to_canonical(keras_h5.read(self.path), self.spec, self.size)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """``zoo(name)``: the Zoo of a keras.applications model, built once per module."""
    folder, cache = tmp_path_factory.mktemp("keras_zoo"), {}

    def get(name: str) -> Zoo:
        if name not in cache:
            cache[name] = Zoo(name, folder)
        return cache[name]

    yield get
    for z in cache.values():  # VGG's files are 550 MB each: leave none behind
        z.path.unlink(missing_ok=True)
    cache.clear()


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("keras_zoo_run")
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_backend(name)(compose_cfg(f"backend={name}", "hardware=cpu"),
                                             run_dir)
        return cache[name]
    return get


def _compare(out: np.ndarray, ref: np.ndarray, what: str, of_range: bool = False) -> None:
    """Within |a-b| <= 1e-4 + 1e-3 |b| elementwise, or (``of_range``, between two frameworks)
    within 1e-3 of the largest logit: with these weights Inception-v3 amplifies float32
    rounding so much that its float32 and float64 logits differ by ~4e-4 of the largest (torch
    measured), which makes an elementwise rule fail on near-zero logits."""
    diff = np.abs(out - ref)
    tolerance = (RTOL * np.abs(ref).max() if of_range else ATOL + RTOL * np.abs(ref))
    rel = float((diff / np.maximum(np.abs(ref), 1e-12)).max())
    spread = float(np.abs(ref[0] - ref[1]).max())
    print(f"\n{what}: max |a-b| {diff.max():.3g}, max rel {rel:.3g}, of the largest logit "
          f"{diff.max() / np.abs(ref).max():.3g} (|logit| <= {np.abs(ref).max():.3g}, the two "
          f"images' logits {spread:.3g} apart)")
    # a proof only where the logits depend on the image far beyond the tolerance
    assert spread > 10 * np.max(tolerance), what
    assert np.all(diff <= tolerance), what
    assert np.array_equal(out.argmax(1), ref.argmax(1)), what


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", list(PAIRS))
def test_keras_application_exact_in_cnnzoo(zoo, backends, name):
    """Keras' file -> cnnzoo reader + layout -> cnnzoo's Keras model = the Keras application;
    and the export back is what Keras' own Model.load_weights loads, unchanged."""
    t0 = time.perf_counter()
    z = zoo(name)
    weights = z.canonical()
    check_weights(weights, expected_shapes(z.spec, z.size), f"{name}'s weights")  # all placed
    backend = backends("keras")
    model = backend.build(z.spec, z.size)
    backend.set_weights(model, weights)
    _compare(backend.predict(model, z.images), z.logits,
             f"keras:{name} -> {z.spec.name} at {z.size} (Keras backend)")
    del model
    if name != "VGG19":  # (VGG16 proves the same path; 550 MB of files saved)
        _export_back(z, weights)
    if name.startswith("VGG"):  # 138M parameters each: keep memory low for the next tests
        z.model = None
        gc.collect()
    print(f"{name}: {z.build_s:.1f} s Keras, {time.perf_counter() - t0:.1f} s in all")


def _export_back(z: Zoo, weights: dict) -> None:
    """The canonical weights as a Keras .h5, loaded into the (zeroed) Keras model itself."""
    back = keras_layout.from_canonical(weights, z.spec, z.size)
    path = z.path.with_name(f"{z.name}_back.h5")
    keras_h5.write(path, back)
    assert list(keras_h5.read(path)) == list(back)
    for variable in z.model.weights:
        variable.assign(np.zeros(variable.shape, np.float32))
    z.model.load_weights(str(path))
    np.testing.assert_array_equal(z.run(z.model), z.logits)
    path.unlink()


@pytest.mark.parametrize("backend_name", sorted(set(usable_backends()) - {"keras"}))
def test_one_pair_in_every_backend(zoo, backends, backend_name):
    z = zoo(EVERY_BACKEND)
    backend = backends(backend_name)
    model = backend.build(z.spec, z.size)
    backend.set_weights(model, z.canonical())
    _compare(backend.predict(model, z.images), z.logits,
             f"keras:{EVERY_BACKEND} -> {z.spec.name} at {z.size} ({backend_name} backend)",
             of_range=True)


def test_variant_options_are_needed(zoo, backends):
    """Without its option the spec is another network than Keras': with the same weights its
    logits are far further from Keras' than float32 rounding takes the spec with the option."""
    backend = backends("torch")
    for name, option in (("InceptionV3", "count_include_pad"), ("Xception", "bn_eps")):
        z = zoo(name)
        default = architectures.build_spec(z.spec.name)
        assert default.analyze(z.size).params == z.spec.analyze(z.size).params
        diffs = []
        for spec in (z.spec, default):
            model = backend.build(spec, z.size)
            backend.set_weights(model, z.canonical())
            diffs.append(float(np.abs(backend.predict(model, z.images) - z.logits).max()))
        print(f"\n{name} without {option}: {diffs[1]:.3g} from Keras' logits, with: {diffs[0]:.3g}")
        assert diffs[1] > 10 * diffs[0], option


@pytest.mark.parametrize("name, why", [("ResNet50", "ResNet v1"),
                                       ("Xception", "pads its stride-2 max-pools 'same'")])
def test_the_networks_that_differ_at_their_trained_size_are_refused(name, why):
    with pytest.raises(WeightsError, match=why):
        catalog.find(f"keras:{name}")


def test_the_catalog_names_the_options_the_proofs_use():
    for name, (arch, _, options) in PAIRS.items():
        if name != "Xception":  # refused (above): the same only at sizes such as 71
            model = catalog.find(f"keras:{name}")
            assert (model.arch, model.options) == (arch, options)


# --------------------------------------------------------------------------- the reader
def test_read_keeps_the_files_order_and_names(zoo):
    z = zoo("InceptionV3")
    tensors = keras_h5.read(z.path)
    layers = [la.name for la in z.model.layers if la.weights]
    assert list(dict.fromkeys(k.rsplit("/", 1)[0] for k in tensors)) == layers
    conv, bn = layers[:2]  # the first of each (Keras' counters may have started elsewhere)
    assert list(tensors)[:4] == [f"{conv}/kernel", f"{bn}/beta", f"{bn}/moving_mean",
                                 f"{bn}/moving_variance"]  # scale=False: no gamma
    assert detect(z.path) == "h5"  # told from the bytes, read by this reader
    by_variable = {v.path: np.asarray(v) for v in z.model.weights}
    assert all(np.array_equal(tensors[k], by_variable[k]) for k in tensors)


@pytest.mark.parametrize("name", ["InceptionV3", "Xception"])
def test_whole_saved_model_and_keras3_weights_files(zoo, tmp_path, name):
    """Weights under ``model_weights`` (Model.save("x.h5")) and Keras 3's ``.weights.h5``
    (``layers/<class name>_<i>/vars/<j>``, its layers renamed) read to the same weights."""
    z = zoo(name)
    expected = z.canonical()
    whole = tmp_path / "whole.h5"
    with h5py.File(whole, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f.create_group("model_weights"), z.model)
    keras3 = tmp_path / "model.weights.h5"
    z.model.save_weights(str(keras3))
    for path in (whole, keras3):
        got = keras_layout.to_canonical(keras_h5.read(path), z.spec, z.size)
        assert list(got) == list(expected)
        assert all(np.array_equal(got[k], expected[k]) for k in expected), path.name


def test_keras1_weight_names(zoo, tmp_path):
    """Keras 1's files (the published VGG16/VGG19: ``block1_conv1_W_1:0``) read with Keras 2's
    names: the InceptionV3 file rewritten with Keras 1's names reads the same."""
    tensors = keras_h5.read(zoo("InceptionV3").path)
    keras1 = {"kernel": "W", "bias": "b", "moving_mean": "running_mean",
              "moving_variance": "running_std"}
    path = tmp_path / "keras1.h5"
    layers = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in tensors))
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in ["input_1", *layers]]
        f.create_group("input_1").attrs["weight_names"] = np.array([], "S1")
        for layer in layers:
            weights = [k.rsplit("/", 1)[1] for k in tensors if k.rsplit("/", 1)[0] == layer]
            names = [f"{layer}_{keras1.get(w, w)}_1:0" for w in weights]
            group = f.create_group(layer)
            group.attrs["weight_names"] = [n.encode() for n in names]
            for name, w in zip(names, weights):
                group[name] = tensors[f"{layer}/{w}"]
    back = keras_h5.read(path)
    assert list(back) == list(tensors)
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)


def test_write_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    # more layer names than one HDF5 attribute holds: Keras' chunked layer_names0, 1...
    tensors = {f"layer_with_a_long_name_{i:05d}/kernel": rng.standard_normal((2, 3)).astype(
        np.float32) for i in range(3000)}
    tensors["bn/moving_mean"] = np.arange(3, dtype=np.float64)
    path = tmp_path / "w.h5"
    keras_h5.write(path, tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.h5"]  # no temporary left over
    with h5py.File(path) as f:
        assert "layer_names" not in f.attrs and "layer_names1" in f.attrs
    back = keras_h5.read(path)
    assert list(back) == list(tensors)
    assert all(back[k].dtype == v.dtype and np.array_equal(back[k], v)
               for k, v in tensors.items())


# --------------------------------------------------------------------------- errors
def test_truncated_file(zoo, tmp_path):
    path = tmp_path / "truncated.h5"
    path.write_bytes(zoo("Xception").path.read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="damaged or truncated"):
        keras_h5.read(path)


def test_hdf5_that_is_not_keras_weights(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(WeightsError, match="not Keras weights"):
        keras_h5.read(path)


def test_file_of_another_architecture(zoo):
    z = zoo("Xception")
    spec = architectures.build_spec("inception_v3")
    with pytest.raises(WeightsError) as err:
        keras_layout.to_canonical(keras_h5.read(z.path), spec, 75)
    message = str(err.value)
    assert "another architecture" in message and "separable convolutions" in message
    assert "block2_sepconv1" in message and "... and" in message and "\n" not in message


def test_missing_extra_and_misshaped_layers(zoo):
    z = zoo("InceptionV3")
    tensors = keras_h5.read(z.path)
    missing = {k: v for k, v in tensors.items() if not k.startswith("predictions/")}
    with pytest.raises(WeightsError, match="dense layers with bias: 0 in the file, 1 in "
                                           "inception_v3; .* nothing in the file: fc"):
        keras_layout.to_canonical(missing, z.spec, z.size)
    extra = {**tensors, "surplus/kernel": np.zeros((3, 3, 2, 2), np.float32)}
    with pytest.raises(WeightsError, match="cannot be placed: surplus"):
        keras_layout.to_canonical(extra, z.spec, z.size)
    odd = {**tensors, "odd/moving_mean": np.zeros(3, np.float32)}
    with pytest.raises(WeightsError, match="odd/moving_mean"):
        keras_layout.to_canonical(odd, z.spec, z.size)
    misshaped = dict(tensors)
    second_conv = [k for k in tensors if k.endswith("/kernel")][1]
    misshaped[second_conv] = np.zeros((3, 3, 32, 31), np.float32)
    weights = keras_layout.to_canonical(misshaped, z.spec, z.size)  # shapes: load's job
    with pytest.raises(WeightsError, match=r"Conv2d_2a_3x3.conv/weight has shape \(31, 32"):
        check_weights(weights, expected_shapes(z.spec, z.size))


def test_classifier_of_another_class_count_is_placed(zoo):
    """A Keras model with 10 classes: its classifier is placed as it is (load drops it)."""
    z = zoo("InceptionV3")
    tensors = keras_h5.read(z.path)
    tensors["predictions/kernel"] = tensors["predictions/kernel"][:, :10]
    tensors["predictions/bias"] = tensors["predictions/bias"][:10]
    weights = keras_layout.to_canonical(tensors, z.spec, z.size)
    assert weights["fc/weight"].shape == (10, 2048) and weights["fc/bias"].shape == (10,)


# (VGG's Flatten head is AlexNet's and LeNet's, with 138M parameters)
@pytest.mark.parametrize("arch", [a for a in architectures.list_archs() if not a.startswith("vgg")])
def test_layout_round_trips_every_architecture(arch):
    """canonical -> Keras tensors -> canonical is the identity for every architecture (grouped
    and depthwise convolutions, Flatten heads, biases, batch norms with and without gamma)."""
    spec = architectures.build_spec(arch)
    size = spec.min_input_size()
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(shape).astype(np.float32)
               for k, shape in expected_shapes(spec, size).items()}
    bn = next((k for k in weights if k.endswith("running_var")), None)
    if bn is not None:  # a batch norm whose gamma is 1 is written without it
        gamma = bn.replace("running_var", "weight")
        weights[gamma] = np.ones_like(weights[gamma])
    back = keras_layout.to_canonical(keras_layout.from_canonical(weights, spec, size), spec, size)
    assert sorted(back) == sorted(weights)
    assert all(np.array_equal(back[k], weights[k]) for k in weights)


def test_from_canonical_names_what_is_missing(zoo):
    z = zoo("InceptionV3")
    weights = z.canonical()
    del weights["fc/bias"]
    with pytest.raises(WeightsError, match="fc/bias"):
        keras_layout.from_canonical(weights, z.spec, z.size)
