"""Gluon model-zoo weights without MXNet: ``gluon.model_zoo.vision``'s own models (alexnet,
vgg16, vgg19, inceptionv3) with random weights (batch norms' four vectors randomised too) are
saved by Gluon itself, read back by cnnzoo's numpy reader and the Gluon layout, loaded into
cnnzoo's models, and give Gluon's logits on the same images; export back loads into Gluon; the
reader refuses damaged and foreign files; the zoo's other networks are refused by the catalog."""
import os
import shutil
import time

import numpy as np
import pytest

from runners.mxnet.compat import patch_mxnet

patch_mxnet()  # before MXNet is imported, as the backend does

import mxnet as mx  # noqa: E402
from mxnet.gluon.model_zoo import vision  # noqa: E402

import architectures  # noqa: E402
from cnnzoo.app.experiment import compose  # noqa: E402
from cnnzoo.core.backend import backend_info, usable_backends  # noqa: E402
from cnnzoo.core.errors import WeightsError  # noqa: E402
from cnnzoo.core.weights import expected_shapes  # noqa: E402
from cnnzoo.core.zoo import catalog, gluon_layout  # noqa: E402
from cnnzoo.core.zoo.files import detect  # noqa: E402
from cnnzoo.core.zoo.formats import gluon_params  # noqa: E402

ATOL, RTOL = 1e-4, 1e-3


# --------------------------------------------------------------------------- helpers
def gluon_model(name: str, size: int, seed: int):
    """A zoo model with random weights from a seeded numpy generator, batch norms' four vectors
    included (a fresh batch norm is the identity, which hides mistakes)."""
    net = vision.get_model(name, pretrained=False)
    for param in net.collect_params().values():  # drawn below, faster than MXNet draws
        param.initialize(mx.init.Zero())  # (an init given here overrides VGG's own)
    net(mx.nd.zeros((1, 3, size, size)))  # deferred shapes: known after a first forward
    rng = np.random.default_rng(seed)
    for pname, param in net.collect_params().items():
        param.set_data(mx.nd.array(_draw(rng, pname, param.shape)))
    return net


def _draw(rng, pname: str, shape) -> np.ndarray:
    u = rng.random(shape, dtype=np.float32) * 2 - 1  # U(-1, 1)
    if pname.endswith(("_gamma", "_running_var")):
        return 1 + 0.5 * u
    if pname.endswith(("_beta", "_running_mean", "_bias")):
        return 0.1 * u
    return u * np.float32(np.sqrt(6 / np.prod(shape[1:])))  # He: activations keep their scale


def images(size: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)


def gluon_logits(net, x: np.ndarray) -> np.ndarray:
    return net(mx.nd.array(x)).asnumpy()  # outside autograd.record: inference mode


def cnnzoo_logits(backend_name: str, spec, size, weights, x, tmp) -> np.ndarray:
    backend = backend_info(backend_name).load()(
        compose(f"backend={backend_name}", "hardware=cpu"), tmp)
    model = backend.build(spec, size)
    backend.set_weights(model, weights)
    return backend.predict(model, x)


def assert_same_logits(pair: str, ours: np.ndarray, theirs: np.ndarray, seconds: float) -> None:
    diff = np.abs(ours - theirs)
    rel = diff.max() / np.abs(theirs).max()
    print(f"\n{pair}: max |logit diff| {diff.max():.3g}, relative to max |logit| "
          f"({np.abs(theirs).max():.3g}) {rel:.3g}, {seconds:.1f} s")
    assert np.all(np.isfinite(ours)) and np.ptp(theirs) > 0.1  # logits that tell things apart
    assert np.all(diff <= ATOL + RTOL * np.abs(theirs)), pair
    assert (ours.argmax(1) == theirs.argmax(1)).all(), pair


