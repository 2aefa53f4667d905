"""A weights file or a zoo model's name -> canonical weights that fit a spec: the one entry
point the application calls (``finetune.weights``, ``verify.weights``).

When the weights were trained for another class count than the spec's (ImageNet's 1000 classes
into a model of your 5), the classifier's parameters are left out, so the model keeps its own
freshly initialised classifier; ``Imported.reinitialised`` names those nodes. Any other
difference is an error that names every missing, unexpected and mis-shaped key."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from architectures import spec as S

from ..errors import WeightsError
from ..finetune import classifier_nodes
from ..weights import check_weights, expected_shapes
from . import catalog, files


@dataclass
class Imported:
    weights: dict[str, np.ndarray]  # canonical keys of the spec, the reinitialised ones left out
    path: Path                      # the file read
    fmt: str                        # its format
    zoo_model: str | None           # "torchvision:resnet50" when a zoo model was named
    reinitialised: list[str]        # classifier nodes left to the model's own initialisation


def import_weights(source: str, spec: S.Spec, input_size: int, fmt: str | None = None,
                   options: dict | None = None) -> Imported:
    """Read ``source`` (a path, or ``<zoo>:<name>``, downloaded once into the cache) as
    canonical weights for ``spec`` at ``input_size``; ``options``: the configured arch.options,
    checked against a zoo variant's."""
    zoo_model = None
    if catalog.is_zoo_name(source):
        zoo_model = catalog.find(source)
        _check_same_network(zoo_model, spec, options or {})
        from .download import fetch
        path = fetch(zoo_model)
    else:
        path = Path(source)
    fmt, tensors = files.read_tensors(path, fmt)
    layout = zoo_model.layout if zoo_model else files.LAYOUT_OF[fmt]
    canonical = tensors if layout is None else layout_module(layout).to_canonical(
        tensors, spec, input_size)
    expected = expected_shapes(spec, input_size)
    dropped = _other_classifier(canonical, expected, spec)
    kept = {k: v for k, v in canonical.items() if k.split("/")[0] not in dropped}
    check_weights(kept, {k: s for k, s in expected.items() if k.split("/")[0] not in dropped},
                  what=f"weights from {source}")
    return Imported({k: np.asarray(v, dtype=np.float32) for k, v in kept.items()}, path, fmt,
                    zoo_model.id if zoo_model else None, sorted(dropped))


def layout_module(name: str):
    """The layout module ``<name>_layout`` (imported when used)."""
    return importlib.import_module(f"{__package__}.{name}_layout")


def _other_classifier(weights: dict, expected: dict, spec: S.Spec) -> set[str]:
    """Classifier nodes whose parameters in ``weights`` have another class count."""
    out = set()
    for node in classifier_nodes(spec):
        for param in ("weight", "bias"):
            k = f"{node}/{param}"
            if k in weights and k in expected and \
                    np.shape(weights[k])[:1] != expected[k][:1]:
                out.add(node)
    return out


def _check_same_network(model, spec: S.Spec, options: dict) -> None:
    """A zoo model names its architecture (and a variant's options): the configured one must
    be that network."""
    if model.arch != spec.name:
        raise WeightsError(f"{model.id} is the architecture {model.arch}, the run's is "
                           f"{spec.name}: set arch={model.arch}")
    wrong = {k: v for k, v in model.options.items() if options.get(k) != v}
    if wrong:
        sets = " ".join(f"arch.options.{k}={v}" for k, v in wrong.items())
        raise WeightsError(f"{model.id} is a variant of {model.arch} ({model.options}); "
                           f"set {sets}")
