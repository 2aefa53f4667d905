"""Checkpoint files: the training state in each epoch folder, plain weight files, and the one
safe way every one of them is read.

``checkpoints/epoch-NNNN/model.ckpt`` holds the full training state (``training_state``:
weights, optimizer state, epochs done) in the layout of a Lightning ``Trainer``
checkpoint, which earlier versions wrote and which therefore still resumes. Generators need
no saved state: each epoch reseeds them from (seed, epoch). Every load is
``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from cnnzoo.core.errors import CheckpointError

CHECKPOINT = "model.ckpt"  # in each checkpoints/epoch-NNNN folder


def training_state(net, opt, epochs_done: int) -> dict:
    """What an epoch folder's ``model.ckpt`` holds: the network's weights under ``net.``,
    the optimizer's state and the epochs done (the schedule's position follows from them)."""
    return {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "optimizer_states": [opt.state_dict()], "epoch": epochs_done}


def net_weights(state: dict) -> dict:
    """The network's weights from a ``training_state`` (or a plain ``save_weights`` file)."""
    if "state_dict" not in state:
        return state
    return {k[len("net."):]: v for k, v in state["state_dict"].items()
            if isinstance(k, str) and k.startswith("net.")}


def save_weights(model, path: Path) -> None:
    """The model's ``state_dict`` alone (no training state)."""
    torch.save(model.state_dict(), path)


def load_weights(model, path: Path) -> None:
    """The weights of ``path`` (a ``save_weights`` file or a training checkpoint) into
    ``model``; ``CheckpointError`` for a file that is damaged, does not fit, or would run code."""
    state = load_state(path)
    try:
        model.load_state_dict(net_weights(state))
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: does not fit this model: {one_line(err)}") from None


def load_state(path) -> dict:
    """A checkpoint file as a dict, with ``torch.load(weights_only=True)``: tensors and plain
    containers only, so nothing in the file is ever run. Raises ``CheckpointError`` (one line)
    for a file that would need more, or that cannot be read."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # what weights_only refuses
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        why = (f"loading it would call {found.group(1)}" if found
               else "it holds objects other than tensors and plain containers")
        raise CheckpointError(f"{path}: refused: {why}; only checkpoints written by cnnzoo are "
                              "loaded") from None
    except Exception as err:  # noqa: BLE001 - damaged, truncated, missing, not a checkpoint
        detail = (one_line(err) if isinstance(err, (OSError, RuntimeError)) else
                  f"not a PyTorch checkpoint ({type(err).__name__}: {one_line(err)})")
        raise CheckpointError(f"{path}: cannot be read: {detail}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a checkpoint")
    return state


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."
