"""task=lr_find: a learning-rate range test, as Lightning's ``Tuner.lr_find`` and fastai's
``lr_find`` run it.

The configured model (seeded init, as task=train builds it) trains for up to
``lr_find.num_steps`` steps, one per rate, the rates rising exponentially from
``lr_find.min_lr`` to ``lr_find.max_lr`` (``Backend.lr_range_test`` runs the steps). The
losses are smoothed with a bias-corrected exponential moving average; the test stops early when
the smoothed loss exceeds ``lr_find.early_stop_threshold`` times its best or stops being
finite. The suggestion is the rate where the smoothed loss falls fastest against log(rate),
leaving out the first ``SKIP_BEGIN`` and the last ``SKIP_END`` points (Lightning's rule). The
weights are thrown away; the run directory gets lr_find.csv, lr_find.png, lr_find.json and
results.json (so sweeps summarise lr_find runs too)."""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ..core.errors import RunFailed
from ..core.optim import Optimizer
from ..core.rundir import SCHEMA_VERSION, atomic_write_bytes, write_json
from .experiment import build_model, prepare

BETA = 0.98  # the moving average's weight of the past (Lightning and fastai)
SKIP_BEGIN, SKIP_END = 10, 1  # points left out of the suggestion (Lightning's defaults)
MIN_POINTS = SKIP_BEGIN + SKIP_END + 2  # a gradient needs two points between the skipped ones
FILES = ("lr_find.csv", "lr_find.png", "lr_find.json")


def rates(min_lr: float, max_lr: float, num_steps: int) -> list[float]:
    """``num_steps`` rates from ``min_lr`` to ``max_lr`` (both included), each the previous
    times the same factor."""
    return [float(r) for r in np.geomspace(min_lr, max_lr, num_steps)]


@dataclass
class Smoother:
    """The bias-corrected exponential moving average of the losses added so far: the average
    starts at 0, so dividing by ``1 - beta^n`` keeps the first points at the losses' scale."""
    beta: float = BETA
    average: float = 0.0
    count: int = 0

    def add(self, loss: float) -> float:
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * loss
        return self.average / (1 - self.beta ** self.count)


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    smoother = Smoother(beta)
    return [smoother.add(loss) for loss in losses]


@dataclass
class EarlyStop:
    """The ``stop`` of ``Backend.lr_range_test``: true once the smoothed loss is not finite, or
    exceeds ``threshold`` times its best so far (``threshold`` None: only the first). ``reason``
    then says why, in words."""
    threshold: float | None
    smoothed: list[float] = field(default_factory=list)
    best: float = math.inf
    reason: str | None = None
    _smoother: Smoother = field(default_factory=Smoother)

    def __call__(self, losses: list[float]) -> bool:
        for loss in losses[len(self.smoothed):]:  # the new ones (one per step)
            self.smoothed.append(self._smoother.add(loss))
        current, step = self.smoothed[-1], len(self.smoothed)
        if not math.isfinite(current):
            self.reason = f"the loss became {losses[-1]} at step {step}"
        elif self.threshold is not None and current > self.threshold * self.best:
            self.reason = (f"the smoothed loss {current:.4g} exceeded {self.threshold:g} x its "
                           f"best {self.best:.4g} at step {step}")
        else:
            self.best = min(self.best, current)
        return self.reason is not None


def steepest_descent(lrs: list[float], smoothed: list[float]) -> int | None:
    """The index of the most negative gradient of the smoothed loss with respect to log(lr),
    the first ``SKIP_BEGIN`` and the last ``SKIP_END`` points and non-finite ones left out;
    None when fewer than two points remain."""
    kept = [i for i in range(SKIP_BEGIN, len(smoothed) - SKIP_END) if math.isfinite(smoothed[i])]
    if len(kept) < 2:
        return None
    gradient = np.gradient(np.array(smoothed)[kept], np.log(np.array(lrs)[kept]))
    return kept[int(np.argmin(gradient))]


