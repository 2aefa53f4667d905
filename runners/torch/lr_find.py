"""task=lr_find's steps (``Backend.lr_range_test``): the training loop's own step
(``train.train_step``, its ``Classifier`` loss and configured optimizer) on one device of
Lightning Fabric, with the optimizer's rate replaced before each step."""
from __future__ import annotations

from lightning_fabric import Fabric

from cnnzoo.core.lr_range import consecutive_batches, range_test
from cnnzoo.core.optim import Optimizer

from .train import EpochSums, check_gpus, train_step, training_modules


def lr_range_test(cfg, net, loader, rates, stop) -> list[float]:
    """One ``train_step`` per rate on the batches of ``loader`` (the backend's training input
    pipeline), epoch after epoch; each step's loss read back to the host."""
    hw = cfg.hardware
    check_gpus(hw)
    # the accelerator and precision of training, on one device in this process (no launcher)
    fabric = Fabric(accelerator=hw.accelerator, devices=1, precision=hw.precision)
    model, opt = fabric.setup(*training_modules(cfg, net))
    model.train()
    sums = EpochSums(fabric)  # what train_step reports to; only its returned loss is read
    clip = Optimizer.from_config(cfg.optim).clip_grad_norm

    def step(rate: float, batch) -> float:
        for group in opt.param_groups:
            group["lr"] = rate * group.get("lr_scale", 1.0)
        return train_step(fabric, model, opt, batch, sums, clip).item()

    return range_test(rates, consecutive_batches(loader, loader.sampler.set_epoch), step, stop)
