"""Weights from torchvision and timm, read without their frameworks: the torch file formats
(zip and legacy ``.pth``, ``.safetensors``) and the names of ``cnnzoo.core.zoo.torch_layout``,
proven against the zoos' own models: each zoo model, built with seeded random weights and
saved by the zoo's own writer, gives the same logits as cnnzoo's network with the weights read
from that file (``zoo_reference.py`` builds the references in a process of their own)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_cfg
from zoo_reference import INSTALL, PAIRS, pair_id

import architectures
from cnnzoo.core.backend import load_backend, usable_backends
from cnnzoo.core.errors import WeightsError
from cnnzoo.core.weights import check_weights, expected_shapes
from cnnzoo.core.zoo import torch_layout
from cnnzoo.core.zoo.formats import safetensors, torch_pickle
from runners.torch.model import SpecModule

REF = ROOT / ".zoo-ref"
# largest |cnnzoo - zoo| over the largest |zoo logit|. Both in NCHW, the same kernels in the same
# order give the same bits (measured: 0; timm's VGG runs its dense layers as convolutions: 1.4e-6).
# cnnzoo's channels-last default and the other frameworks round otherwise (measured: 1e-5)
RTOL, RTOL_OTHER_KERNELS = 1e-5, 2e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """torch on one thread in this file, as in ``zoo_reference.py``: the inputs are tiny, and
    beside the other test worker a second OpenMP thread spins more than it computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _odd_tensors() -> OrderedDict:
    """What a state dict can hold: views with offsets and strides into a shared storage, 0-d
    and empty tensors, half, bfloat16, double and integer dtypes."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return OrderedDict(
        transposed=base.t(), window=base[1:3, 2:5], strided=base[:, ::2], whole=base,
        scalar=torch.tensor(2.5), empty=torch.zeros(0, 3), half=torch.linspace(-2, 2, 5).half(),
        bf16=torch.linspace(-3, 3, 7).bfloat16(), double=torch.randn(2, 3, dtype=torch.float64),
        count=torch.tensor(17), ints=torch.arange(-3, 3, dtype=torch.int32),
        flags=torch.tensor([True, False]))


def _numpy(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


# --------------------------------------------------------------------------- torch files
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_torch_files_read_as_torch_reads_them(tmp_path, legacy, wrapper):
    tensors = _odd_tensors()
    obj = tensors if wrapper is None else {
        wrapper: OrderedDict((f"module.{k}", v) for k, v in tensors.items()), "epoch": 3,
        "optimizer": {"lr": 0.1}}
    path = tmp_path / "w.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert path.read_bytes()[:2] == (b"\x80\x02" if legacy else b"PK")
    read = torch_pickle.read(path)
    assert list(read) == list(tensors)  # the file's order, DataParallel's prefix gone
    for name, t in tensors.items():
        assert read[name].shape == tuple(t.shape) and read[name].flags.c_contiguous, name
        assert read[name].dtype == _numpy(t).dtype and np.array_equal(read[name], _numpy(t)), name
    read["window"][0, 0] = -1  # views of one storage are copies: they never alias
    assert read["whole"][1, 2] == 8


def test_parameters_of_a_module_read_too(tmp_path):
    """A checkpoint that kept nn.Parameters (``state_dict(keep_vars=True)``)."""
    net = torch.nn.Linear(3, 2)
    torch.save(net.state_dict(keep_vars=True), tmp_path / "p.pth")
    read = torch_pickle.read(tmp_path / "p.pth")
    assert np.array_equal(read["weight"], net.weight.detach().numpy())


class _Runs:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("call", [os.system, eval], ids=["os.system", "builtins.eval"])
def test_a_file_that_would_run_code_is_refused_before_it_runs(tmp_path, legacy, call):
    marker = tmp_path / "ran"
    code = f"touch {marker}" if call is os.system else f"open({str(marker)!r}, 'w')"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "x": _Runs(call, code)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(WeightsError, match=rf"would run code \({call.__module__}\."
                                           rf"{call.__name__}\): not a weights file"):
        torch_pickle.read(path)
    assert not marker.exists()


def _patched_pickle(path: Path, old: bytes, new: bytes) -> Path:
    """The zip ``path`` with ``old`` replaced by ``new`` in its data.pkl."""
    out = path.with_name("patched.pth")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data.replace(old, new) if info.filename.endswith(".pkl") else data)
    return out


def test_a_view_past_its_storage_and_a_truncated_storage_are_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch_pickle.write(path, {"w": np.arange(6, dtype=np.float32)})
    # size (6,) -> (7,): one element past the storage's end, never read from memory
    too_long = _patched_pickle(path, b"(K\x06t", b"(K\x07t")
    with pytest.raises(WeightsError, match=r"reaches past its storage of 6 elements"):
        torch_pickle.read(too_long)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "short.pth", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:8] if info.filename.endswith("data/0") else data)
    with pytest.raises(EOFError, match="6 elements has 8 bytes"):
        torch_pickle.read(tmp_path / "short.pth")
    (tmp_path / "model.pth").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(WeightsError, match="not a torch file"):
        torch_pickle.read(tmp_path / "model.pth")


def test_a_saved_model_or_a_file_without_tensors_is_refused(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "none.pth")
    with pytest.raises(WeightsError, match="without tensors"):
        torch_pickle.read(tmp_path / "none.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="a torch file of list, not of a state dict"):
        torch_pickle.read(tmp_path / "list.pth")


def test_written_files_are_what_torch_load_reads_weights_only(tmp_path):
    tensors = {k: _numpy(v).copy() for k, v in _odd_tensors().items()}
    tensors["fortran"] = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    path = tmp_path / "w.pth"
    torch_pickle.write(path, tensors)
    for mmap in (False, True):  # mmap needs each record's data 64-byte aligned, as torch's
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert isinstance(loaded, OrderedDict) and list(loaded) == list(tensors)
        for k, v in tensors.items():
            assert loaded[k].numpy().dtype == v.dtype and np.array_equal(loaded[k].numpy(), v), k
    with zipfile.ZipFile(path) as z:
        assert z.read("archive/version") == b"3\n" and z.read("archive/byteorder") == b"little"
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        assert all((i.header_offset + 30 + len(i.filename) + len(i.extra)) % 64 == 0
                   for i in z.infolist())
    read = torch_pickle.read(path)
    assert all(np.array_equal(read[k], v) for k, v in tensors.items())
    module = torch.nn.Conv2d(2, 3, 3)  # a module takes it as its state dict
    torch_pickle.write(path, {"weight": np.ones((3, 2, 3, 3), np.float32),
                              "bias": np.zeros(3, np.float32)})
    module.load_state_dict(torch.load(path, weights_only=True))
    assert float(module.weight.detach().sum()) == 54.0


# --------------------------------------------------------------------------- safetensors
def test_safetensors_bytes_follow_the_format(tmp_path):
    """The layout byte by byte: u64 LE header size, a JSON header padded with spaces to 8
    bytes, the data little-endian in the tensors' order."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([-1, 7], dtype=np.int64)
    path = tmp_path / "w.safetensors"
    safetensors.write(path, {"a": a, "b": b}, {"format": "pt"})
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + size]
    assert size % 8 == 0 and header == header.rstrip() + b" " * (size - len(header.rstrip()))
    assert json.loads(header) == {"__metadata__": {"format": "pt"},
                                  "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                                  "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}}
    assert raw[8 + size:] == a.astype("<f4").tobytes() + b.astype("<i8").tobytes()
    read = safetensors.read(path)
    assert list(read) == ["a", "b"] and np.array_equal(read["a"], a) and read["b"].dtype == np.int64
    assert safetensors.metadata(path) == {"format": "pt"}