def prove(tmp_path, zoo_name: str, arch: str, size: int, seed: int) -> None:
    """The whole proof for one (architecture, zoo model) pair, freed when it returns."""
    t0 = time.perf_counter()
    net = gluon_model(zoo_name, size, seed)
    x = images(size)
    theirs = gluon_logits(net, x)
    path = tmp_path / f"{zoo_name}.params"
    net.save_parameters(str(path))
    del net
    spec = architectures.build_spec(arch)
    weights = gluon_layout.to_canonical(gluon_params.read(path), spec, size)
    path.unlink()
    ours = cnnzoo_logits("mxnet", spec, size, weights, x, tmp_path)
    assert_same_logits(f"gluon:{zoo_name} -> {arch} (mxnet, {size}px)", ours, theirs,
                       time.perf_counter() - t0)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def alexnet(tmp_path_factory):
    """Gluon's alexnet: its file in both name forms, its logits, its canonical weights."""
    folder = tmp_path_factory.mktemp("gluon-alexnet")
    net = gluon_model("alexnet", 224, seed=1)
    x = images(224)
    files = {"structural": folder / "structural.params", "prefixed": folder / "prefixed.params"}
    net.save_parameters(str(files["structural"]))
    net.collect_params().save(str(files["prefixed"]), strip_prefix=net.prefix)  # zoo files'
    spec = architectures.build_spec("alexnet")
    weights = gluon_layout.to_canonical(gluon_params.read(files["structural"]), spec, 224)
    yield {"x": x, "logits": gluon_logits(net, x), "files": files, "spec": spec,
           "weights": weights}
    shutil.rmtree(folder)  # 0.5 GB that pytest would keep for three runs


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """Gluon's inceptionv3 (nested scopes, batch norms): its files and logits."""
    folder = tmp_path_factory.mktemp("gluon-inception")
    net = gluon_model("inceptionv3", 299, seed=2)
    x = images(299)
    files = {"structural": folder / "structural.params", "prefixed": folder / "prefixed.params",
             "full prefix": folder / "full-prefix.params"}
    net.save_parameters(str(files["structural"]))
    net.collect_params().save(str(files["prefixed"]), strip_prefix=net.prefix)
    net.collect_params().save(str(files["full prefix"]))  # inception30_conv0_weight ...
    yield {"x": x, "logits": gluon_logits(net, x), "files": files,
           "spec": architectures.build_spec("inception_v3")}
    shutil.rmtree(folder)


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("form", ["structural", "prefixed"])
def test_alexnet_from_either_name_form_gives_gluons_logits(alexnet, form, tmp_path):
    t0 = time.perf_counter()
    tensors = gluon_params.read(alexnet["files"][form])
    weights = gluon_layout.to_canonical(tensors, alexnet["spec"], 224)
    ours = cnnzoo_logits("mxnet", alexnet["spec"], 224, weights, alexnet["x"], tmp_path)
    assert_same_logits(f"gluon:alexnet ({form} names) -> alexnet (mxnet, 224px)", ours,
                       alexnet["logits"], time.perf_counter() - t0)


@pytest.mark.parametrize("backend_name", usable_backends())
def test_alexnet_gives_gluons_logits_in_every_backend(alexnet, backend_name, tmp_path):
    t0 = time.perf_counter()
    ours = cnnzoo_logits(backend_name, alexnet["spec"], 224, alexnet["weights"], alexnet["x"],
                         tmp_path)
    assert_same_logits(f"gluon:alexnet -> alexnet ({backend_name}, 224px)", ours,
                       alexnet["logits"], time.perf_counter() - t0)


def test_inception_v3_gives_gluons_logits(inception, tmp_path):
    # Gluon's Inception3 is torchvision's network: batch norm eps 1e-3, 3x3/1 average pools
    # counting the padding (MXNet's default, as PyTorch's), no auxiliary classifier, and
    # AvgPool(8) at 299 px is the global pool
    t0 = time.perf_counter()
    tensors = gluon_params.read(inception["files"]["structural"])
    weights = gluon_layout.to_canonical(tensors, inception["spec"], 299)
    ours = cnnzoo_logits("mxnet", inception["spec"], 299, weights, inception["x"], tmp_path)
    assert_same_logits("gluon:inceptionv3 -> inception_v3 (mxnet, 299px)", ours,
                       inception["logits"], time.perf_counter() - t0)


