"""End to end through ``python run.py``, as a user runs it: real subprocesses, real files."""
import csv
import importlib.util
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest
from conftest import run_cli

import architectures
from cnnzoo.core.backend import available_backends, backend_info, usable_backends
from export import runtimes

pytestmark = pytest.mark.slow


def test_default_job_trains_exports_and_verifies(cli):
    r = cli()
    assert r.returncode == 0, r.stderr[-2000:]
    res = r.results()
    assert (res["task"], res["arch"], res["backend"], res["status"]) == (
        "train", "lenet5", "torch", "ok")
    assert res["params"] == res["native_params"] == 61_706
    assert res["input_shape"] == [1, 32, 32] and res["num_classes"] == 10
    assert res["metrics"]["val_acc"] >= 0.95
    assert res["timings"]["images_per_s"] > 0 and res["timings"]["total_s"] > 0
    assert res["export"]["passed"] is True and res["export"]["opset"] == 18
    assert res["export"]["max_abs_diff"] <= 1e-4
    assert list(res["export"]["runtimes"]) == ["onnxruntime"]
    assert {b["batch_size"] for b in res["export"]["runtimes"]["onnxruntime"]["batches"]} == {
        1, 32}
    assert res["versions"]["torch"].startswith("2.")
    # the files a run promises
    rows = list(csv.DictReader((r.run_dir / "metrics.csv").open()))
    assert len(rows) == 10 and [int(row["epoch"]) for row in rows] == list(range(1, 11))
    assert float(rows[-1]["val_acc"]) == pytest.approx(res["metrics"]["val_acc"], abs=1e-5)
    assert res["checkpoint"] == "checkpoints/epoch-0010/model.ckpt"  # the newest epoch only
    assert [p.name for p in (r.run_dir / "checkpoints").iterdir()] == ["epoch-0010"]
    assert (r.run_dir / res["checkpoint"]).stat().st_size > 0
    assert list((r.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "task: train" in (r.run_dir / "config.yaml").read_text()
    meta = {p.key: p.value for p in onnx.load(str(r.run_dir / "model.onnx")).metadata_props}
    assert meta["arch"] == "lenet5" and json.loads(meta["class_names"])[3] == "3"
    assert json.loads(meta["preprocess"])["resize"] == [32, 32]
    # backend=torch never loads the other frameworks
    assert "torch" in r.frameworks
    assert not r.frameworks & {"tensorflow", "keras", "mxnet"}


def test_summary_prints_table_without_any_framework(cli):
    r = cli("task=summary", "arch=vgg16")
    assert r.returncode == 0, r.stderr
    assert "138,357,544" in r.stdout and "conv5_3" in r.stdout and "minimum input size: 32" in r.stdout
    assert r.frameworks == set()
    res = r.results()
    assert res["params"] == 138_357_544 and "native_params" not in res
    assert res["layers"][0]["name"] == "conv1_1" and res["layers"][-1]["output_shape"] == [1000]
    assert sum(layer["params"] for layer in res["layers"]) == res["params"]
    assert sum(layer["flops"] for layer in res["layers"]) == res["flops"] == 30_940_528_640


def test_summary_with_backend_reports_native_params(cli):
    r = cli("task=summary", "arch=lenet5", "backend=torch")
    assert r.returncode == 0, r.stderr
    assert r.results()["native_params"] == r.results()["params"] == 61_706
    assert "native torch parameters: 61,706" in r.stdout


@pytest.mark.parametrize("flag", ["--help", "--cfg=job"])
def test_help_and_cfg_import_no_framework(cli, flag):
    r = cli(flag)
    assert r.returncode == 0, r.stderr
    assert r.frameworks == set()
    if flag == "--help":
        assert "Usage: python run.py" in r.stdout
        assert re.search(r"^arch: .*lenet5.*vgg16", r.stdout, re.M)
    else:
        assert "name: lenet5" in r.stdout and "task: train" in r.stdout


@pytest.mark.parametrize("override, expected", [
    ("arch=resnet9000", ["lenet5", "vgg16"]),
    ("backend=caffe", ["torch", "keras", "mxnet"]),
])
def test_unknown_choice_lists_valid_ones(cli, override, expected):
    r = cli(override)
    assert r.returncode == 2 and len(r.error_lines) == 1, r.stderr
    assert all(choice in r.error_lines[0] for choice in expected)
    assert r.frameworks == set()


@pytest.mark.parametrize("override, key", [
    ("arch.input_size=16", "arch.input_size"),
    ("optim.lr=-0.1", "optim.lr"),
    ("data.batch_size=0", "data.batch_size"),
])
def test_bad_input_is_one_clear_line_and_nonzero_exit(cli, override, key):
    r = cli(override)
    assert r.returncode == 2
    assert len(r.error_lines) == 1 and r.error_lines[0].startswith(f"error: {key}")
    assert "Traceback" not in r.stderr
    assert r.frameworks == set()  # rejected before any framework is imported
    assert not (r.run_dir / "results.json").exists()


def test_failed_verification_fails_the_run(cli):
    r = cli("trainer.max_epochs=1", "export.atol=0", "export.rtol=0")
    assert r.returncode == 1
    assert len(r.error_lines) == 1
    assert r.error_lines[0].startswith("error: ONNX verification in onnxruntime failed: max abs ")
    res = r.results()  # the evidence is kept
    assert res["status"] == "verification_failed" and res["export"]["passed"] is False
    assert (r.run_dir / "model.onnx").exists()


def _install_plugin(site: Path, module: str, name: str, implementation: str, modules: tuple,
                    options: str, conf_yaml: str) -> None:
    """An installed distribution (a dist-info on ``site``) with a cnnzoo.backends entry point
    naming its BackendInfo, and its own conf/backend/<name>.yaml inside its package."""
    (site / module / "conf" / "backend").mkdir(parents=True)
    (site / module / "conf" / "__init__.py").write_text("")
    (site / module / "__init__.py").write_text(
        "from cnnzoo.core.backend import BackendInfo\n"
        "from cnnzoo.core.rules import BOOLEAN, NON_NEGATIVE_INT\n\n"
        f"INFO = BackendInfo(name={name!r}, implementation={implementation!r},\n"
        f"                   install='pip install {module}', modules={modules!r},\n"
        f"                   options={options}, conf='{module}.conf')\n")
    (site / module / "conf" / "backend" / f"{name}.yaml").write_text(conf_yaml)
    dist = site / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[cnnzoo.backends]\n{name} = {module}:INFO\n")


def _on_path(site: Path) -> dict:
    """The environment with ``site`` first on PYTHONPATH (where the plugin is installed)."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site),
                                                         os.environ.get("PYTHONPATH")]))}


def test_third_party_backend_plugs_in_through_entry_point_and_searchpath(cli, tmp_path):
    """An installed package with a cnnzoo.backends entry point and its own backend config: no
    hydra.searchpath on the command line, no edit to this repository."""
    site = tmp_path / "site"
    _install_plugin(site, "mybackend", "mine", "mybackend.impl:MyBackend", ("torch",),
                    "{'channels_last': BOOLEAN, 'num_workers': NON_NEGATIVE_INT}",
                    "name: mine\nchannels_last: false\nnum_workers: 0\n")
    (site / "mybackend" / "impl.py").write_text(
        "from runners.torch.backend import TorchBackend\n\n"
        "class MyBackend(TorchBackend):\n    name = 'mine'\n")
    r = cli("task=summary", "arch=lenet5", "backend=mine", env=_on_path(site))
    assert r.returncode == 0, r.stderr
    assert "native mine parameters: 61,706" in r.stdout
    assert r.results()["backend"] == "mine"
    # its declared options are validated before its framework loads
    bad = cli("backend=mine", "backend.num_workers=-1", env=_on_path(site))
    assert bad.returncode == 2 and bad.frameworks == set()
    assert bad.error_lines == ["error: backend.num_workers=-1 is invalid: expected an integer "
                               ">= 0"]


def test_a_backend_whose_framework_is_missing_names_its_install_command(cli, tmp_path):
    site = tmp_path / "site"
    _install_plugin(site, "ghostbackend", "ghost", "ghostbackend.impl:Ghost",
                    ("no_such_framework_xyz",), "{}", "name: ghost\n")
    r = cli("backend=ghost", env=_on_path(site))
    assert r.returncode == 2 and r.frameworks == set()
    assert r.error_lines == ["error: backend=ghost needs no_such_framework_xyz, which is not "
                             "installed: pip install ghostbackend"]
    assert not (r.run_dir / "results.json").exists()


@pytest.mark.parametrize("backend", [b for b in available_backends()
                                     if b not in usable_backends()])
def test_an_installed_backend_without_its_framework_is_one_line(cli, backend):
    """In a partial install (e.g. ``pip install .[torch]``) the other built-in backends."""
    r = cli(f"backend={backend}")
    assert r.returncode == 2 and len(r.error_lines) == 1, r.stderr
    assert f"backend={backend} needs " in r.error_lines[0]
    assert r.error_lines[0].endswith(f": {backend_info(backend).install}")


@pytest.mark.parametrize("runtime", [r for r in runtimes.FORMATS
                                     if importlib.util.find_spec(runtimes.MODULES[r]) is None])
def test_a_runtime_not_installed_is_refused_before_training(cli, runtime):
    """In a partial install (without the deploy extra): one line naming the extra."""
    r = cli(f"export.runtimes=[{runtime}]")
    assert r.returncode == 2 and len(r.error_lines) == 1, r.stderr
    assert r.error_lines[0].startswith(f"error: export.runtimes: {runtime} is not installed: "
                                       'pip install -c constraints.txt -e ".[deploy]"')
    assert not (r.run_dir / "results.json").exists()


@pytest.mark.parametrize("backend", [b for b in usable_backends() if "bf16-mixed" in
                                     backend_info(b).limits.get("hardware.precision",
                                                                ("bf16-mixed",))])
def test_bf16_mixed_trains_on_the_cpu_and_exports_a_float32_onnx_model(backend, tmp_path):
    """The mixed-precision code paths are not GPU-only: the same short run in bf16-mixed and in
    32-true learns, gives other weights (bf16 really computed), and a float32 ONNX model that
    passes verification against the native model."""
    short = (f"backend={backend}", "hardware=cpu", "trainer.max_epochs=2", "data.limit=400",
             "trainer.progress_bar=false", "export.num_images=32", "export.batch_sizes=[1,32]")
    runs = {p: run_cli(tmp_path / p, *short, f"hardware.precision={p}")
            for p in ("bf16-mixed", "32-true")}
    for r in runs.values():
        assert r.returncode == 0, r.stderr[-3000:]
    res, full = runs["bf16-mixed"].results(), runs["32-true"].results()
    assert res["hardware"]["precision"] == "bf16-mixed" and res["metrics"]["val_acc"] > 0.6
    assert abs(res["metrics"]["val_acc"] - full["metrics"]["val_acc"]) <= 0.1  # chance: 0.1
    assert res["weights_sha256"] != full["weights_sha256"]
    assert res["export"]["passed"] is True
    graph = onnx.load(str(runs["bf16-mixed"].run_dir / "model.onnx")).graph
    assert {v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]} == {
        onnx.TensorProto.FLOAT}
    assert onnx.TensorProto.BFLOAT16 not in {t.data_type for t in graph.initializer}


def test_ddp_on_two_cpu_processes_writes_one_run_directory(tmp_path):
    """DDP over two processes: the second one re-runs the command (ddp) or is spawned
    (ddp_spawn); both strategies deal the same batches and train the same weights."""
    runs = {}
    for strategy in ("ddp", "ddp_spawn"):
        r = run_cli(tmp_path / strategy, "hardware=ddp_cpu", f"hardware.strategy={strategy}",
                    "trainer.max_epochs=1", "export.batch_sizes=[1,8]", "export.num_images=16")
        assert r.returncode == 0, r.stderr[-2000:]
        runs[strategy] = res = r.results()
        assert res["hardware"]["devices"] == 2 and res["export"]["passed"] is True
        assert len(list(csv.DictReader((r.run_dir / "metrics.csv").open()))) == 1  # rank 0
        # the re-run worker used the same directory
        assert (r.run_dir / "train_ddp_process_1.log").exists() == (strategy == "ddp")
    assert runs["ddp"]["weights_sha256"] == runs["ddp_spawn"]["weights_sha256"]
    assert runs["ddp"]["metrics"] == runs["ddp_spawn"]["metrics"]


# vgg16 runs under its alias "vgg", as `python run.py arch=vgg arch.input_size=32` in the README
ARCH_RUNS = [("vgg" if name == "vgg16" else name, ()) for name in architectures.list_archs()] + [
    ("inception_v1", ("arch.options.aux_logits=true",)),
    ("inception_v3", ("arch.options.aux_logits=true",)),  # its aux head needs the full 299
]


def _spec(arch: str, extra: tuple):
    return architectures.build_spec(arch, **({"aux_logits": True} if extra else {}))


# this package's backends: the sweep takes minutes per backend (Flax's, XLA compiling eleven
# training steps, took nine on 2 cores); an outside plugin proves its architectures in its own
# tests (plugins/cnnzoo-flax/tests: parameter counts, logits against torch, ONNX)
@pytest.fixture(scope="module", params=[n for n in usable_backends()
                                        if backend_info(n).implementation.startswith("runners.")])
def every_architecture(request, tmp_path_factory):
    """backend, {(arch, extra): (results.json, the sweep's CliResult)}: one short epoch at a
    small input and a verified ONNX export of every architecture, as one sweep (``run.py -m
    arch=...``) per input size, so that the framework loads once per size; two sweeps at a
    time on one thread each (CI has 2 cores), the largest models first. Each sweep's folder is
    removed once its results are read: a backend's eleven runs write ~13 GB (VGG's checkpoints).
    """
    backend, groups, found = request.param, {}, {}
    # one backend also writes Caffe's files and runs the ONNX file in OpenVINO (the exports go
    # through the canonical weights and the same ONNX graph rules, so one is enough)
    deploy = (("export.caffe=true", "export.runtimes=[onnxruntime,openvino]")
              if backend == "torch" and importlib.util.find_spec("openvino") else ())
    for arch, extra in ARCH_RUNS:
        size = max(_spec(arch, extra).min_input_size(), 32)
        groups.setdefault((size, extra), []).append(arch)
    order = sorted(groups, key=lambda g: -sum(_spec(a, g[1]).analyze(g[0]).params
                                              for a in groups[g]))  # ~ the time to build
    folders = {g: tmp_path_factory.mktemp(f"{backend}-{g[0]}") for g in order}

    def sweep(group):
        (size, extra), archs = group, groups[group]
        return run_cli(folders[group] / "run", "-m", f"backend={backend}",
                       f"arch={','.join(archs)}", f"arch.input_size={size}", "optim=sgd",
                       "data=synthetic", "data.num_samples=20", "data.batch_size=8",
                       "trainer.max_epochs=1", "trainer.progress_bar=false", "hardware.threads=1",
                       "export.num_images=4", "export.batch_sizes=[1,4]", *deploy, *extra,
                       f"hydra.sweep.dir={folders[group]}")

    with ThreadPoolExecutor(2) as pool:
        for group, r in zip(order, pool.map(sweep, order)):
            archs, extra = groups[group], group[1]
            for results in folders[group].glob("*/results.json"):
                res = json.loads(results.read_text())
                arch = next(a for a in archs if _spec(a, extra).name == res["arch"])
                found[arch, extra] = res, r
            assert all((a, extra) in found for a in archs), r.stderr[-3000:]
            shutil.rmtree(folders[group])
    return backend, found


@pytest.mark.parametrize("arch, extra", ARCH_RUNS,
                         ids=[a + ("-aux" if e else "") for a, e in ARCH_RUNS])
def test_every_architecture_trains_one_epoch_and_exports(every_architecture, arch, extra):
    """SGD: the optimizers themselves are tested per backend."""
    backend, found = every_architecture
    res, r = found[arch, extra]
    spec = _spec(arch, extra)
    assert res["status"] == "ok", res.get("error", "") + r.stderr[-3000:]
    assert (res["arch"], res["backend"]) == (spec.name, backend)
    assert res["input_shape"][1] == res["input_shape"][2] >= max(spec.min_input_size(), 32)
    assert res["input_shape"][0] == spec.in_channels
    assert res["params"] == res["native_params"]
    assert res["metrics"]["train_loss"] > 0 and res["export"]["passed"] is True
    if "caffe" in res["export"]:  # Caffe in OpenCV, ONNX in onnxruntime and OpenVINO
        assert res["export"]["caffe"]["passed"] is True
        assert list(res["export"]["runtimes"]) == ["onnxruntime", "openvino"]
