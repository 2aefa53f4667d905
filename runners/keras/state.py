"""Checkpoint files: what an epoch's folder holds, reading it back safely, exact resume.

Each ``checkpoints/epoch-NNNN`` folder holds ``model.weights.h5`` (``model.save_weights`` of
the compiled model: weights and optimizer variables with the step count, Keras' HDF5 format,
data only) beside ``state.json``; the last epoch's folder also holds ``model.keras`` (the
whole model, for ``keras.models.load_model``). Writing the weights file every epoch and the
``.keras`` archive only at the end is what keeps checkpoints cheap: for ResNet-50 (189 MB of
weights and SGD momentum) ``model.save`` took 1.04 s and ``save_weights`` 0.41 s on 2 cores.
Folders written by earlier versions hold ``model.keras`` alone; they resume from it
(``training_file``).

Resuming compiles the model, builds its optimizer and lets ``model.load_weights`` restore
weights and optimizer variables (``restore``). Loading a ``.keras`` file never runs code from
it: ``check_archive`` accepts only what ``model.save`` writes for a cnnzoo model, and Keras
loads it with ``safe_mode=True``; an HDF5 weights file holds arrays only.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

from cnnzoo.core.errors import CheckpointError

from .model import SpecModel, keras

CHECKPOINT = "model.weights.h5"  # in each checkpoints/epoch-NNNN folder: the training state
FULL_MODEL = "model.keras"  # in the last epoch's folder (and alone in earlier versions' folders)

_ARCHIVE = ("config.json", "metadata.json", "model.weights.h5")  # what model.save writes
# Keras classes whose config carries code or loads another file
_CODE_CLASSES = {"Lambda": "Python code", "__lambda__": "Python code",
                 "TorchModuleWrapper": "Python code", "JaxLayer": "Python code",
                 "FlaxLayer": "Python code", "TFSMLayer": "a SavedModel loaded from another path"}
# the modules of the registered cnnzoo classes (layers; the training's rate schedule and
# smoothed loss, in a compiled model's config), and the layers' module before runners/keras/
# was a package (checkpoints written then name it; classes are found by their registered names)
_OWN_MODULES = (SpecModel.__module__, f"{__package__}.train", "runners.keras_model")


def write_state(model, folder: Path, final: bool = False) -> None:
    """The full training state of the compiled ``model`` into an epoch's folder; ``final``
    (the run's last epoch): the ``.keras`` archive of the whole model too."""
    model.save_weights(Path(folder) / CHECKPOINT)
    if final:
        model.save(Path(folder) / FULL_MODEL)


def training_file(folder: Path) -> Path:
    """The file of an epoch folder that a resume loads: the weights file, or the ``.keras``
    archive that earlier versions wrote instead."""
    folder = Path(folder)
    if not (folder / CHECKPOINT).exists() and (folder / FULL_MODEL).exists():
        return folder / FULL_MODEL
    return folder / CHECKPOINT


def save_checkpoint(model, path: Path) -> None:
    """``.keras``: the whole model (architecture, weights, optimizer state if compiled);
    ``.weights.h5``: the weights (and the optimizer's variables, if compiled)."""
    path = Path(path)
    if path.name.endswith(".weights.h5"):
        model.save_weights(path)
    elif path.suffix == ".keras":
        model.save(path)
    else:
        raise ValueError(f"{path.name}: keras checkpoints end in .keras or .weights.h5")


def load_checkpoint(model, path: Path) -> None:
    """Weights from a ``.keras`` file (``load_safely``: a file with code is refused) or a
    ``.weights.h5`` file (data only) into ``model``."""
    path = Path(path)
    if path.name.endswith(".weights.h5"):
        load_weights_file(model, path)
    else:
        model.set_weights(load_safely(path).get_weights())


def restore(model, path: Path, strategy) -> None:
    """Weights and optimizer state (moments, step count) from a checkpoint into the compiled
    ``model``: the optimizer is built first so that ``load_weights`` fills its variables. A
    ``.keras`` file is checked and loaded safely (``load_safely``) before."""
    path = Path(path)
    if not path.name.endswith(".weights.h5"):
        load_safely(path)  # refuses a file that would need code; discarded, read again below
    with strategy.scope():
        build_optimizer(model)
    load_weights_file(model, path)


def build_optimizer(model) -> None:
    """The compiled ``model``'s optimizer variables, once (``LossScaleOptimizer.build`` would
    add its own variables again)."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def load_weights_file(model, path: Path) -> None:
    """``model.load_weights(path)``; a file that does not fit raises ``CheckpointError``
    (one line)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        model.load_weights(path)
    except Exception as err:  # noqa: BLE001 (h5py and Keras raise many kinds)
        raise CheckpointError(f"{path}: cannot be loaded into this model: "
                              f"{first_line(err)}") from None


# --------------------------------------------------------------------------- safe loading
def _refused(path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: refused: {reason}; only checkpoints written by cnnzoo "
                           "are loaded")


def check_archive(path: Path) -> None:
    """Raise ``CheckpointError`` unless ``path`` is what ``model.save`` writes for a cnnzoo
    model: a zip of exactly config.json, metadata.json and model.weights.h5 whose config
    names Keras' own classes and functions and cnnzoo's registered layers only (no Lambda or
    other code, no other module). Nothing in the file is deserialized here."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with zipfile.ZipFile(path) as z:
            names = sorted(z.namelist())
            if names != sorted(_ARCHIVE):
                raise _refused(path, f"it holds {', '.join(names) or 'nothing'}, not exactly "
                               f"{', '.join(_ARCHIVE)}")
            config = json.loads(z.read("config.json"))
    except (OSError, zipfile.BadZipFile, ValueError, KeyError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise _refused(path, f"not a .keras archive ({type(err).__name__}: "
                       f"{first_line(err)})") from None

    def walk(node):
        if isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, dict):
            name, module = node.get("class_name"), node.get("module")
            if name in _CODE_CLASSES:
                raise _refused(path, f"its config holds a {name} ({_CODE_CLASSES[name]})")
            if module is not None and not (
                    module == "keras" or str(module).startswith("keras.")
                    or (module == "builtins" and name == "function")
                    or (module in _OWN_MODULES
                        and str(node.get("registered_name")).startswith("cnnzoo>"))):
                what = node.get("config") if name == "function" else name
                raise _refused(path, f"its config names {module}.{what}, which is not part of "
                               "Keras or cnnzoo")
            for v in node.values():
                walk(v)
    walk(config)


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_safely(path: Path):
    """The uncompiled model saved at ``path``, after ``check_archive``, with ``safe_mode=True``;
    ``CheckpointError`` (one line) for a file that cannot or must not be loaded."""
    path = Path(path)
    check_archive(path)
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as err:  # noqa: BLE001 (Keras raises many kinds; all mean refused)
        raise _refused(path, f"Keras cannot load it safely: {first_line(err)}") from None
