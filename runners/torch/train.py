"""Training with PyTorch Lightning: the ``LightningModule`` (steps, optimizer, schedule) and
the callback that plugs Lightning's loop into ``cnnzoo.core.training.TrainingProtocol``.

Lightning's ``Trainer`` owns the loop. ``ProtocolHooks`` calls the protocol at its hooks:
``start_epoch`` at ``on_train_epoch_start`` (its seed seeds torch), ``begin_validation`` and
``end_validation`` around validation, and ``end_epoch`` at ``on_train_epoch_end`` (Lightning
has validated by then and steps epoch schedulers after it), with ``trainer.save_checkpoint``
writing the training state into the epoch folder. Under DDP every process calls the protocol
(``is_main`` = ``trainer.is_global_zero``): the means and the save are collective."""
from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback

from cnnzoo.core.checkpoints import CheckpointDir
from cnnzoo.core.errors import ConfigError
from cnnzoo.core.optim import Optimizer
from cnnzoo.core.training import FirstBadStep, TrainingProtocol, TrainReport

from .model import SpecModule
from .state import CHECKPOINT, SafeCheckpointIO, write_training_state

# Lightning's tips (num_workers, logger suggestions) are noise for this product's users
for _name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*number of training batches.*smaller than the logging.*")
warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")

_NO_BATCH = 2**62  # "no non-finite loss yet" (the largest value: processes reduce by min)


def torch_optimizer(optim: Optimizer, params) -> torch.optim.Optimizer:
    """``optim`` as its ``torch.optim`` class (the meaning ``cnnzoo.core.optim`` states)."""
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum,
                               nesterov=optim.nesterov, weight_decay=optim.weight_decay)
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=optim.lr, eps=optim.eps,
                                weight_decay=optim.weight_decay)
    if optim.name == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, eps=optim.eps,
                                 weight_decay=optim.weight_decay)
    if optim.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=optim.lr, alpha=optim.alpha, eps=optim.eps,
                                   momentum=optim.momentum, weight_decay=optim.weight_decay)
    raise ConfigError(f"optim.name={optim.name!r}: the torch backend has no such optimizer")