@pytest.fixture
def zero_init(monkeypatch):
    """cnnzoo's MXNet model built without drawing its initial weights (VGG's 138 M draws
    dominate the test): set_weights replaces every one (or refuses), and a weight left out
    would show in the logits."""
    import runners.mxnet.model as model

    monkeypatch.setattr(model, "initialize",
                        lambda mx, net, init: net.initialize(mx.init.Zero(), ctx=mx.cpu()))


@pytest.mark.parametrize("zoo_name, arch", [("vgg16", "vgg16"), ("vgg19", "vgg19")])
def test_vgg_gives_gluons_logits(zoo_name, arch, tmp_path, zero_init):
    # Gluon's VGG flattens the 7x7 maps into its first Dense: 224 px, where cnnzoo's adaptive
    # 7x7 pool is the identity
    prove(tmp_path, zoo_name, arch, 224, seed=3)


# --------------------------------------------------------------------------- name forms, order
def test_every_name_form_and_a_lost_order_give_the_same_weights(inception):
    spec = inception["spec"]
    reference = gluon_layout.to_canonical(
        gluon_params.read(inception["files"]["structural"]), spec, 299)
    rng = np.random.default_rng(0)
    for form, path in inception["files"].items():
        tensors = gluon_params.read(path)
        items = list(tensors.items())
        shuffled = dict(items[i] for i in rng.permutation(len(items)))  # a Python 2 dict's
        mx_names = ["arg:" + k if i % 2 else "aux:" + k for i, k in enumerate(tensors)]
        renamed = dict(zip(mx_names, tensors.values()))  # a Module checkpoint's names
        for variant in (tensors, shuffled, renamed):
            weights = gluon_layout.to_canonical(variant, spec, 299)
            assert weights.keys() == reference.keys(), form
            assert all(np.array_equal(weights[k], reference[k]) for k in reference), form


def test_a_classifier_of_another_class_count_is_left_to_load(alexnet):
    spec = architectures.build_spec("alexnet", num_classes=10)
    weights = gluon_layout.to_canonical(gluon_params.read(alexnet["files"]["structural"]),
                                        spec, 224)
    assert weights["fc3/weight"].shape == (1000, 4096)  # load.py drops it


# --------------------------------------------------------------------------- export back
def test_export_back_loads_into_gluon_with_gluons_logits(alexnet, inception, tmp_path):
    for name, model, size in (("alexnet", alexnet, 224), ("inceptionv3", inception, 299)):
        spec = model["spec"]
        weights = gluon_layout.to_canonical(gluon_params.read(model["files"]["structural"]),
                                            spec, size)
        out = tmp_path / f"{name}.params"
        gluon_params.write(out, gluon_layout.from_canonical(weights, spec, size))
        assert list(mx.nd.load(str(out))) == list(gluon_params.read(
            model["files"]["structural"]))  # Gluon's own names, in Gluon's order
        fresh = vision.get_model(name, pretrained=False)
        fresh.load_parameters(str(out))  # every parameter, exactly once (no allow_missing)
        np.testing.assert_array_equal(gluon_logits(fresh, model["x"]), model["logits"])
        out.unlink()


@pytest.mark.parametrize("zoo_name, arch, size", [
    ("alexnet", "alexnet", 224), ("vgg16", "vgg16", 224), ("vgg19", "vgg19", 224),
    ("inceptionv3", "inception_v3", 299)])
def test_export_back_names_are_the_gluon_models_own(zoo_name, arch, size):
    spec = architectures.build_spec(arch)
    placeholders = dict.fromkeys(expected_shapes(spec, size))
    ours = gluon_layout.from_canonical(placeholders, spec, size)
    # the structural names save_parameters writes, in its order (no weights needed)
    assert list(ours) == list(vision.get_model(zoo_name)._collect_params_with_prefix())


