"""``finetune.weights``: a run that starts from pretrained weights, in every backend. The
weights come from a trained LeNet-5 (a real run's checkpoint, as cnnzoo's .npz): a run that
starts from them at a learning rate too small to learn anything is already accurate, one that
starts from random weights is not; a classifier of another class count is initialised anew and
named; a resumed run continues from its checkpoint, exactly; bad weights are one error line."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, run_cli

from cnnzoo.app.experiment import compose, make_backend, spec_of
from cnnzoo.core.backend import usable_backends
from cnnzoo.core.weights import load_weights, save_weights

QUIET = ("trainer.progress_bar=false", "export.enabled=false")
STILL = ("trainer.max_epochs=1", "optim=sgd", "optim.lr=1e-9", *QUIET)  # learns nothing


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The canonical weights of LeNet-5 trained 3 epochs on the digits (torch), as an .npz."""
    top = tmp_path_factory.mktemp("trained")
    r = run_cli(top / "run", "trainer.max_epochs=3", *QUIET)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((top / "run/results.json").read_text())
    cfg = compose("trainer.max_epochs=3", *QUIET)
    backend = make_backend(cfg, top / "run")
    model = backend.build(spec_of(cfg), cfg.arch.input_size)
    backend.load_checkpoint(model, top / "run" / results["checkpoint"])
    save_weights(top / "lenet5.npz", backend.get_weights(model))
    return top / "lenet5.npz", results["metrics"]["val_acc"]


def val_acc(run_dir) -> float:
    return json.loads((run_dir / "results.json").read_text())["metrics"]["val_acc"]


