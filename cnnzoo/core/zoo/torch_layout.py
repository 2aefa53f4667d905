"""A torch state dict (torchvision's, timm's) <-> canonical weights.

Canonical weights are PyTorch's layouts already, so this layout only renames: a state-dict key
``<module>.<param>`` is the canonical ``<spec node>/<param>``. Where an architecture's reference
is torchvision or timm, the spec's node names are the reference's module names
(``layer1.0.conv1.weight`` <-> ``layer1.0.conv1/weight``), except where the reference keeps
layers in a numbered sequence; those names are derived from the spec's own order:

- torchvision ``alexnet``, ``vgg16``, ``vgg19``: ``features.<i>`` for the i-th node before the
  adaptive average pool, ``classifier.<i>`` for the i-th node after the flatten (every ReLU,
  pool and dropout counts, as in torchvision's ``nn.Sequential``);
- timm ``vgg16``/``vgg19``: the same ``features``; the three dense layers are
  ``pre_logits.fc1`` (a 7x7 convolution over the pooled map: the dense weight reshaped),
  ``pre_logits.fc2`` (a 1x1 convolution) and ``head.fc``;
- timm ``inception_v4``: ``features.<i>`` for the i-th block before the global pool (the spec
  names them by TF-slim: ``features.3.conv`` is ``Mixed_3a.conv``);
- timm ``legacy_xception``: the separable convolutions, batch norms, ReLUs and the pool of a
  residual block are ``<block>.rep.<i>`` in order (``block1.sepconv1.pointwise`` is
  ``block1.rep.0.pointwise``), its shortcut ``<block>.skip``/``<block>.skipbn`` as in the spec.

``num_batches_tracked`` is skipped, and so are the reference's auxiliary classifiers
(torchvision ``googlenet``'s ``aux1``/``aux2``, ``inception_v3``'s ``AuxLogits``) when the spec
has none. A state dict in the spec's own node names reads too.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

import architectures
from architectures import spec as S

from ..errors import WeightsError
from ..weights import DENSE, float32_contiguous, parametrised

ZOOS = ("torchvision", "timm")
_SKIPPED_BUFFERS = ("num_batches_tracked",)


@dataclass(frozen=True)
class Place:
    """Where a spec node's parameters lie in a zoo's state dict."""
    module: str                                # the module's name in the state dict
    conv_input: tuple[int, int, int] | None = None  # a dense layer stored as a convolution
    # over this (C, H, W) input: its weight is (out, C, H, W)


# --------------------------------------------------------------------------- names by order
def _split_at(nodes, start_type, end_type) -> tuple[list, list]:
    """The nodes before the first ``start_type`` node and those after the first ``end_type``."""
    names = [n.name for n in nodes]
    start = next(i for i, n in enumerate(nodes) if isinstance(n.layer, start_type))
    end = next(i for i, n in enumerate(nodes) if isinstance(n.layer, end_type))
    return names[:start], names[end + 1:]


def _sequential(spec: S.Spec, analysis) -> dict[str, Place]:
    """torchvision's AlexNet/VGG: ``features`` and ``classifier`` sequences, each position one
    spec node."""
    features, classifier = _split_at(spec.nodes, S.AdaptiveAvgPool, S.Flatten)
    return {**{n: Place(f"features.{i}") for i, n in enumerate(features)},
            **{n: Place(f"classifier.{i}") for i, n in enumerate(classifier)}}


def _timm_vgg(spec: S.Spec, analysis) -> dict[str, Place]:
    """timm's VGG: torchvision's ``features``; the classifier's dense layers as ConvMlp's two
    convolutions (the first over the whole pooled map) and ``head.fc``."""
    places = {n: p for n, p in _sequential(spec, analysis).items()
              if p.module.startswith("features.")}
    flatten = next(n for n in spec.nodes if isinstance(n.layer, S.Flatten))
    dense = [n.name for n in spec.nodes if isinstance(n.layer, S.Dense)]
    if len(dense) != 3:
        raise WeightsError(f"{spec.name} has {len(dense)} dense layers; timm's VGG has 3")
    pooled = tuple(analysis[flatten.name].in_shape)
    width = analysis[dense[1]].in_shape
    return {**places, dense[0]: Place("pre_logits.fc1", pooled),
            dense[1]: Place("pre_logits.fc2", (width[0], 1, 1)), dense[2]: Place("head.fc")}


def _timm_features(spec: S.Spec, analysis) -> dict[str, Place]:
    """timm's Inception-v4: the blocks before the global pool are ``features.<i>``."""
    trunk, _ = _split_at(spec.nodes, S.GlobalAvgPool, S.Flatten)
    blocks = list(dict.fromkeys(name.split(".")[0] for name in trunk))
    return {name: Place(f"features.{blocks.index(name.split('.')[0])}"
                        + name[len(name.split(".")[0]):]) for name in trunk}