def test_export_back_refuses_what_gluon_has_no_model_of():
    with pytest.raises(WeightsError, match="no model of resnet50"):
        gluon_layout.from_canonical({}, architectures.build_spec("resnet50"), 224)
    spec = architectures.build_spec("inception_v3", aux_logits=True)
    with pytest.raises(WeightsError, match="not the Gluon zoo's model"):
        gluon_layout.from_canonical({}, spec, 299)


# --------------------------------------------------------------------------- the file format
def test_writer_round_trips_exactly_and_mxnet_reads_it(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"features.0.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
               "half": rng.standard_normal((5,)).astype(np.float16),
               "double": rng.standard_normal((2, 3)),
               "count": np.arange(6, dtype=np.int64).reshape(3, 2),
               "bytes": np.arange(4, dtype=np.uint8)}
    path = tmp_path / "x.params"
    gluon_params.write(path, tensors)
    back = gluon_params.read(path)
    assert list(back) == list(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    loaded = mx.nd.load(str(path))
    assert list(loaded) == list(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and np.array_equal(loaded[k].asnumpy(), v), k
    assert detect(path) == "params"
    # the same bytes as MXNet's own writer
    theirs = tmp_path / "mx.params"
    mx.nd.save(str(theirs), {k: mx.nd.array(v, dtype=v.dtype) for k, v in tensors.items()})
    assert theirs.read_bytes() == path.read_bytes()


def test_an_unnamed_list_and_an_older_array_format_are_read(tmp_path):
    path = tmp_path / "list.params"
    mx.nd.save(str(path), [mx.nd.ones((2, 2)), mx.nd.zeros((3,))])
    assert {k: v.shape for k, v in gluon_params.read(path).items()} == {"0": (2, 2), "1": (3,)}
    # v1 (magic 0xF993FAC8: no storage type) and the first format (no magic, uint32 dims)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    head = np.array([0x112, 0, 2], "<u8").tobytes()
    v1 = np.array([0xF993FAC8, 2], "<u4").tobytes() + np.array([2, 3], "<i8").tobytes()
    first = np.array([2, 2, 3], "<u4").tobytes()
    tail = np.array([1, 0, 0], "<i4").tobytes() + a.tobytes()
    names = np.array([2], "<u8").tobytes() + b"".join(
        np.array([len(n)], "<u8").tobytes() + n for n in (b"v1", b"v0"))
    old = tmp_path / "old.params"
    old.write_bytes(head + v1 + tail + first + tail + names)
    back = gluon_params.read(old)
    assert np.array_equal(back["v1"], a) and np.array_equal(back["v0"], a)
    assert np.array_equal(mx.nd.load(str(old))["v0"].asnumpy(), a)  # MXNet agrees
    # v3 (magic 0xF993FACA): saved under numpy shape semantics, where 0-d arrays exist
    v3 = tmp_path / "np.params"
    with mx.util.np_shape(True), mx.util.np_array(True):
        mx.npx.save(str(v3), {"a": mx.np.ones((2, 3)), "s": mx.np.array(3.5)})
    back = gluon_params.read(v3)
    assert back["a"].shape == (2, 3) and back["s"].shape == () and back["s"] == 3.5


@pytest.fixture
def small_file(tmp_path):
    """A small file as MXNet writes it: names, a float16 and a 4-d array."""
    path = tmp_path / "small.params"
    mx.nd.save(str(path), {"features.0.weight": mx.nd.ones((2, 3, 3, 3)),
                           "features.0.bias": mx.nd.array([1, 2], dtype="float16")})
    return path


def test_a_truncated_file_is_refused_wherever_it_ends(small_file, tmp_path):
    data = small_file.read_bytes()
    cut = tmp_path / "cut.params"
    for end in range(len(data)):  # in every field: magic, counts, shape, data, names
        cut.write_bytes(data[:end])
        with pytest.raises(WeightsError, match="ends early .* truncated"):
            gluon_params.read(cut)


def test_a_foreign_or_damaged_file_is_refused(small_file, tmp_path):
    npz = tmp_path / "w.npz"
    np.savez(npz, a=np.zeros(3))
    with pytest.raises(WeightsError, match="not an MXNet .params file"):
        gluon_params.read(npz)
    data = small_file.read_bytes()
    damaged = tmp_path / "damaged.params"
    damaged.write_bytes(data[:24] + b"\x00\x01\x02\x03" + data[28:])  # the 1st array's magic
    with pytest.raises(WeightsError, match="not a valid MXNet .params file .* damaged"):
        gluon_params.read(damaged)
    damaged.write_bytes(data + b"junk")
    with pytest.raises(WeightsError, match="4 bytes after the last name"):
        gluon_params.read(damaged)


# --------------------------------------------------------------------------- the layout's errors
def test_a_file_of_another_architecture_is_refused(alexnet):
    tensors = gluon_params.read(alexnet["files"]["structural"])
    with pytest.raises(WeightsError, match=r"5 convolutions in the file, 13 in vgg16.*"
                                           r"Gluon model zoo's file of vgg16"):
        gluon_layout.to_canonical(tensors, architectures.build_spec("vgg16"), 224)


def test_missing_extra_and_mis_shaped_tensors_are_named(alexnet):
    spec = alexnet["spec"]
    tensors = gluon_params.read(alexnet["files"]["structural"])
    missing = {k: v for k, v in tensors.items() if k != "features.4.bias"}
    with pytest.raises(WeightsError, match=r"parameters with nothing in the file: conv3/bias"):
        gluon_layout.to_canonical(missing, spec, 224)
    extra = {**tensors, "features.0.scale": np.ones(64, np.float32), "step": np.zeros(1)}
    with pytest.raises(WeightsError, match=r"cannot be placed: features\.0\.scale, step"):
        gluon_layout.to_canonical(extra, spec, 224)
    shaped = {**tensors, "features.2.weight": np.zeros((192, 64, 3, 3), np.float32)}
    with pytest.raises(WeightsError, match=r"features\.2\.weight \(192, 64, 3, 3\) for "
                                           r"conv2/weight \(192, 64, 5, 5\)"):
        gluon_layout.to_canonical(shaped, spec, 224)
    many = {k: v for k, v in tensors.items() if not k.startswith("features.")}
    with pytest.raises(WeightsError, match=r"\.\.\. and 10 more"):
        gluon_layout.to_canonical(many, spec, 224)


# --------------------------------------------------------------------------- the catalog
@pytest.mark.parametrize("name, why", [("gluon:resnet50_v1", "stride in the first 1x1"),
                                       ("gluon:resnet50_v2", "pre-activation")])
def test_the_zoos_other_resnets_are_refused(name, why):
    with pytest.raises(WeightsError, match=f"{name} is not offered: .*{why}"):
        catalog.find(name)


def test_catalog_files_and_checksums_are_the_model_stores():
    from mxnet.gluon.model_zoo import model_store

    for m in catalog.MODELS:
        if m.zoo != "gluon":
            continue
        sha1 = model_store._model_sha1[m.name]
        assert m.checksum == f"sha1:{sha1}", m.name
        assert m.url == model_store._url_format.format(
            repo_url=model_store.apache_repo_url, file_name=f"{m.name}-{sha1[:8]}"), m.name
        vision.get_model(m.name)  # the zoo's name for it, as users type it
        assert m.input_size == (299 if "inception" in m.name else 224)


def test_no_framework_is_imported_by_the_reader_and_layout():
    import subprocess
    import sys
    code = ("import sys; import cnnzoo.core.zoo.gluon_layout, cnnzoo.core.zoo.formats."
            "gluon_params; print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'mxnet', "
            "'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), check=True)
    assert out.stdout.strip() == "[]"
