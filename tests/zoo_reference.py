"""The zoos' own models as references for ``test_zoo_torch.py``: torchvision's and timm's
networks built with seeded random weights, their weights files written by the zoos' own
writers, and their logits on seeded images.

Run as a script, ``python tests/zoo_reference.py OUT`` with ``PYTHONPATH=<root>/.zoo-ref``, in
a process of its own: torchvision 0.28 from PyPI is a CUDA build whose C++ operators do not load
beside the CPU torch of the project's environment, so it lives in ``.zoo-ref`` (installed with
``INSTALL``) and never in the process that runs the torch backend (pytorch_lightning's imports
would find it there). Importing this module (``PAIRS``, ``INSTALL``) imports no framework.

OUT receives, for each pair of ``PAIRS``, the zoo's weights file and ``<id>.logits.npy``, the
images ``images_<size>.npy``, and ``manifest.json``. With the ``safetensors`` package in
``.zoo-ref``, timm's models are written as timm's hub publishes them (``model.safetensors``,
by safetensors' own writer), ``dtypes.safetensors`` holds every dtype (their values in
``dtypes.npz``), and the package reads ``OUT/mine.safetensors`` (if the test put one there)
back into ``mine.npz``; without it timm's models are written by ``torch.save``.
"""
from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

INSTALL = ("python -m pip install --no-deps --target .zoo-ref torchvision==0.28.0 timm==1.0.31 "
           "safetensors==0.8.0")

# (zoo, the zoo's model name, cnnzoo architecture, input size, torch file format)
# sizes: the smallest the cnnzoo spec accepts, or 32 (same function in both: torchvision's and
# timm's adaptive pools; timm's VGG average-pools a map under 7x7 up to 7x7 before its 7x7 conv
# as cnnzoo's AdaptiveAvgPool(7) does). resnet50 is written in torch's legacy (pre-1.6) format.
PAIRS = (
    ("torchvision", "alexnet", "alexnet", 63, "zip"),
    ("torchvision", "vgg16", "vgg16", 32, "zip"),
    ("torchvision", "vgg19", "vgg19", 32, "zip"),
    ("torchvision", "googlenet", "inception_v1", 32, "zip"),
    ("torchvision", "inception_v3", "inception_v3", 75, "zip"),
    ("torchvision", "resnet50", "resnet50", 32, "legacy"),
    ("torchvision", "resnext50_32x4d", "resnext50", 32, "zip"),
    ("timm", "inception_v4", "inception_v4", 75, "safetensors"),
    ("timm", "inception_resnet_v2", "inception_resnet_v2", 75, "safetensors"),
    ("timm", "legacy_xception", "xception", 32, "safetensors"),
    ("timm", "resnet50", "resnet50", 32, "safetensors"),
    ("timm", "resnext50_32x4d", "resnext50", 32, "safetensors"),
    ("timm", "inception_v3", "inception_v3", 75, "safetensors"),
    ("timm", "vgg16", "vgg16", 32, "safetensors"),
    ("timm", "vgg19", "vgg19", 32, "safetensors"),
)
SEED = 20261127
NUM_IMAGES = 2


def pair_id(zoo: str, name: str) -> str:
    return f"{zoo}_{name}"


def images(size: int):
    import numpy as np
    return np.random.default_rng([SEED, size]).standard_normal(
        (NUM_IMAGES, 3, size, size)).astype(np.float32)


def _build(zoo: str, name: str):
    """The zoo's model, its arrays allocated but not initialised (``_randomise`` draws them)."""
    import timm
    import torch
    import torchvision.models as tvm
    with torch.device("meta"):  # the zoos' own inits would draw every weight twice, slowly
        if zoo == "timm":
            model = timm.create_model(name, pretrained=False)
        else:
            options = {"transform_input": False, "aux_logits": True, "init_weights": False} \
                if name in ("googlenet", "inception_v3") else {}
            model = getattr(tvm, name)(weights=None, **options)
    return model.to_empty(device="cpu")