def _timm_xception(spec: S.Spec, analysis) -> dict[str, Place]:
    """timm's legacy Xception: a residual block's main path is one ``rep`` sequence whose items
    are the block's nodes grouped by their second name part (``sepconv1`` is one item)."""
    blocks = {n.name for n in spec.nodes if isinstance(n.layer, S.Add) and "." not in n.name}
    items: dict[str, list[str]] = {}  # block -> the second name parts of its main path
    places = {}
    for node in spec.nodes:
        block, _, rest = node.name.partition(".")
        head, _, tail = rest.partition(".")
        if block not in blocks or not head or head in ("skip", "skipbn"):
            continue
        group = items.setdefault(block, [])
        if head not in group:
            group.append(head)
        places[node.name] = Place(f"{block}.rep.{group.index(head)}" + (f".{tail}" if tail else ""))
    return places


# (architecture, zoo) -> its names where they are not the spec's; every other pair: the spec's
_RULES = {("alexnet", "torchvision"): _sequential, ("vgg16", "torchvision"): _sequential,
          ("vgg19", "torchvision"): _sequential, ("vgg16", "timm"): _timm_vgg,
          ("vgg19", "timm"): _timm_vgg, ("inception_v4", "timm"): _timm_features,
          ("xception", "timm"): _timm_xception}


def reference_zoo(spec: S.Spec) -> str:
    """The zoo of the architecture's reference (torchvision for the others)."""
    try:
        zoo = architectures.arch_info(spec.name).reference.split()[0]
    except KeyError:
        return "torchvision"
    return zoo if zoo in ZOOS else "torchvision"


def places(spec: S.Spec, input_size: int, zoo: str | None = None) -> dict[str, Place]:
    """Every parametrised spec node -> its place in ``zoo``'s state dict (None: the
    architecture's reference)."""
    zoo = zoo or reference_zoo(spec)
    if zoo not in ZOOS:
        raise WeightsError(f"unknown torch zoo '{zoo}': one of {', '.join(ZOOS)}")
    rule = _RULES.get((spec.name, zoo))
    renamed = rule(spec, spec.analyze(input_size)) if rule else {}
    return {node.name: renamed.get(node.name, Place(node.name))
            for node, _, _ in parametrised(spec)}


def _aux_heads(spec: S.Spec) -> set[str]:
    """The first name parts of the auxiliary classifiers the architecture can have, when this
    spec has none (their tensors in a zoo's file are skipped)."""
    if spec.aux_outputs:
        return set()
    try:
        info = architectures.arch_info(spec.name)
    except KeyError:
        return set()
    if "aux_logits" not in inspect.signature(info.fn).parameters:
        return set()
    with_aux = architectures.build_spec(spec.name, spec.num_classes, spec.in_channels,
                                        aux_logits=True)
    own = {n.name for n in spec.nodes}
    return {n.name.split(".")[0] for n in with_aux.nodes if n.name not in own}


# --------------------------------------------------------------------------- the layout
def to_canonical(tensors: dict[str, np.ndarray], spec: S.Spec, input_size: int
                 ) -> dict[str, np.ndarray]:
    """A torchvision or timm state dict (or one in the spec's own names) as canonical weights,
    float32; a dense layer stored as a convolution is flattened back."""
    params = {node.name: (kind, names) for node, kind, names in parametrised(spec)}
    where: dict[str, str] = {node: node for node in params}  # module name -> spec node
    for zoo in ZOOS:
        for node, place in places(spec, input_size, zoo).items():
            if where.setdefault(place.module, node) != node:
                raise AssertionError(f"{place.module} names two nodes of {spec.name}")
    aux = _aux_heads(spec)
    out, source, unplaced = {}, {}, {}
    for name, value in tensors.items():
        module, _, param = name.rpartition(".")
        if param in _SKIPPED_BUFFERS or name.split(".")[0] in aux:
            continue
        node = where.get(module)
        if node is None or param not in params[node][1]:
            unplaced.setdefault(module or name, []).append(param)
            continue
        canonical = f"{node}/{param}"
        if canonical in out:
            raise WeightsError(f"{name} and {source[canonical]} are both {canonical}: the file "
                               "holds two sets of names")
        value = float32_contiguous(value)  # (no copy of what a reader gave as float32)
        if params[node][0] == DENSE and value.ndim == 4:  # timm's VGG: a conv over the map
            value = value.reshape(value.shape[0], -1)
        out[canonical], source[canonical] = value, name
    if unplaced:
        shown = [f"{m} ({', '.join(p)})" for m, p in list(unplaced.items())[:12]]
        more = f" ... and {len(unplaced) - 12} more modules" if len(unplaced) > 12 else ""
        raise WeightsError(f"{len(unplaced)} module(s) of the file have no place in "
                           f"{spec.name}: {'; '.join(shown)}{more}")
    return out


def from_canonical(weights: dict[str, np.ndarray], spec: S.Spec, input_size: int,
                   zoo: str | None = None) -> dict[str, np.ndarray]:
    """Canonical weights as ``zoo``'s state dict (None: the architecture's reference zoo):
    its names, a dense layer that the zoo keeps as a convolution reshaped to one."""
    where = places(spec, input_size, zoo)
    out = {}
    for key, value in weights.items():
        node, _, param = key.rpartition("/")
        if node not in where:
            raise WeightsError(f"{key} is not a parameter of {spec.name}")
        place = where[node]
        value = float32_contiguous(value)
        if place.conv_input is not None and param == "weight":
            value = value.reshape(value.shape[0], *place.conv_input)
        out[f"{place.module}.{param}"] = value
    return out
