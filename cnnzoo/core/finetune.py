"""What fine-tuning changes in training, the same in every backend: which parametrised nodes
stay as they were loaded (``finetune.freeze``, ``finetune.freeze_backbone``; their batch norms
use their running statistics and do not update them), and the learning rate of the backbone
as a multiple of the rate (``finetune.backbone_lr``; the classifier trains at the rate).

The classifier is the dense layers that produce class scores (the output's and each
auxiliary head's), the backbone every other parametrised node. A backend applies this to its
own parameters: a node's parameters get no update when frozen, and their update is scaled by
``lr_scale(node)`` otherwise (what a per-parameter-group learning rate does in torch)."""
from __future__ import annotations

from dataclasses import dataclass

from architectures import spec as S

from .errors import ConfigError
from .weights import parametrised


def classifier_nodes(spec: S.Spec) -> list[str]:
    """The dense layers that produce class scores: the output's and each auxiliary head's."""
    heads = {spec.output, *spec.aux_outputs}
    return [n.name for n in spec.nodes if n.name in heads and isinstance(n.layer, S.Dense)]


@dataclass(frozen=True)
class FineTuning:
    frozen: frozenset[str] = frozenset()  # parametrised nodes that are not trained
    backbone: frozenset[str] = frozenset()  # parametrised nodes outside the classifier
    backbone_lr: float = 1.0

    @classmethod
    def from_config(cls, cfg, spec: S.Spec) -> "FineTuning":
        ft = cfg.get("finetune") or {}
        nodes = [n.name for n, _, _ in parametrised(spec)]
        backbone = frozenset(nodes) - set(classifier_nodes(spec))
        frozen = set(backbone) if ft.get("freeze_backbone") else set()
        for prefix in ft.get("freeze") or []:
            hit = {n for n in nodes if _under(n, prefix)}
            if not hit:
                raise ConfigError(f"finetune.freeze: '{prefix}' starts no parametrised node of "
                                  f"{spec.name} (they are {', '.join(nodes[:6])}, ...): "
                                  "python run.py task=summary lists them")
            frozen |= hit
        return cls(frozenset(frozen), backbone, float(ft.get("backbone_lr", 1.0)))

    @property
    def active(self) -> bool:
        return bool(self.frozen) or self.backbone_lr != 1.0

    def lr_scale(self, node: str) -> float:
        """The multiple of the rate node ``node``'s parameters train at (0: frozen)."""
        if node in self.frozen:
            return 0.0
        return self.backbone_lr if node in self.backbone else 1.0


def _under(node: str, prefix: str) -> bool:
    """``layer1`` names ``layer1`` and ``layer1.0.conv1``, not ``layer10``."""
    return node.startswith(prefix) and (len(node) == len(prefix)
                                         or not node[len(prefix)].isalnum())
