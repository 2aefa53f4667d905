"""Weight transfer between backends through the spec's layer names (``cnnzoo.core.weights``,
``Backend.get_weights``/``set_weights``) and ``task=verify``, the cross-framework matrix: one
set of weights, every backend native and in onnxruntime, every pair compared."""
import json

import numpy as np
import pytest
from conftest import compose_cfg, toy_spec

import architectures
from cnnzoo.app.crosscheck import randomize_batch_norm, shared_weights
from cnnzoo.app.validate import validate
from cnnzoo.core.backend import load_backend, usable_backends
from cnnzoo.core.errors import ConfigError
from cnnzoo.core.weights import (
    WeightsError,
    check_weights,
    expected_shapes,
    load_weights,
    save_weights,
)

BACKENDS = ("torch", "keras", "mxnet")
# what task=verify compares: every installed backend, the reference (torch) first
VERIFIED = ("torch", *sorted(set(usable_backends()) - {"torch"}))


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("verify")
    return {n: load_backend(n)(compose_cfg(f"backend={n}", "hardware=cpu"), run_dir)
            for n in BACKENDS}


def random_weights(spec, size, seed=0) -> dict[str, np.ndarray]:
    """Arbitrary (not initial) canonical weights: every array drawn, running variances > 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in expected_shapes(spec, size).items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        out[key] = (np.abs(value) + 0.5 if key.endswith("running_var") else value).astype(
            np.float32)
    return out


def images(spec, size, n=4, seed=1):
    return np.random.default_rng(seed).standard_normal(
        (n, spec.in_channels, size, size)).astype(np.float32)


# --------------------------------------------------------------------------- the layout
def test_expected_shapes_are_pytorchs_layouts():
    shapes = expected_shapes(toy_spec(), 32)
    assert shapes["stem.conv/weight"] == (16, 3, 3, 3) and "stem.conv/bias" not in shapes
    assert shapes["res.grouped/weight"] == (24, 6, 3, 3)        # I = in / groups
    assert shapes["sep.depthwise/weight"] == (24, 1, 3, 3)
    assert shapes["mixed.b2b/weight"] == (12, 8, 1, 3)          # OIHW, a (1, 3) kernel
    assert shapes["fc/weight"] == (5, 32) and shapes["fc/bias"] == (5,)
    assert [k for k in shapes if k.startswith("stem.bn/")] == [
        "stem.bn/weight", "stem.bn/bias", "stem.bn/running_mean", "stem.bn/running_var"]
    # the parameter count of the spec is the weights' size without the running statistics
    learnable = sum(int(np.prod(s)) for k, s in shapes.items() if "running" not in k)
    assert learnable == toy_spec().analyze(32).params


def test_npz_round_trip(tmp_path):
    spec = toy_spec()
    weights = random_weights(spec, 32)
    path = tmp_path / "w.npz"
    save_weights(path, weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npz"]  # no temporary left over
    loaded = load_weights(path)
    assert list(loaded) == list(weights)
    assert all(loaded[k].dtype == np.float32 and np.array_equal(loaded[k], weights[k])
               for k in weights)


def test_npz_with_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"fc/weight": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_weights(path)
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_weights(tmp_path / "missing.npz")


def test_one_error_names_missing_unexpected_and_misshaped_keys():
    spec = toy_spec()
    weights = random_weights(spec, 32)
    del weights["fc/bias"]
    weights["fc/weight"] = weights["fc/weight"].T
    weights["stem.bn/extra"] = np.zeros(16, np.float32)
    weights["stem.bn/running_var"] = weights["stem.bn/running_var"].astype(np.int64)
    with pytest.raises(WeightsError) as info:
        check_weights(weights, expected_shapes(spec, 32))
    text = str(info.value)
    assert "missing 1 key(s): fc/bias" in text
    assert "unexpected 1 key(s): stem.bn/extra" in text
    assert "fc/weight has shape (32, 5), expected (5, 32)" in text
    assert "stem.bn/running_var has dtype int64, expected floating point" in text


# --------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("name", BACKENDS)
def test_get_set_round_trip_gives_identical_outputs(backends, name):
    b, spec = backends[name], toy_spec()
    source = b.build(spec, 17)
    b.set_weights(source, random_weights(spec, 17))
    weights = b.get_weights(source)
    assert list(weights) == list(expected_shapes(spec, 17))
    assert all(w.dtype == np.float32 for w in weights.values())
    fresh = b.build(spec, 17)
    b.set_weights(fresh, weights)
    x = images(spec, 17)
    assert np.array_equal(b.predict(fresh, x), b.predict(source, x))
    again = b.get_weights(fresh)
    assert all(np.array_equal(again[k], weights[k]) for k in weights)
    weights["fc/bias"][:] += 1.0  # copies: the model is not changed through them
    assert not np.array_equal(b.get_weights(source)["fc/bias"], weights["fc/bias"])


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_weights_raise_one_error_and_change_nothing(backends, name):
    b, spec = backends[name], toy_spec()
    model = b.build(spec, 32)
    before = b.get_weights(model)
    bad = random_weights(spec, 32)
    bad["sep.depthwise/weight"] = bad["sep.depthwise/weight"][:, :, :2]
    del bad["stem.bn/running_mean"]
    with pytest.raises(WeightsError, match=r"(?s)missing 1 key\(s\): stem.bn/running_mean.*"
                                           r"sep.depthwise/weight has shape \(24, 1, 2, 3\)"):
        b.set_weights(model, bad)
    after = b.get_weights(model)
    assert all(np.array_equal(after[k], before[k]) for k in before)


# --------------------------------------------------------------------------- across backends
CROSS = [("toy", 32), ("toy", 17), ("lenet5", 32), ("inception_v1", 32),
         ("resnext50", 32),   # grouped 3x3 convolutions
         ("xception", 32)]    # depthwise convolutions (Keras' DepthwiseConv2D kernel layout)


@pytest.mark.parametrize("arch, size", CROSS)
def test_weights_from_torch_and_from_keras_give_the_same_logits(backends, arch, size):
    spec = toy_spec() if arch == "toy" else architectures.build_spec(arch, num_classes=10)
    models = {n: b.build(spec, size) for n, b in backends.items()}
    x = images(spec, size)

    def logits_everywhere(weights):
        for n, b in backends.items():
            b.set_weights(models[n], weights)
        return {n: b.predict(models[n], x) for n, b in backends.items()}

    # torch's own init (batch norm randomised) into keras and mxnet
    out = logits_everywhere(randomize_batch_norm(
        backends["torch"].get_weights(models["torch"]), seed=3))
    scale = float(np.abs(out["torch"]).max())
    assert scale > 1e-3  # the comparison is not between two nearly-zero outputs
    for n in ("keras", "mxnet"):
        np.testing.assert_allclose(out[n], out["torch"], atol=1e-4, rtol=1e-3, err_msg=n)
        assert (out[n].argmax(1) == out["torch"].argmax(1)).all()
    # a fresh Keras model's own init (Glorot, another layout) into mxnet and torch
    fresh = backends["keras"].build(spec, size)
    out = logits_everywhere(randomize_batch_norm(backends["keras"].get_weights(fresh), seed=4))
    for n in ("mxnet", "torch"):
        np.testing.assert_allclose(out[n], out["keras"], atol=1e-4, rtol=1e-3, err_msg=n)


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, message", [
    ("verify.backends=[torch,caffe]", "verify.backends: backend 'caffe' is not installed"),
    ("verify.reference=mxnet", None),  # fine: mxnet is among the backends
    ("verify.backends=[keras,mxnet]", "verify.reference='torch' is not one of verify.backends"),
    ("verify.backends=[torch,torch]", "verify.backends=['torch', 'torch'] is invalid"),
    ("verify.archs=[lenet5,lenet6]", "verify.archs: unknown architecture 'lenet6'"),
    ("verify.archs=googlenet", None),  # one name (an alias) is a list of one
    ("verify.archs=[]", "verify.archs=[] is invalid"),
    ("verify.archs=1", "verify.archs=1 is invalid"),
    ("verify.atol=-1", "verify.atol=-1 is invalid"),
    ("verify.input_size=0", "verify.input_size=0 is invalid"),
])
def test_verify_settings_are_validated(override, message):
    cfg = compose_cfg("task=verify", override)
    if message is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        validate(cfg)


def test_weights_file_is_checked_against_the_architecture(tmp_path):
    spec = architectures.build_spec("lenet5", 10)
    path = tmp_path / "lenet.npz"
    weights = random_weights(spec, 32)
    weights["f6/weight"] = weights["f6/weight"][:, :100]
    save_weights(path, weights)
    cfg = compose_cfg("task=verify", f"verify.weights={path}")
    with pytest.raises(ConfigError, match=r"f6/weight has shape \(84, 100\), expected \(84, 120\)"):
        shared_weights(cfg, spec, 32)
    with pytest.raises(ConfigError, match="verify.weights is set but verify.archs is not null"):
        validate(compose_cfg("task=verify", f"verify.weights={path}", "verify.archs=all"))


# --------------------------------------------------------------------------- task=verify
def _report(run_dir) -> dict:
    return json.loads((run_dir / "verification.json").read_text())


@pytest.mark.slow
def test_verify_lenet5_passes_in_every_backend_and_onnx(cli, tmp_path):
    """With the weights of a Caffe model (the README's ``verify.weights=<run>/deploy.prototxt``),
    read into every backend."""
    from export.caffe import files
    from export.caffe.writer import build_net

    spec = architectures.build_spec("lenet5", num_classes=10, in_channels=1)
    net, layers = build_net(spec, random_weights(spec, 32), 32)
    caffe = files.write(tmp_path, net, layers, {"output": spec.output}, "test")
    r = cli("task=verify", "arch=lenet5", f"verify.weights={caffe['prototxt']}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = _report(r.run_dir)
    assert report["passed"] and report["reference"] == "torch"
    assert report["weights"] == str(caffe["prototxt"])
    rows = report["rows"]
    assert [(x["arch"], x["backend"]) for x in rows] == [("lenet5", b) for b in VERIFIED]
    for row in rows:
        assert row["passed"] and row["native_params"] == row["spec_params"] == 61_706
        assert row["onnx_vs_native"]["passed"] and row["opset"] == 18
        assert row["reference"] or row["native_vs_reference"]["passed"]
        assert row["onnx_vs_native"]["max_abs_diff"] < 1e-5
    markdown = (r.run_dir / "verification.md").read_text()
    assert "| lenet5 | 32 | keras | 61,706 | 61,706 | " in markdown
    assert r.results()["status"] == "ok" and r.results()["task"] == "verify"
    assert {"torch", "tensorflow", "keras", "mxnet", "onnx"} <= r.frameworks


@pytest.mark.slow
def test_zero_tolerance_fails_and_names_the_pair(cli, tmp_path):
    # a neutral weights file, as another framework would have written it
    spec = architectures.build_spec("lenet5", 10)
    path = tmp_path / "lenet5.npz"
    save_weights(path, random_weights(spec, 32, seed=7))
    r = cli("task=verify", "arch=lenet5", f"verify.weights={path}", "verify.atol=0",
            "verify.rtol=0")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: cross-framework verification failed:" in r.stderr
    assert any(line.startswith("error: lenet5 keras: native vs torch native: max abs diff")
               for line in r.error_lines), r.error_lines
    report = _report(r.run_dir)
    assert not report["passed"] and report["weights"] == str(path)
    assert report["failures"] == [ln[len("error: "):] for ln in r.error_lines[1:]]
    assert r.results()["status"] == "verification_failed"


@pytest.mark.slow
def test_matrix_over_two_architectures(cli):
    r = cli("task=verify", "verify.archs=[lenet5,resnet50]", "verify.input_size=1")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _report(r.run_dir)["rows"]
    assert [(x["arch"], x["input_size"], x["backend"]) for x in rows] == [
        (a, s, b) for a, s in (("lenet5", 32), ("resnet50", 1)) for b in VERIFIED]
    table = [ln for ln in (r.run_dir / "verification.md").read_text().splitlines()
             if ln.startswith("| ") and not ln.startswith("| architecture")]
    assert len(table) == 2 * len(VERIFIED) and all(ln.endswith("| pass |") for ln in table)
    assert table[len(VERIFIED)].startswith(
        "| resnet50 | 1 | torch | 23,528,522 | 23,528,522 | reference |")
    assert all(not p.name.endswith(".onnx") for p in r.run_dir.iterdir())  # keep_onnx=false