def lr_find(cfg: DictConfig, run_dir: Path) -> None:
    """task=lr_find: run the test, write its files, print the suggestion; RunFailed (exit 1)
    when it stopped too early for a suggestion (the files are written first)."""
    t0 = time.perf_counter()
    c, batch = cfg.lr_find, cfg.data.batch_size  # one device (validate refuses more)
    exp = prepare(cfg)
    backend, model, _ = build_model(cfg, run_dir, exp)
    print(f"lr_find: {exp.spec.name} on {cfg.backend.name}, optim {cfg.optim.name}, "
          f"{c.num_steps} rates from {c.min_lr:g} to {c.max_lr:g}, batches of {batch} "
          f"{cfg.data.name} images", flush=True)
    stop = EarlyStop(c.early_stop_threshold)
    planned = rates(c.min_lr, c.max_lr, c.num_steps)
    losses = backend.lr_range_test(model, exp.train_split, planned, stop)
    lrs, smoothed = planned[:len(losses)], smooth(losses)
    best = steepest_descent(lrs, smoothed)
    result = describe(cfg, exp.spec.name, lrs, best, stop.reason, time.perf_counter() - t0)
    write_files(run_dir, lrs, losses, smoothed, best, result)
    print(f"stopped: {stop.reason}" if stop.reason else result["stop_reason"])
    if best is not None:
        print(f"suggested learning rate: {lrs[best]:.3g} ({result['rule']}; at a global batch "
              f"of {batch})")
        optim = Optimizer.from_config(cfg.optim)
        if result["suggested_optim_lr"] != lrs[best]:  # the recipe scales optim.lr to the batch
            print(f"  as the recipe's rate: optim.lr={result['suggested_optim_lr']:.3g} (at its "
                  f"batch of {optim.reference_batch}, {optim.scaling_rule} scaling)")
    print("wrote " + ", ".join(str(run_dir / name) for name in FILES))
    if best is None:
        raise RunFailed(no_suggestion(result))


def describe(cfg: DictConfig, arch: str, lrs: list[float], best: int | None,
             stopped: str | None, seconds: float) -> dict:
    """lr_find.json: the suggestion (None without one), the global batch it is for, the
    settings, the steps run and why the test ended."""
    c, optim = cfg.lr_find, Optimizer.from_config(cfg.optim)
    # optim.lr is stated at the recipe's batch: the value that scales to the suggestion here
    per_lr = optim.scaled_lr(cfg.data.batch_size) / optim.lr
    return {"suggested_lr": None if best is None else lrs[best],
            "suggested_optim_lr": None if best is None else lrs[best] / per_lr,
            "suggested_step": None if best is None else best + 1,
            "rule": "steepest descent of the smoothed loss",
            "global_batch_size": cfg.data.batch_size, "min_lr": c.min_lr, "max_lr": c.max_lr,
            "num_steps": c.num_steps, "early_stop_threshold": c.early_stop_threshold,
            "steps_run": len(lrs), "stopped_early": stopped is not None,
            "stop_reason": stopped or f"all {c.num_steps} rates ran",
            "backend": cfg.backend.name, "arch": arch, "optim": cfg.optim.name,
            "data": cfg.data.name, "seed": cfg.seed, "total_s": round(seconds, 3)}


def no_suggestion(result: dict) -> str:
    return (f"lr_find: no suggestion: {result['steps_run']} steps ran before "
            f"{result['stop_reason']}, and the rule needs at least {MIN_POINTS} finite ones; "
            "raise lr_find.num_steps or lower lr_find.max_lr")


def write_files(run_dir: Path, lrs, losses, smoothed, best: int | None, result: dict) -> None:
    """lr_find.csv (step, lr, loss, smoothed_loss), lr_find.png, lr_find.json and results.json
    (status failed, with the reason, when there is no suggestion)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["step", "lr", "loss", "smoothed_loss"])
    writer.writerows(zip(range(1, len(lrs) + 1), lrs, losses, smoothed))
    atomic_write_bytes(run_dir / "lr_find.csv", text.getvalue().encode())
    plot(run_dir / "lr_find.png", lrs, losses, smoothed, best,
         f"{result['arch']} on {result['backend']}, {result['optim']}, global batch "
         f"{result['global_batch_size']}")
    write_json(run_dir / "lr_find.json", result)
    failed = {"status": "failed", "error": no_suggestion(result)} if best is None else {
        "status": "ok"}
    write_json(run_dir / "results.json", {
        "schema_version": SCHEMA_VERSION, "task": "lr_find", **failed,
        "arch": result["arch"], "backend": result["backend"], "seed": result["seed"],
        "metrics": {"suggested_lr": result["suggested_lr"]}, "lr_find": "lr_find.json",
        "timings": {"total_s": result["total_s"]}})


def plot(path: Path, lrs, losses, smoothed, best: int | None, title: str) -> None:
    """The loss and the smoothed loss against the rate (log axis), the suggestion marked."""
    from .report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="0.75", linewidth=1, label="loss")
    ax.plot(lrs, smoothed, color="C0", label=f"smoothed loss (EMA, beta {BETA})")
    if best is not None:
        ax.plot(lrs[best], smoothed[best], "o", color="C3", markersize=8,
                label=f"suggestion: {lrs[best]:.3g}")
        ax.axvline(lrs[best], color="C3", linestyle=":", linewidth=1)
    finite = [v for v in smoothed if math.isfinite(v)]
    if finite:  # up to the smoothed curve's top: an exploding raw loss would flatten it
        low = min(finite + [v for v in losses if math.isfinite(v)])
        high = max(finite)
        margin = 0.05 * (high - low) or 0.05 * abs(low) or 0.05
        ax.set_ylim(low - margin, high + margin)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