class Classifier(pl.LightningModule):
    """Cross-entropy training of a SpecModule with the config's optimizer and schedule.

    The steps only add to sums on the device (no host sync, no ``self.log``): per stage the
    loss times the batch's images and the correct predictions, plus, in training, the first
    non-finite loss of the epoch. ``epoch_means`` and ``first_bad_step`` read them once at the
    epoch end, summed (or the minimum taken) over all processes."""

    STAGES = ("train", "val")

    def __init__(self, net: SpecModule, optim: Optimizer, max_epochs: int, channels_last: bool,
                 compile_net: bool = False):
        super().__init__()
        self.net, self.optim, self.max_epochs = net, optim, max_epochs
        self.channels_last, self.compile_net = channels_last, compile_net
        self._compiled = None  # torch.compile of net.forward, made in the training process
        self._loss_sum, self._correct, self._seen = {}, {}, {}
        for stage in self.STAGES:
            self._reset_sums(stage)
        self._reset_divergence()

    def _reset_sums(self, stage: str):
        # float64 (MPS has none: float32 there): a sum over a long epoch stays exact enough,
        # and a finite loss times the batch size never overflows it
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self._loss_sum[stage] = torch.zeros((), dtype=dtype, device=self.device)
        self._correct[stage] = torch.zeros((), dtype=dtype, device=self.device)
        self._seen[stage] = 0  # images, counted on the host: batch sizes need no sync

    def _reset_divergence(self):
        self._bad_batch = torch.tensor(_NO_BATCH, device=self.device)  # 0-based batch index
        self._bad_loss = torch.tensor(0.0, device=self.device)

    def setup(self, stage):
        """With ``backend.compile``: the compiled forward is a plain function attribute, not a
        second module, so the checkpoint's keys, the exported module and ``ddp_spawn``'s copy
        of this object (made before setup) are those of the eager network."""
        if self.compile_net and self._compiled is None:
            self._compiled = torch.compile(self.net.forward)

    def on_train_start(self):
        """After a resume, the config's optimizer hyperparameters and schedule position win
        over the checkpoint's. They are the same unless the run's config was changed, which
        only the Python API allows (task=train refuses to resume a changed config)."""
        if self.trainer.ckpt_path is None:
            return
        fresh = self.configure_optimizers()
        opt, sched = (fresh["optimizer"], fresh["lr_scheduler"]) if isinstance(fresh, dict) \
            else (fresh, None)
        if sched is not None:
            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()"
                warnings.simplefilter("ignore")
                for _ in range(self.current_epoch):
                    sched.step()
        want = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        restored = self.trainer.optimizers[0].param_groups
        if want != [{k: v for k, v in g.items() if k != "params"} for g in restored]:
            for group, values in zip(restored, want):
                group.update(values)
            if sched is not None and self.trainer.lr_scheduler_configs:
                self.trainer.lr_scheduler_configs[0].scheduler.load_state_dict(sched.state_dict())

    def on_train_epoch_start(self):
        # torch is seeded by ProtocolHooks (called before this hook)
        self._reset_divergence()
        for stage in self.STAGES:  # an epoch without validation reports none
            self._reset_sums(stage)

    def on_validation_epoch_start(self):
        self._reset_sums("val")

    @property
    def train_images(self) -> int:
        """This process's training images of this epoch."""
        return self._seen["train"]

    def epoch_means(self) -> dict[str, float]:
        """This epoch's ``train_loss``, ``train_acc`` and (after a validation) ``val_loss``,
        ``val_acc``: means per image over every process's images (one collective under DDP,
        so every process calls it). The loss includes the weighted auxiliary losses."""
        sums = torch.stack([t for s in self.STAGES for t in (self._loss_sum[s], self._correct[s])])
        seen = torch.tensor([self._seen[s] for s in self.STAGES], dtype=sums.dtype,
                            device=sums.device)
        totals = self.trainer.strategy.reduce(torch.cat([sums, seen]), reduce_op="sum").tolist()
        means = {}
        for k, stage in enumerate(self.STAGES):
            n = totals[len(sums) + k]
            if n > 0:
                means[f"{stage}_loss"] = totals[2 * k] / n
                means[f"{stage}_acc"] = totals[2 * k + 1] / n
        return means

    def first_bad_step(self) -> FirstBadStep | None:
        """This epoch's first non-finite training loss, the earliest over all processes (a
        collective under DDP), or None."""
        batch = self.trainer.strategy.reduce(self._bad_batch.clone(), reduce_op="min")
        batch = int(batch)
        if batch == _NO_BATCH:
            return None
        # under DDP another process may have found it: its loss value is not here
        own = int(self._bad_batch) == batch
        return FirstBadStep(batch + 1, float(self._bad_loss) if own else float("nan"))

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x) if self._compiled is None else self._compiled(x)

    def _step(self, batch, stage: str, batch_idx: int = 0):
        x, y = batch
        logits, *aux = self(x) if stage == "train" and self.net.aux_outputs else (self(x),)
        loss = F.cross_entropy(logits, y)
        if aux:  # auxiliary classifiers (GoogLeNet, Inception-v3) add their weighted losses
            loss = loss + self.net.aux_weight * sum(F.cross_entropy(a, y) for a in aux)
        n, detached = len(y), loss.detach()
        correct = (logits.argmax(1) == y).sum()
        self._loss_sum[stage].add_(detached, alpha=n)  # the batch's mean loss times its images
        self._correct[stage].add_(correct)
        self._seen[stage] += n
        if stage == "train":
            self.last_step = (detached, correct, n)  # for the progress display, read when shown
            first = ~torch.isfinite(detached) & (self._bad_batch == _NO_BATCH)
            self._bad_batch = torch.where(first, batch_idx, self._bad_batch)
            self._bad_loss = torch.where(first, detached.float(), self._bad_loss)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        opt = torch_optimizer(self.optim, self.net.parameters())
        if self.optim.scheduler == "cosine":  # its recursive floats are every backend's reference
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_epochs)
            return {"optimizer": opt, "lr_scheduler": sched}
        return opt