def _safetensors_file(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_safetensors_bfloat16_reads_as_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)  # exact in bfloat16
    words = (values.view(np.uint32) >> 16).astype("<u2")
    path = _safetensors_file(tmp_path / "bf16.safetensors",
                             {"x": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}},
                             words.tobytes())
    read = safetensors.read(path)["x"]
    assert read.dtype == np.float32 and np.array_equal(read, values.reshape(2, 2))


@pytest.mark.parametrize("header,data,message", [
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4,
     "damaged or truncated"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8,
     "overlap or leave a hole"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8,
     "cover 4 of the 8 bytes"),
    ({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype C64"),
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4,
     "not non-negative integers"),
    ({"x": {"shape": [1]}}, b"", "no dtype, shape and data_offsets"),
    ({"__metadata__": {"n": 1}}, b"", "__metadata__ must map names to strings"),
], ids=["truncated", "overlap", "hole", "dtype", "shape", "fields", "metadata"])
def test_damaged_safetensors_are_refused(tmp_path, header, data, message):
    with pytest.raises(WeightsError, match=message):
        safetensors.read(_safetensors_file(tmp_path / "bad.safetensors", header, data))


def test_a_safetensors_header_longer_than_the_file_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10 ** 6) + b'{"a": 1}')
    with pytest.raises(WeightsError, match="a header of 1000000 bytes in a file of 16"):
        safetensors.read(path)
    path.write_bytes(struct.pack("<Q", 4) + b"[1] ")
    with pytest.raises(WeightsError, match="not a JSON object"):
        safetensors.read(path)


