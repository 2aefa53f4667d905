"""What the ``optim`` and ``trainer.limit_*`` settings mean, stated once; each backend maps
``Optimizer`` onto its framework's classes.

The meaning is PyTorch's (``torch.optim``): SGD (momentum, Nesterov), Adam and RMSprop add
``weight_decay * w`` to the gradient; AdamW shrinks the weights by ``lr * weight_decay``
(decoupled); RMSprop's defaults are the Inception papers' decay 0.9 and epsilon 1.0. The
schedule is set once per epoch: constant, or cosine to 0 over ``trainer.max_epochs``
(``CosineAnnealingLR``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("none", "cosine")
DEFAULT_EPS = {"sgd": None, "adam": 1e-8, "adamw": 1e-8, "rmsprop": 1.0}


@dataclass(frozen=True)
class Optimizer:
    name: str
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0        # sgd, rmsprop
    nesterov: bool = False       # sgd
    alpha: float = 0.9           # rmsprop: the squared-gradient average's decay
    eps: float | None = None     # adam, adamw, rmsprop
    scheduler: str = "none"

    @classmethod
    def from_config(cls, c) -> Optimizer:
        """The ``optim`` config node with every default filled in."""
        if c.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name={c.name!r} is invalid: expected one of "
                              + ", ".join(OPTIMIZERS))
        eps = c.get("eps")
        return cls(name=c.name, lr=float(c.lr), weight_decay=float(c.get("weight_decay") or 0.0),
                   momentum=float(c.get("momentum") or 0.0),
                   nesterov=bool(c.get("nesterov") or False),
                   alpha=float(c.get("alpha") if c.get("alpha") is not None else 0.9),
                   eps=DEFAULT_EPS[c.name] if eps is None else float(eps),
                   scheduler=c.get("scheduler") or "none")

    def learning_rate(self, epoch: int, max_epochs: int) -> float:
        """The rate of 0-based ``epoch``: constant, or cosine to 0 over ``max_epochs`` as
        torch's CosineAnnealingLR stepped once per epoch."""
        if self.scheduler == "cosine":
            return self.lr * (1 + math.cos(math.pi * epoch / max_epochs)) / 2
        return self.lr


def num_batches(limit, total: int) -> int:
    """Lightning's rule for ``trainer.limit_*_batches``: a fraction (<= 1.0) of the batches, at
    least one, or a whole number of them."""
    return min(total, int(limit)) if limit > 1 else max(1, int(total * limit))
