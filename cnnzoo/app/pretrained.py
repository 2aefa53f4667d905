"""``finetune.weights``: a training run that starts from pretrained weights (a zoo model or a
weights file) instead of random ones.

The weights are read and checked before anything is written (a wrong file changes nothing),
and put into the freshly built model through the backend's canonical weights, so every backend
takes them the same way; a resumed run takes its checkpoint instead."""
from __future__ import annotations

from omegaconf import DictConfig

from ..core.errors import WeightsError
from ..core.zoo import catalog
from ..core.zoo.load import Imported, import_weights

# the data.* keys of the preprocessing contract that pretrained weights come with
PREPROCESS_KEYS = ("mean", "std", "channel_order", "crop_fraction", "interpolation")


def weights_preprocessing(cfg: DictConfig) -> dict:
    """The data.* preprocessing keys a zoo model's weights were trained with, which replace
    the data config's (``finetune.preprocess: weights``); {} for a file or ``data``."""
    source = cfg.get("finetune", {}).get("weights")
    if source is None or cfg.finetune.preprocess != "weights" or \
            not catalog.is_zoo_name(str(source)):
        return {}
    model = catalog.find(str(source))
    return {k: model.preprocess[k] for k in PREPROCESS_KEYS if k in model.preprocess}


def read_pretrained(cfg: DictConfig, spec) -> Imported | None:
    """The configured ``finetune.weights`` as canonical weights for ``spec`` (None: none)."""
    source = cfg.finetune.weights
    if source is None:
        return None
    pre = weights_preprocessing(cfg)
    if pre:
        print(f"preprocessing of {source}'s weights (finetune.preprocess=weights): "
              + ", ".join(f"{k} {v}" for k, v in pre.items()), flush=True)
    try:
        return import_weights(str(source), spec, cfg.arch.input_size, cfg.finetune.format,
                              cfg.arch.get("options") or {})
    except WeightsError as err:
        raise WeightsError(f"finetune.weights={source}: {err}") from None


def apply_pretrained(backend, model, imported: Imported, num_classes: int) -> dict:
    """Put ``imported`` into ``model`` (the rest keeps its initialisation); what results.json
    records of it."""
    weights = backend.get_weights(model)
    weights.update(imported.weights)
    backend.set_weights(model, weights)
    source = imported.zoo_model or str(imported.path)
    print(f"weights: {len(imported.weights)} tensors from {source} ({imported.fmt})"
          + (f"; {', '.join(imported.reinitialised)} initialised anew for {num_classes} classes"
             if imported.reinitialised else ""), flush=True)
    return {"weights": source, "file": str(imported.path), "format": imported.fmt,
            "reinitialised": imported.reinitialised}
