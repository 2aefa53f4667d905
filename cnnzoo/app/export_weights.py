"""``task=export_weights``: a trained run's weights written in a framework's own file, so
that the plain framework (torchvision, timm, keras.applications, Gluon's model zoo) loads them.

    python run.py task=export_weights export_weights.run_dir=<run> export_weights.format=pth

Formats: ``pth`` (a torch state dict with the reference's names, written without torch),
``safetensors`` (the same names), ``h5`` (keras.applications' legacy .h5), ``params`` (Gluon's
``save_parameters``), ``npz`` (cnnzoo's canonical weights). The file is read back with
cnnzoo's own reader before the task ends: the round trip must give every weight bit for bit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, open_dict

from ..core.errors import RunFailed
from ..core.zoo import files
from ..core.zoo.load import layout_module
from .evaluate import trained_config
from .experiment import build_model, prepare


def export_weights(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    fmt = cfg.export_weights.format
    with open_dict(cfg):  # trained_config reads the run from eval.run_dir
        cfg.eval.run_dir = cfg.export_weights.run_dir
    trained, checkpoint = trained_config(cfg, overrides, key="export_weights.run_dir")
    exp = prepare(trained)
    backend, model, _ = build_model(trained, run_dir, exp)
    backend.load_checkpoint(model, checkpoint)
    weights = backend.get_weights(model)
    out = run_dir / f"{exp.spec.name}-{trained.backend.name}.{fmt}"
    size = trained.arch.input_size
    layout = files.LAYOUT_OF[fmt] and layout_module(files.LAYOUT_OF[fmt])
    files.write_tensors(out, fmt, layout.from_canonical(weights, exp.spec, size) if layout
                        else weights)
    back = files.read_tensors(out, fmt)[1]
    back = layout.to_canonical(back, exp.spec, size) if layout else back
    if sorted(back) != sorted(weights) or any(
            not np.array_equal(back[k], weights[k]) for k in weights):
        out.unlink(missing_ok=True)
        raise RunFailed(f"{out.name}: reading the written file back does not give the run's "
                        "weights bit for bit (nothing was kept): a bug, please report it")
    print(f"wrote {len(weights)} tensors of {checkpoint} as {fmt}: {out} (read back: identical)")
