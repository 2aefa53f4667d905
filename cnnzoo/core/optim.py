"""What the ``optim`` and ``trainer.limit_*`` settings mean, stated once; each backend maps
``Optimizer`` onto its framework's classes and applies ``Schedule``'s rate before every step.

The meaning is PyTorch's (``torch.optim``): SGD (momentum, Nesterov), Adam and RMSprop add
``weight_decay * w`` to the gradient; AdamW shrinks the weights by ``lr * weight_decay``
(decoupled); RMSprop's defaults are the Inception papers' decay 0.9 and epsilon 1.0. Label
smoothing is ``torch.nn.functional.cross_entropy``'s, and ``clip_grad_norm`` clips the global
norm of the loss's gradient (``torch.nn.utils.clip_grad_norm_``) before the optimizer adds its
weight decay.

A recipe states ``lr`` at a reference batch (``reference_batch``, the paper's); a run whose
global batch differs scales it (Goyal et al. 2017's linear rule for SGD-type optimizers, the
square root for Adam-type ones, as timm's ``--lr-base``). The scaled rate is the peak of a
per-step schedule: a linear warm-up over ``warmup_epochs``, then constant, cosine to 0 by the
last step, or multiplied by ``gamma`` every ``step_epochs`` epochs."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("none", "cosine", "step")
SCALINGS = ("auto", "linear", "sqrt", "none")
SQRT_SCALED = ("adam", "adamw")  # scaling=auto: Adam-type square root, the others linear
DEFAULT_EPS = {"sgd": None, "adam": 1e-8, "adamw": 1e-8, "rmsprop": 1.0}


@dataclass(frozen=True)
class Optimizer:
    name: str
    lr: float                    # the rate at reference_batch (the peak, after warm-up)
    weight_decay: float = 0.0
    momentum: float = 0.0        # sgd, rmsprop
    nesterov: bool = False       # sgd
    alpha: float = 0.9           # rmsprop: the squared-gradient average's decay
    eps: float | None = None     # adam, adamw, rmsprop
    scheduler: str = "none"
    reference_batch: int | None = None  # the global batch lr is meant for (None: any)
    scaling: str = "auto"
    warmup_epochs: float = 0.0
    step_epochs: float = 30.0    # scheduler=step
    gamma: float = 0.1           # scheduler=step
    label_smoothing: float = 0.0
    clip_grad_norm: float | None = None

    @classmethod
    def from_config(cls, c) -> Optimizer:
        """The ``optim`` config node with every default filled in."""
        if c.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name={c.name!r} is invalid: expected one of "
                              + ", ".join(OPTIMIZERS))
        eps, clip = c.get("eps"), c.get("clip_grad_norm")
        return cls(name=c.name, lr=float(c.lr), weight_decay=float(c.get("weight_decay") or 0.0),
                   momentum=float(c.get("momentum") or 0.0),
                   nesterov=bool(c.get("nesterov") or False),
                   alpha=float(c.get("alpha") if c.get("alpha") is not None else 0.9),
                   eps=DEFAULT_EPS[c.name] if eps is None else float(eps),
                   scheduler=c.get("scheduler") or "none",
                   reference_batch=c.get("reference_batch"), scaling=c.get("scaling") or "auto",
                   warmup_epochs=float(c.get("warmup_epochs") or 0.0),
                   step_epochs=float(c.get("step_epochs") or 30.0),
                   gamma=float(c.get("gamma") if c.get("gamma") is not None else 0.1),
                   label_smoothing=float(c.get("label_smoothing") or 0.0),
                   clip_grad_norm=None if clip is None else float(clip))

    @property
    def scaling_rule(self) -> str:
        """linear, sqrt or none: ``scaling`` with auto resolved by the optimizer's type."""
        if self.reference_batch is None:
            return "none"
        if self.scaling == "auto":
            return "sqrt" if self.name in SQRT_SCALED else "linear"
        return self.scaling

    def scaled_lr(self, global_batch: int) -> float:
        """``lr`` scaled from ``reference_batch`` to ``global_batch`` images per step."""
        ratio = global_batch / self.reference_batch if self.reference_batch else 1.0
        return self.lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[
            self.scaling_rule]

    def warmup(self, max_epochs: int) -> float:
        """The warm-up's epochs in a run of ``max_epochs``: a recipe's warm-up as long as the
        run (2 epochs in a 1-epoch try) is cut to half the run. (One the user sets explicitly
        is refused before, by the config's validation.)"""
        return self.warmup_epochs if self.warmup_epochs < max_epochs else max_epochs / 2

    def schedule(self, global_batch: int, steps_per_epoch: int, max_epochs: int) -> Schedule:
        """The per-step rates of a run of ``max_epochs`` epochs of ``steps_per_epoch`` steps of
        ``global_batch`` images."""
        return Schedule(self.scaled_lr(global_batch), self.scheduler, steps_per_epoch,
                        max_epochs, round(self.warmup(max_epochs) * steps_per_epoch),
                        max(1, round(self.step_epochs * steps_per_epoch)), self.gamma)

    def effective(self, global_batch: int, schedule: Schedule) -> dict:
        """results.json's ``optim`` block: what the run used, beside what was configured."""
        return {"name": self.name, "lr": self.lr, "reference_batch": self.reference_batch,
                "global_batch": global_batch, "scaling": self.scaling_rule,
                "effective_lr": schedule.lr, "warmup_epochs": self.warmup(schedule.max_epochs),
                **{k: v for k, v in schedule.summary().items() if k != "lr"},
                "label_smoothing": self.label_smoothing, "clip_grad_norm": self.clip_grad_norm,
                "recipe": self.recipe_line(global_batch, schedule)}

    def recipe_line(self, global_batch: int, schedule: Schedule) -> str:
        """What the run does with ``lr``, for the start of its output, e.g. ``lr 0.0125 = 0.1 x
        32/256 (linear scaling), 2 warm-up epochs (90 steps), cosine to 0 over 15 epochs``."""
        rule, lr = self.scaling_rule, schedule.lr
        if rule != "none" and global_batch == self.reference_batch:
            how = f"lr {lr:.4g} (the recipe's batch)"
        elif rule == "linear":
            how = f"lr {lr:.4g} = {self.lr:g} x {global_batch}/{self.reference_batch} (linear " \
                  "scaling)"
        elif rule == "sqrt":
            how = f"lr {lr:.4g} = {self.lr:g} x sqrt({global_batch}/{self.reference_batch}) " \
                  "(square-root scaling)"
        else:
            how = f"lr {lr:.4g}"
        parts = [f"{how} at a global batch of {global_batch}"]
        warmup = self.warmup(schedule.max_epochs)
        if warmup != self.warmup_epochs:
            parts.append(f"the recipe's {self.warmup_epochs:g} warm-up epochs cut to {warmup:g}, "
                         f"half the run ({schedule.warmup_steps} steps)")
        elif schedule.warmup_steps:
            parts.append(f"{warmup:g} warm-up epochs ({schedule.warmup_steps} steps)")
        parts.append({"none": "then constant",
                      "cosine": f"cosine to 0 over {schedule.max_epochs} epochs",
                      "step": f"x {self.gamma:g} every {self.step_epochs:g} epochs"}
                     [self.scheduler])
        if self.label_smoothing:
            parts.append(f"label smoothing {self.label_smoothing:g}")
        if self.clip_grad_norm is not None:
            parts.append(f"gradient norm clipped at {self.clip_grad_norm:g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each 0-based training step of a run. Every backend sets
    ``rate(step)`` before step ``step``; the rate depends on nothing else, so a resumed run
    continues the same sequence."""
    lr: float               # the peak: optim.lr scaled to the run's global batch
    scheduler: str          # none, cosine, step
    steps_per_epoch: int
    max_epochs: int
    warmup_steps: int = 0   # the rate rises linearly to lr over these steps
    decay_steps: int = 1    # scheduler=step: the rate is multiplied by gamma every decay_steps
    gamma: float = 0.1

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.max_epochs

    def rate(self, step: int) -> float:
        if step < self.warmup_steps:  # lr / warmup_steps at the first step, lr at the last
            return self.lr * (step + 1) / self.warmup_steps
        if self.scheduler == "cosine":  # from lr after warm-up to near 0 at the last step
            done = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return self.lr * (1 + math.cos(math.pi * done)) / 2
        if self.scheduler == "step":  # epochs counted from the run's start, warm-up included
            return self.lr * self.gamma ** (step // self.decay_steps)
        return self.lr

    def rates(self, first: int = 0, last: int | None = None) -> list[float]:
        """The rates of steps ``first`` to ``last`` (excluded; default: the run's end)."""
        return [self.rate(s) for s in range(first, self.total_steps if last is None else last)]

    def epoch_rate(self, epoch: int) -> float:
        """The rate of 0-based ``epoch``'s last step (metrics.csv's ``lr``)."""
        return self.rate((epoch + 1) * self.steps_per_epoch - 1)

    def summary(self) -> dict:
        """The effective values, for results.json."""
        return {"lr": self.lr, "scheduler": self.scheduler, "warmup_steps": self.warmup_steps,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                **({"decay_steps": self.decay_steps, "gamma": self.gamma}
                   if self.scheduler == "step" else {})}


def num_batches(limit, total: int) -> int:
    """Lightning's rule for ``trainer.limit_*_batches``: a fraction (<= 1.0) of the batches, at
    least one, or a whole number of them."""
    return min(total, int(limit)) if limit > 1 else max(1, int(total * limit))