def _randomise(model, size: int, seed: int) -> None:
    """Weights that make every layer count: convolutions He-initialised (fan-out, as
    torchvision's VGG; uniform), dense layers with std 0.01, every bias non-zero; each batch
    norm's gamma and beta drawn, its statistics those of its actual input on seeded calibration
    images, perturbed, so that the activations stay of order 1 through the whole network, neither
    exploding nor fading into denormals (which would leave the early layers without effect on
    the logits and make the CPU crawl)."""
    import torch
    g = torch.Generator().manual_seed(seed)

    def calibrate(module, inputs):
        var, mean = torch.var_mean(inputs[0], (0, 2, 3), unbiased=False)
        n = module.num_features
        module.running_mean.copy_(mean + torch.randn(n, generator=g) * 0.1 * var.sqrt())
        # (a floor: a channel nearly constant on the calibration images would blow up others)
        module.running_var.copy_(var * (torch.rand(n, generator=g) * 0.4 + 0.8) + 0.1 * var.mean())

    hooks, done = [], set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.randn(n, generator=g) * 0.1)
                module.num_batches_tracked.zero_()
                hooks.append(module.register_forward_pre_hook(calibrate))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                w = module.weight  # uniform: drawing normals is slower (VGG has 138M weights)
                std = (2.0 / (w.shape[0] * w[0, 0].numel())) ** 0.5 if w.ndim == 4 else 0.01
                w.uniform_(-std * 3 ** 0.5, std * 3 ** 0.5, generator=g)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.01)
            else:
                continue
            done.update(id(t) for t in (*module.parameters(False), *module.buffers(False)))
        left = [n for n, t in (*model.named_parameters(), *model.named_buffers())
                if id(t) not in done]
        if left:
            raise RuntimeError(f"not initialised: {left}")
        calibration = torch.randn((4, 3, size, size), generator=g)
        model.eval()(calibration)
    for hook in hooks:
        hook.remove()


def main(out: Path) -> None:
    # the documented workaround: torchvision.models imports beside the CPU torch (its C++
    # operators, torchvision.io and the detection ops do not)
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations")
    import numpy as np
    import timm
    import torch
    import torchvision
    try:
        import safetensors
        import safetensors.numpy
        import safetensors.torch
    except ImportError:
        safetensors = None
    # one thread: the inputs are tiny, and beside the tests' other worker a second OpenMP
    # thread spins more than it computes
    torch.set_num_threads(1)

    manifest = {"versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                             "timm": timm.__version__,
                             "safetensors": safetensors and safetensors.__version__},
                "pairs": [], "seconds": {}}
    for zoo, name, arch, size, fmt in PAIRS:
        t0 = time.perf_counter()
        if fmt == "safetensors" and safetensors is None:
            fmt = "zip"
        ident = pair_id(zoo, name)
        model = _build(zoo, name).eval()
        _randomise(model, size, SEED)
        x = images(size)
        np.save(out / f"images_{size}.npy", x)
        with torch.no_grad():
            logits = model(torch.from_numpy(x)).numpy()
        state = model.state_dict()
        file = out / (f"{ident}.safetensors" if fmt == "safetensors" else f"{ident}.pth")
        if fmt == "safetensors":
            safetensors.torch.save_file(state, str(file), metadata={"format": "pt"})
        else:
            torch.save(state, file, _use_new_zipfile_serialization=fmt == "zip")
        np.save(out / f"{ident}.logits.npy", logits)
        manifest["pairs"].append({"zoo": zoo, "name": name, "arch": arch, "size": size,
                                  "format": fmt, "file": file.name, "id": ident,
                                  "keys": list(state), "num_params": sum(
                                      p.numel() for p in model.parameters())})
        manifest["seconds"][ident] = round(time.perf_counter() - t0, 2)
        del model, state
    if safetensors is not None:  # every dtype, as the package writes it
        g = torch.Generator().manual_seed(SEED)
        value = torch.randn((3, 4), generator=g)
        tensors = {"bf16": value.bfloat16(), "f16": value.half(), "f64": value.double(),
                   "f32": value.t().contiguous(), "i64": torch.arange(-3, 3),
                   "i32": torch.arange(5, dtype=torch.int32), "u8": torch.arange(4).byte(),
                   "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
                   "empty": torch.zeros((0, 3))}
        safetensors.torch.save_file(tensors, str(out / "dtypes.safetensors"),
                                    metadata={"format": "pt", "note": "dtypes"})
        np.savez(out / "dtypes.npz", **{k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
                                        for k, v in tensors.items()})
    mine = out / "mine.safetensors"
    if safetensors is not None and mine.exists():  # this tool's writer, read by the package
        np.savez(out / "mine.npz", **safetensors.numpy.load_file(str(mine)))
        with safetensors.safe_open(str(mine), "np") as f:
            manifest["mine_metadata"] = f.metadata()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