@pytest.mark.parametrize("backend", usable_backends())
def test_a_run_starts_from_the_pretrained_weights(trained, backend, tmp_path):
    npz, acc = trained
    r = run_cli(tmp_path / "run", f"backend={backend}", f"finetune.weights={npz}", *STILL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"weights: 10 tensors from {npz} (npz)" in r.stdout
    assert val_acc(r.run_dir) > 0.9 and abs(val_acc(r.run_dir) - acc) < 0.05
    pretrained = json.loads((r.run_dir / "results.json").read_text())["pretrained"]
    assert pretrained == {"weights": str(npz), "file": str(npz), "format": "npz",
                          "reinitialised": []}


def test_without_them_the_same_run_learns_nothing(tmp_path):
    r = run_cli(tmp_path / "run", *STILL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert val_acc(r.run_dir) < 0.5  # so the test above sees the weights, not the training


def test_a_classifier_of_another_class_count_is_initialised_anew(trained, tmp_path):
    weights = load_weights(trained[0])
    rng = np.random.default_rng(0)
    weights["output/weight"] = rng.normal(size=(1000, 84)).astype(np.float32)  # ImageNet's
    weights["output/bias"] = np.zeros(1000, np.float32)
    save_weights(tmp_path / "imagenet.npz", weights)
    r = run_cli(tmp_path / "run", f"finetune.weights={tmp_path / 'imagenet.npz'}",
                "trainer.max_epochs=1", *QUIET)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "weights: 8 tensors from" in r.stdout
    assert "; output initialised anew for 10 classes" in r.stdout
    results = json.loads((r.run_dir / "results.json").read_text())
    assert results["pretrained"]["reinitialised"] == ["output"]
    assert val_acc(r.run_dir) > 0.9  # one epoch trains a new classifier on good features


def test_a_killed_finetuning_run_resumes_to_the_uninterrupted_weights(trained, tmp_path):
    args = (f"finetune.weights={trained[0]}", "trainer.max_epochs=2", "data.limit=800",
            "trainer.deterministic=true", *QUIET)
    whole = run_cli(tmp_path / "whole", *args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cmd = [sys.executable, "run.py", *args, f"hydra.run.dir={tmp_path / 'killed'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = tmp_path / "killed/checkpoints/epoch-0001"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = run_cli(tmp_path / "killed", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    sha = [json.loads((d / "results.json").read_text())["weights_sha256"]
           for d in (tmp_path / "whole", tmp_path / "killed")]
    assert sha[0] == sha[1]


@pytest.mark.parametrize("damage, message", [
    ("shape", r"finetune.weights=\S+: weights from \S+ do not fit the model:"),
    ("truncated", r"finetune.weights=\S+: \S+: cannot read it as \w+ .*truncated: replace it"),
    ("missing", r"finetune.weights=\S+: weights file \S+ does not exist: give the path"),
])
def test_bad_weights_are_refused_before_anything_is_written(trained, tmp_path, damage, message):
    import re
    bad = tmp_path / "bad.npz"
    if damage == "shape":
        weights = load_weights(trained[0])
        weights["f6/weight"] = weights["f6/weight"][:, :10]
        save_weights(bad, weights)
    elif damage == "truncated":
        bad.write_bytes(trained[0].read_bytes()[:2000])
    r = run_cli(tmp_path / "run", f"finetune.weights={bad}", *STILL)
    assert r.returncode == 2, r.stderr[-3000:]
    assert re.search("error: " + message, r.stderr), r.stderr[-3000:]
    assert r.frameworks == set() and not (tmp_path / "run/.hydra").exists()


def test_a_zoo_model_of_another_architecture_is_refused_before_any_download(tmp_path):
    r = run_cli(tmp_path / "run", "finetune.weights=torchvision:vgg16", *STILL,
                env={"CNNZOO_WEIGHTS_URL": "http://127.0.0.1:9"})
    assert r.returncode == 2
    assert ("error: finetune.weights=torchvision:vgg16: torchvision:vgg16 is the architecture "
            "vgg16, the run's is lenet5: set arch=vgg16") in r.stderr


def test_a_zoo_file_starts_a_run_on_other_classes(tmp_path):
    """Gluon's own AlexNet file (made by mxnet.gluon.model_zoo, as its store publishes them)
    starts a 10-class run: its 1000-class classifier is initialised anew, the rest is Gluon's."""
    code = ("import sys\n"
            "from runners.mxnet.compat import import_mxnet\n"
            "mx = import_mxnet()\n"
            "from mxnet.gluon.model_zoo import vision\n"
            "net = vision.get_model('alexnet', pretrained=False)\n"
            "net.initialize(mx.init.Xavier())\n"
            "net(mx.nd.zeros((1, 3, 224, 224)))\n"
            "net.save_parameters(sys.argv[1])\n")
    params = tmp_path / "alexnet-44335d1f.params"
    made = subprocess.run([sys.executable, "-c", code, str(params)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert made.returncode == 0, made.stderr[-2000:]
    r = run_cli(tmp_path / "run", "arch=alexnet", "arch.input_size=63", "arch.in_channels=3",
                f"finetune.weights={params}", "trainer.max_epochs=1", "data.limit=64", *QUIET)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"weights: 14 tensors from {params} (params); fc3 initialised anew for "
            "10 classes") in r.stdout


def test_a_frozen_backbone_is_named_and_recorded(trained, tmp_path):
    r = run_cli(tmp_path / "run", f"finetune.weights={trained[0]}", "finetune.freeze=[c1,c3]",
                "finetune.backbone_lr=0.5", "trainer.max_epochs=1", "data.limit=200", *QUIET)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fine-tuning: 2 parametrised node(s) frozen, the backbone trained at 0.5 x the rate" \
        in r.stdout
    results = json.loads((r.run_dir / "results.json").read_text())
    assert results["finetune"] == {"frozen": ["c1", "c3"], "backbone_lr": 0.5}
    # (that frozen nodes keep their weights, in every backend: the conformance suite)
    bad = run_cli(tmp_path / "bad", "finetune.freeze=[conv1]", *STILL)
    assert bad.returncode == 2 and not (tmp_path / "bad/.hydra").exists()
    assert ("error: finetune.freeze: 'conv1' starts no parametrised node of lenet5 (they are "
            "c1, c3, c5, f6, output, ...)") in bad.stderr
