"""Checkpoint files: the training state of an epoch folder, written without pickle and loaded
only after checking it is what we wrote.

An epoch folder (``cnnzoo.core.checkpoints.CheckpointDir``) holds ``model.params``
(``save_parameters``), ``optimizer.nd`` (the optimizer's per-parameter states, ``mx.nd.save``)
and ``trainer.json`` (update counters, learning rate). ``Trainer.save_states`` would pickle the
optimizer, so it is not used; a file that is not an NDArray file is refused before MXNet reads
it. With the weights, these restore a ``gluon.Trainer`` exactly: the generators need no saved
state, since they are reseeded at every epoch start."""
from __future__ import annotations

import json
from pathlib import Path

from cnnzoo.core.errors import CheckpointError

WEIGHTS_FILE, OPTIMIZER_FILE, TRAINER_FILE = "model.params", "optimizer.nd", "trainer.json"
TRAINER_FORMAT = "cnnzoo-mxnet-trainer/1"
# --------------------------------------------------------------------------- checkpoints
_ND_MAGIC = (0x112).to_bytes(8, "little")  # the header of MXNet's NDArray files (mx.nd.save)
_ONLY_OURS = "only checkpoints written by cnnzoo are loaded"


def check_nd_file(path: Path) -> None:
    """Refuse (``CheckpointError``) a file that is not an MXNet NDArray file before MXNet reads
    it: a pickle, say, saved under the expected name."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read: {err.strerror or err}") from None
    if head != _ND_MAGIC:
        looks = " (it looks like a Python pickle, which runs code when loaded)" \
            if head[:1] == b"\x80" else ""
        raise CheckpointError(f"{path}: refused: not an MXNet NDArray file{looks}; "
                              f"{_ONLY_OURS}")


def load_nd(mx, path: Path) -> dict:
    """The named NDArrays of an ``mx.nd.save`` file (MXNet's own format: nothing is unpickled)."""
    check_nd_file(path)
    try:
        arrays = mx.nd.load(str(path))
    except mx.base.MXNetError as err:
        raise CheckpointError(f"{path}: damaged NDArray file ({_first_line(err)})") from None
    if isinstance(arrays, list) and not arrays:  # an empty dict is read back as []
        return {}
    if not isinstance(arrays, dict):
        raise CheckpointError(f"{path}: refused: unnamed arrays; {_ONLY_OURS}")
    return arrays


def _first_line(err: Exception) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return next((ln for ln in lines if "Error" in ln or "failed" in ln), lines[-1] if lines
                else type(err).__name__).strip()


def _updaters(trainer) -> list:
    """The ``Updater``s that hold the optimizer's per-parameter states: the kvstore's when it
    updates the weights (several contexts, by default), else one per context."""
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    if trainer._kvstore is not None and trainer._update_on_kvstore:
        return [trainer._kvstore._updater]
    return list(trainer._updaters)


def save_trainer_state(mx, trainer, folder: Path) -> None:
    """What ``Trainer.save_states`` saves, without pickle: every updater's per-parameter states
    (NDArrays, tuples of them or None) in ``optimizer.nd`` under flat keys
    ``<updater>/<index>/<position>``, their layout and the optimizer's counters (updates per
    context and parameter, ``num_update``) and learning rate in ``trainer.json``."""
    opt, arrays, layout = trainer._optimizer, {}, []
    cpu = mx.cpu()

    def encode(state, name):
        if state is None:
            return None
        if isinstance(state, mx.nd.NDArray):
            arrays[name] = state.as_in_context(cpu)
            return name
        if isinstance(state, (tuple, list)):
            return {type(state).__name__: [encode(s, f"{name}/{j}") for j, s in enumerate(state)]}
        raise TypeError(f"cannot save optimizer state of type {type(state).__name__}")

    for u, updater in enumerate(_updaters(trainer)):
        layout.append([[i, encode(updater.states[i], f"{u}/{i}")]
                       for i in sorted(updater.states, key=str)])
    current = next((d for d, c in opt._all_index_update_counts.items()
                    if c is opt._index_update_count), 0)
    meta = {"format": TRAINER_FORMAT, "optimizer": type(opt).__name__,
            "learning_rate": opt.learning_rate, "num_update": opt.num_update,
            "begin_num_update": opt.begin_num_update, "current_context": current,
            "update_counts": [[d, i, n] for d, counts in opt._all_index_update_counts.items()
                              for i, n in counts.items()],
            "updaters": layout}
    mx.nd.save(str(folder / OPTIMIZER_FILE), arrays)
    (folder / TRAINER_FILE).write_text(json.dumps(meta) + "\n")


def restore_trainer_state(mx, trainer, folder: Path) -> None:
    """Put what ``save_trainer_state`` wrote into a freshly created ``trainer`` of the same
    config; a file that does not fit raises ``CheckpointError``."""
    path = folder / TRAINER_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != TRAINER_FORMAT:
        raise CheckpointError(f"{path}: refused: not a cnnzoo MXNet trainer state; {_ONLY_OURS}")
    opt, updaters = trainer._optimizer, _updaters(trainer)
    if meta.get("optimizer") != type(opt).__name__ or len(meta.get("updaters", ())) != len(
            updaters):
        raise CheckpointError(f"{path}: written for optimizer {meta.get('optimizer')!r} with "
                              f"{len(meta.get('updaters', ()))} updater(s), this run has "
                              f"{type(opt).__name__!r} with {len(updaters)}")
    arrays = load_nd(mx, folder / OPTIMIZER_FILE)
    shapes = [p.shape for p in trainer._params]

    def decode(tree, shape):
        if tree is None:
            return None
        if isinstance(tree, str):
            if arrays[tree].shape != shape:
                raise ValueError(f"'{tree}' has shape {arrays[tree].shape}, its weight {shape}")
            return arrays[tree]
        (kind, items), = tree.items()
        return {"tuple": tuple, "list": list}[kind](decode(t, shape) for t in items)

    try:
        states = [{i: decode(tree, shapes[i]) for i, tree in layout}
                  for layout in meta["updaters"]]
        counts = {}
        for d, i, n in meta["update_counts"]:
            counts.setdefault(d, {})[i] = int(n)
        num_update, begin = int(meta["num_update"]), int(meta["begin_num_update"])
        lr, current = float(meta["learning_rate"]), meta["current_context"]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path}: damaged or of another model: {err!r}") from None
    for updater, s in zip(updaters, states):
        updater.states = s
        updater.states_synced = dict.fromkeys(s, False)  # moved to each weight's context
    opt._all_index_update_counts = counts or {0: {}}
    opt._index_update_count = opt._all_index_update_counts.setdefault(current, {})
    opt.num_update, opt.begin_num_update = num_update, begin
    trainer.set_learning_rate(lr)


def write_state(mx, model, trainer, folder: Path) -> None:
    """The training state into an epoch folder being written (``CheckpointDir.save``)."""
    model.save_parameters(str(folder / WEIGHTS_FILE))
    save_trainer_state(mx, trainer, folder)


def load_weights_file(mx, model, path: Path) -> None:
    """``load_parameters`` of an NDArray file (checked first: a pickle is refused unread)."""
    check_nd_file(path)
    try:
        model.load_parameters(str(path), ctx=mx.cpu())
    except (mx.base.MXNetError, AssertionError, ValueError, KeyError, AttributeError,
            TypeError) as err:
        raise CheckpointError(f"{path}: cannot be loaded into this {model.spec.name} model: "
                              f"{_first_line(err)}") from None