# --------------------------------------------------------------------------- names
def test_sequential_names_come_from_the_spec_order():
    spec = architectures.build_spec("alexnet")
    names = [p.module for p in torch_layout.places(spec, 224).values()]
    assert names == ["features.0", "features.3", "features.6", "features.8", "features.10",
                     "classifier.1", "classifier.4", "classifier.6"]  # torchvision's alexnet
    vgg = torch_layout.places(architectures.build_spec("vgg19"), 224, "timm")
    assert [vgg[n].module for n in ("conv1_1", "conv5_4", "fc1", "fc2", "fc3")] == [
        "features.0", "features.34", "pre_logits.fc1", "pre_logits.fc2", "head.fc"]
    assert vgg["fc1"].conv_input == (512, 7, 7) and vgg["fc2"].conv_input == (4096, 1, 1)
    v4 = torch_layout.places(architectures.build_spec("inception_v4"), 299)
    assert v4["Mixed_3a.conv.conv"].module == "features.3.conv.conv"
    assert v4["Mixed_7d.branch3.1.bn"].module == "features.21.branch3.1.bn"
    assert v4["last_linear"].module == "last_linear"
    xc = torch_layout.places(architectures.build_spec("xception"), 299)
    assert [xc[n].module for n in ("block1.sepconv1.pointwise", "block1.bn2", "block2.bn1",
                                   "block1.skip", "conv3.pointwise")] == [
        "block1.rep.0.pointwise", "block1.rep.4", "block2.rep.2", "block1.skip",
        "conv3.pointwise"]


def _numbered(spec, size) -> dict[str, np.ndarray]:
    """Canonical weights, each array filled with its own number (a swap shows)."""
    return {k: np.full(s, i, np.float32)
            for i, (k, s) in enumerate(expected_shapes(spec, size).items())}


# (VGG's 0.5 GB weights: its names are above, its files in the pairs below)
@pytest.mark.parametrize("arch", [a for a in architectures.list_archs() if "vgg" not in a])
@pytest.mark.parametrize("zoo", torch_layout.ZOOS)
def test_from_canonical_and_back_is_the_identity(arch, zoo):
    spec = architectures.build_spec(arch)
    size = spec.min_input_size()
    weights = _numbered(spec, size)
    state = torch_layout.from_canonical(weights, spec, size, zoo)
    assert len(state) == len(weights) and all("/" not in k for k in state)
    back = torch_layout.to_canonical(state, spec, size)
    assert list(back) == list(weights) and all(np.array_equal(back[k], weights[k]) for k in back)


