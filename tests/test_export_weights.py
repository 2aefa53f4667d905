"""``task=export_weights``: a trained run's weights as a framework's own file, read back by
that framework (torch.load with weights_only=True for .pth), the round trip bit for bit; a run
that is not finished, or a format whose framework has no such model, is one error line."""
import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from cnnzoo.core.weights import load_weights

SHORT = ("trainer.max_epochs=1", "data.limit=200", "trainer.progress_bar=false",
         "export.enabled=false")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    r = run_cli(run, *SHORT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = run.parent / "npz"
    r = run_cli(out, "task=export_weights", f"export_weights.run_dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    return run, load_weights(out / "lenet5-torch.npz")


def test_the_npz_holds_the_runs_final_weights(trained):
    run, weights = trained
    from cnnzoo.core.checkpoints import weights_sha256
    assert weights_sha256(weights) == json.loads((run / "results.json").read_text())[
        "weights_sha256"]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_a_state_dict_file_is_the_torch_models_own(trained, fmt, tmp_path):
    run, weights = trained
    r = run_cli(tmp_path / "out", "task=export_weights", f"export_weights.run_dir={run}",
                f"export_weights.format={fmt}")
    assert r.returncode == 0, r.stderr[-3000:]
    path = tmp_path / "out" / f"lenet5-torch.{fmt}"
    assert f"as {fmt}: {path} (read back: identical)" in r.stdout
    if fmt == "pth":
        state = torch.load(path, weights_only=True)
    else:
        from cnnzoo.core.zoo.formats import safetensors
        state = {k: torch.from_numpy(v) for k, v in safetensors.read(path).items()}
    assert sorted(state) == sorted(k.replace("/", ".") for k in weights)
    for k, v in weights.items():
        np.testing.assert_array_equal(state[k.replace("/", ".")].numpy(), v)


def test_an_unfinished_run_is_one_line(tmp_path):
    r = run_cli(tmp_path / "out", "task=export_weights", f"export_weights.run_dir={tmp_path}")
    assert r.returncode == 2
    assert (f"error: export_weights.run_dir='{tmp_path}' is not a finished training run "
            "(needs config.yaml and results.json)") in r.stderr
