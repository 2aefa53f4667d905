"""Checkpoint files: the whole training state of an epoch folder as one ``.npz`` of arrays,
read without pickle and only after checking that it is what this run would write.

``checkpoints/epoch-NNNN/state.npz`` holds ``v<i>``: the model's variables (parameters and
batch statistics), ``o<i>``: the optimizer state's leaves in optax's order (moments, step
counts), and ``meta.json`` (bytes): the format, the architecture, and for each ``v<i>`` its
(collection, scope, name). That is all a resume needs: the step's rate comes from the epoch
number, its dropout key from (seed, epoch, batch). Loading builds the tree this run expects
(``Steps.init_state``) and fills it, refusing any missing, extra or mis-shaped array."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import jax
import numpy as np

from architectures import spec as S
from cnnzoo.core.errors import CheckpointError
from cnnzoo.core.npzfile import open_npz

from .model import BATCH_STATS, PARAMS

STATE_FILE = "state.npz"  # in each checkpoints/epoch-NNNN folder
FORMAT = "cnnzoo-flax-state/1"
_COLLECTIONS = (PARAMS, BATCH_STATS)


def _variables(tree: dict):
    """((collection, scope, name), array) of a variables tree, in a fixed order."""
    for collection in _COLLECTIONS:
        for scope in tree[collection]:
            for name, value in tree[collection][scope].items():
                yield (collection, scope, name), value


def write_state(state: dict, spec: S.Spec, folder: Path) -> None:
    """The training state (``Steps.init_state``'s tree) into an epoch folder being written."""
    host = jax.device_get(state)
    arrays, paths = {}, []
    for i, (path, value) in enumerate(_variables(host)):
        arrays[f"v{i}"] = np.asarray(value)
        paths.append(list(path))
    for i, leaf in enumerate(jax.tree_util.tree_leaves(host["opt_state"])):
        arrays[f"o{i}"] = np.asarray(leaf)
    meta = {"format": FORMAT, "arch": spec.name, "variables": paths}
    arrays["meta.json"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (Path(folder) / STATE_FILE).write_bytes(buffer.getvalue())


def _read(path: Path) -> tuple[dict, dict]:
    """(meta, arrays) of a state file; ``CheckpointError`` (one line) for anything else."""
    try:
        with open_npz(Path(path)) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(arrays.pop("meta.json").tobytes().decode())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile,
            UnicodeDecodeError) as err:
        looks = " (it looks like a Python pickle, which runs code when loaded)" \
            if _starts_like_pickle(path) else ""
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: refused: not a cnnzoo Flax state file{looks} ({reason}); "
                              "only checkpoints written by cnnzoo are loaded") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: refused: not a cnnzoo Flax state file ({FORMAT})")
    return meta, arrays


def _starts_like_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"
    except OSError:
        return False


def _fill_variables(path: Path, meta: dict, arrays: dict, template: dict) -> dict:
    """The variables tree shaped like ``template`` from a state file's ``v<i>`` arrays."""
    stored = {tuple(p): arrays.get(f"v{i}") for i, p in enumerate(meta.get("variables", []))}
    wanted = dict(_variables(template))
    missing = [p for p in wanted if p not in stored]
    extra = [p for p in stored if p not in wanted]
    shapes = [p for p in wanted if p in stored and (stored[p] is None or np.shape(stored[p])
                                                     != np.shape(wanted[p]))]
    if missing or extra or shapes:
        what = "; ".join(f"{label}: {', '.join('/'.join(p[1:]) for p in items[:3])}"
                         + (" ..." if len(items) > 3 else "")
                         for label, items in (("missing", missing), ("unexpected", extra),
                                              ("other shapes", shapes)) if items)
        raise CheckpointError(f"{path}: does not fit this {meta.get('arch')} model ({what})")
    tree = {c: {} for c in _COLLECTIONS}
    for (collection, scope, name) in wanted:
        tree[collection].setdefault(scope, {})[name] = np.asarray(
            stored[(collection, scope, name)], np.float32)
    return tree


def read_state(path: Path, template: dict) -> dict:
    """A training state shaped like ``template`` (this run's ``Steps.init_state``) from a
    state file: same variables, same optimizer leaves in number, shape and dtype."""
    meta, arrays = _read(path)
    variables = _fill_variables(path, meta, arrays, template)
    leaves, treedef = jax.tree_util.tree_flatten(template["opt_state"])
    stored = [arrays.get(f"o{i}") for i in range(len(leaves))]
    if sum(k.startswith("o") for k in arrays) != len(leaves) or any(
            s is None or s.shape != np.shape(t) or s.dtype != np.asarray(t).dtype
            for s, t in zip(stored, leaves)):
        raise CheckpointError(f"{path}: its optimizer state does not fit this run's optimizer "
                              "(written with other optim settings?)")
    return {**variables, "opt_state": jax.tree_util.tree_unflatten(treedef, stored)}


def load_weights(model, path: Path) -> None:
    """The variables of a state file into ``model`` (a FlaxModel)."""
    meta, arrays = _read(path)
    model.variables = _fill_variables(path, meta, arrays, model.variables)