def test_unplaced_tensors_are_named_once_each():
    spec = architectures.build_spec("resnet50")
    state = torch_layout.from_canonical(_numbered(spec, 32), spec, 32)
    state.update({"head.fc.weight": np.zeros((2, 2)), "head.fc.bias": np.zeros(2),
                  "layer1.0.conv1.scale": np.zeros(1), "bn1.num_batches_tracked": np.int64(3)})
    with pytest.raises(WeightsError, match=r"^2 module\(s\) of the file have no place in "
                                           r"resnet50: head\.fc \(weight, bias\); "
                                           r"layer1\.0\.conv1 \(scale\)$"):
        torch_layout.to_canonical(state, spec, 32)
    spec = architectures.build_spec("vgg16")
    with pytest.raises(WeightsError, match="conv1_1.weight and features.0.weight are both "
                                           "conv1_1/weight"):
        torch_layout.to_canonical({"features.0.weight": np.zeros(1),
                                   "conv1_1.weight": np.zeros(1)}, spec, 32)


# --------------------------------------------------------------------------- the zoos' models
@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """torchvision's and timm's models, their files and logits, from ``zoo_reference.py``."""
    if not all((REF / m).is_dir() for m in ("torchvision", "timm")):
        pytest.skip(f"torchvision/timm are not in {REF.name}/: install them there (never into "
                    f"the virtualenv) from the repository root with `{INSTALL}`")
    out = tmp_path_factory.mktemp("zoo-ref")
    safetensors.write(out / "mine.safetensors", _MINE, {"written_by": "cnnzoo"})
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "zoo_reference.py"), str(out)],
                          check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REF)})
    if proc.returncode:
        pytest.fail(f"zoo_reference.py failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    yield out, {p["id"]: p for p in manifest["pairs"]} | {"": manifest}
    shutil.rmtree(out, ignore_errors=True)  # 3.4 GB of weights files (VGG's are 0.55 GB each)


_MINE = {"f32": np.arange(12, dtype=np.float32).reshape(3, 4), "f16": np.ones(3, np.float16),
         "f64": np.linspace(0, 1, 5), "i64": np.arange(-2, 2), "u8": np.arange(3, dtype=np.uint8),
         "scalar": np.float32(1.5), "empty": np.zeros((0, 2), np.float32)}


def _read(out: Path, pair: dict) -> dict[str, np.ndarray]:
    reader = safetensors if pair["format"] == "safetensors" else torch_pickle
    return reader.read(out / pair["file"])


def test_the_safetensors_package_and_this_reader_agree(refs):
    out, pairs = refs
    if pairs[""]["versions"]["safetensors"] is None:
        pytest.skip(f"safetensors is not in {REF.name}/ ({INSTALL})")
    theirs, expected = safetensors.read(out / "dtypes.safetensors"), np.load(out / "dtypes.npz")
    assert sorted(theirs) == sorted(expected.files)
    for k in expected.files:
        assert theirs[k].dtype == expected[k].dtype and np.array_equal(theirs[k], expected[k]), k
    assert safetensors.metadata(out / "dtypes.safetensors") == {"format": "pt", "note": "dtypes"}
    mine = np.load(out / "mine.npz")  # this writer's file, read by the package
    assert pairs[""]["mine_metadata"] == {"written_by": "cnnzoo"}
    for k, v in _MINE.items():
        assert mine[k].dtype == np.asarray(v).dtype and np.array_equal(mine[k], v), k


@pytest.fixture(scope="module")
def torch_backend(tmp_path_factory):
    return load_backend("torch")(
        compose_cfg("backend=torch", "hardware=cpu", "backend.channels_last=false"),
        tmp_path_factory.mktemp("torch"))


@pytest.mark.parametrize("zoo,name,arch,size,fmt", PAIRS,
                         ids=[pair_id(z, n) for z, n, *_ in PAIRS])
def test_zoo_weights_give_the_zoos_logits(refs, torch_backend, zoo, name, arch, size, fmt):
    out, pairs = refs
    pair = pairs[pair_id(zoo, name)]
    tensors = _read(out, pair)
    # every tensor (safetensors' writer orders them by dtype and name, torch keeps its order)
    assert (sorted(tensors) == sorted(pair["keys"]) if pair["format"] == "safetensors"
            else list(tensors) == pair["keys"])
    spec = architectures.build_spec(arch)
    weights = torch_layout.to_canonical(tensors, spec, size)
    check_weights(weights, expected_shapes(spec, size), f"{zoo}:{name}")
    learnable = sum(v.size for k, v in weights.items() if "running_" not in k)
    with torch.device("meta"):  # the backend's network, without drawing an init: every array
        model = SpecModule(spec, size)  # comes from the file (VGG would draw 138M numbers)
    model = model.to_empty(device="cpu")
    torch_backend.set_weights(model, weights)
    images = np.load(out / f"images_{size}.npy")
    logits = torch_backend.predict(model, images)
    ref = np.load(out / f"{pair['id']}.logits.npy")
    diff, scale = float(np.abs(logits - ref).max()), float(np.abs(ref).max())
    print(f"\n{zoo}:{name} -> {arch} at {size} px ({pair['format']}): max |diff| {diff:.3g}, "
          f"relative {diff / scale:.3g} of max |logit| {scale:.3g}")
    assert learnable == pair["num_params"] - _aux_params(spec, tensors)
    assert diff <= RTOL * scale
    assert np.array_equal(logits.argmax(1), ref.argmax(1))
    # and back: the zoo's own names and shapes (its model loads them strictly)
    state = torch_layout.from_canonical(weights, spec, size, zoo)
    kept = [k for k in pair["keys"] if not k.endswith("num_batches_tracked")
            and k.split(".")[0] not in torch_layout._aux_heads(spec)]
    assert sorted(state) == sorted(kept)  # (timm's Xception keeps a block's shortcut first)
    assert all(np.array_equal(state[k], tensors[k]) for k in kept)


def _aux_params(spec, tensors) -> int:
    aux = torch_layout._aux_heads(spec)
    return sum(v.size for k, v in tensors.items() if k.split(".")[0] in aux
               and "running_" not in k and not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("name,arch", [("googlenet", "inception_v1"),
                                       ("inception_v3", "inception_v3")])
def test_auxiliary_heads_load_into_a_spec_that_has_them(refs, name, arch):
    out, pairs = refs
    pair = pairs[pair_id("torchvision", name)]
    spec = architectures.build_spec(arch, aux_logits=True)
    weights = torch_layout.to_canonical(_read(out, pair), spec, 299)
    check_weights(weights, expected_shapes(spec, 299), f"torchvision:{name}")


def test_one_zoo_file_gives_the_zoos_logits_in_every_backend(refs, tmp_path):
    """torchvision's resnet50 (a legacy-format file) read once, run in every installed
    backend."""
    out, pairs = refs
    pair = pairs[pair_id("torchvision", "resnet50")]
    assert pair["format"] == "legacy" and (out / pair["file"]).read_bytes()[:2] == b"\x80\x02"
    spec, size = architectures.build_spec("resnet50"), pair["size"]
    weights = torch_layout.to_canonical(torch_pickle.read(out / pair["file"]), spec, size)
    images, ref = np.load(out / f"images_{size}.npy"), np.load(out / f"{pair['id']}.logits.npy")
    scale = float(np.abs(ref).max())
    for name in usable_backends():
        backend = load_backend(name)(compose_cfg(f"backend={name}", "hardware=cpu"), tmp_path)
        model = backend.build(spec, size)
        backend.set_weights(model, weights)
        logits = backend.predict(model, images)
        diff = float(np.abs(logits - ref).max())
        print(f"\ntorchvision:resnet50 in {name}: max |diff| {diff:.3g}, relative "
              f"{diff / scale:.3g}")
        assert diff <= RTOL_OTHER_KERNELS * scale, name
        assert np.array_equal(logits.argmax(1), ref.argmax(1)), name