class ProtocolHooks(Callback):
    """Lightning's hooks calling the ``TrainingProtocol``, created in each process once its
    rank is known (``setup``; ddp_spawn copies callbacks into the processes it starts)."""

    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.protocol: TrainingProtocol | None = None

    def setup(self, trainer, pl_module, stage):
        if self.protocol is None:
            self.protocol = TrainingProtocol(self.cfg, self.run_dir, "torch",
                                             is_main=trainer.is_global_zero,
                                             checkpoint_file=CHECKPOINT)

    def on_train_epoch_start(self, trainer, pl_module):
        # the rate used in this epoch (Lightning steps epoch schedulers after on_train_epoch_end)
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]
        # the same numbers whether this epoch follows the previous one or a resume
        torch.manual_seed(self.protocol.start_epoch(trainer.current_epoch,
                                                    trainer.num_training_batches))

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.protocol.begin_validation()

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.protocol.end_validation()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss, correct, n = pl_module.last_step
        self.protocol.step(1, lambda: {"loss": loss.item(), "acc": correct.item() / n})

    def on_train_epoch_end(self, trainer, pl_module):
        means = pl_module.epoch_means()   # both collective under DDP: every process gets here
        first_bad = pl_module.first_bad_step()
        self.protocol.end_epoch(  # raises TrainingDiverged before anything is written
            trainer.current_epoch, means, pl_module.train_images * trainer.world_size, self._lr,
            first_bad, lambda folder: write_training_state(trainer, folder))

    def teardown(self, trainer, pl_module, stage):
        if self.protocol is not None:
            self.protocol.close()


def fit(cfg, run_dir: Path, net: SpecModule, train_loader, val_loader, resume=None
        ) -> tuple[pl.Trainer, TrainReport]:
    """Train ``net`` with Lightning (resuming from the checkpoint ``resume``); returns the
    trainer and the protocol's report."""
    hw = cfg.hardware
    hooks = ProtocolHooks(cfg, run_dir)
    trainer = pl.Trainer(
        accelerator=hw.accelerator, devices=hw.devices, num_nodes=hw.num_nodes,
        strategy=hw.strategy, precision=hw.precision, max_epochs=cfg.trainer.max_epochs,
        limit_train_batches=lightning_limit(cfg.trainer.limit_train_batches),
        limit_val_batches=lightning_limit(cfg.trainer.limit_val_batches),
        deterministic=cfg.trainer.deterministic, enable_progress_bar=False,  # the protocol's
        callbacks=[hooks], enable_checkpointing=False,  # the protocol writes epoch folders
        # logs: the protocol writes metrics.csv and TensorBoard once per epoch, as every backend
        plugins=[SafeCheckpointIO()], logger=False, default_root_dir=run_dir,
        enable_model_summary=False, num_sanity_val_steps=0)
    if resume is not None:  # Lightning starts the first iterator (workers prefetch) before
        train_loader.sampler.set_epoch(resume.epoch)  # it sets the resumed epoch
    classifier = Classifier(net, Optimizer.from_config(cfg.optim), cfg.trainer.max_epochs,
                            cfg.backend.channels_last, cfg.backend.compile)
    # resuming restores weights, optimizer, schedulers and loop counters (weights_only)
    resume_from = {"ckpt_path": resume.file(CHECKPOINT)} if resume is not None else {}
    if resume is not None and "weights_only" in inspect.signature(trainer.fit).parameters:
        resume_from["weights_only"] = True  # SafeCheckpointIO enforces it on older ones
    trainer.fit(classifier, train_loader, val_loader, **resume_from)  # teardown closes hooks
    latest = CheckpointDir(run_dir).latest()
    extra, checkpoint = {"device": str(trainer.strategy.root_device)}, \
        latest.file(CHECKPOINT) if latest else None
    if hooks.protocol is None:  # ddp_spawn: the protocols ran in the processes it started
        return trainer, TrainReport.nothing_trained(checkpoint, extra)
    return trainer, hooks.protocol.report(extra, checkpoint=checkpoint)


def check_gpus(hw) -> None:
    if hw.accelerator != "gpu":
        return
    found = torch.cuda.device_count()
    if found == 0:
        raise ConfigError(f"hardware.accelerator=gpu but torch {torch.__version__} sees no GPU: "
                          "use hardware=cpu, or install a CUDA build of torch (README, GPU section)")
    if hw.devices > found:
        raise ConfigError(f"hardware.devices={hw.devices} but torch sees {found} GPU(s): "
                          f"use hardware.devices={found} or -1 (all)")


def lightning_limit(v):
    """Lightning reads 1.0 as a fraction and 1 as one batch: keep whole numbers as ints (the
    rule itself is ``cnnzoo.core.optim.num_batches``, which Lightning applies per process)."""
    return int(v) if v > 1 else float(v)
