"""PyTorch backend: the spec as an ``nn.Module``, trained with PyTorch Lightning.

Files: ``metrics.csv`` and ``tensorboard/`` (the metrics.csv scalars), written once per epoch by
the first process, as in every backend; ``checkpoints/epoch-NNNN/model.ckpt``
(``cnnzoo.checkpoints``), a Lightning checkpoint of the full training state (weights, optimizer
and scheduler state, loop counters) written after every epoch with a finite loss. Resuming hands
it to ``Trainer.fit(ckpt_path=...)``; generators need no saved state, each epoch reseeds them
from (seed, epoch). Every load is ``torch.load(weights_only=True)``: tensors and plain
containers only, never code.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import pickle
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins import TorchCheckpointIO

from cnnzoo.checkpoints import CheckpointDir, CheckpointError, seed_python_numpy
from cnnzoo.data import epoch_order
from cnnzoo.progress import EpochProgress
from cnnzoo.rundir import MetricsLog
from cnnzoo.tensorboard import ScalarWriter
from cnnzoo.validate import ConfigError

from .base import Backend, TrainingDiverged, TrainReport
from .torch_model import SpecModule
from .weight_layouts import (check_weights, expected_shapes, key, native_name, parametrised,
                             to_canonical, to_native)

# Lightning's tips (num_workers, logger suggestions) are noise for this product's users
for _name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*number of training batches.*smaller than the logging.*")
warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")

CHECKPOINT = "model.ckpt"  # in each checkpoints/epoch-NNNN folder
_NO_BATCH = 2**62          # "no non-finite loss yet" (the largest value: processes reduce by min)


class Classifier(pl.LightningModule):
    """Cross-entropy training of a SpecModule with the config's optimizer and schedule.

    Each epoch starts by seeding every generator from (seed, epoch). The steps only add to
    sums on the device (no host sync, no ``self.log``): per stage the loss times the batch's
    images and the correct predictions, plus, in training, the first non-finite loss of the
    epoch. ``epoch_means`` and ``first_bad_batch`` read them once at the epoch end, summed (or
    the minimum taken) over all processes."""

    STAGES = ("train", "val")

    def __init__(self, net: SpecModule, optim_cfg, max_epochs: int, channels_last: bool,
                 seed: int = 0):
        super().__init__()
        self.net, self.optim_cfg, self.max_epochs = net, optim_cfg, max_epochs
        self.channels_last, self.seed = channels_last, seed
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
        # the same numbers whether this epoch follows the previous one or a resume
        torch.manual_seed(seed_python_numpy(self.seed, self.current_epoch))
        self._reset_divergence()
        for stage in self.STAGES:  # an epoch without validation reports none
            self._reset_sums(stage)

    def on_validation_epoch_start(self):
        self._reset_sums("val")

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

    def first_bad_batch(self) -> tuple[int, float] | None:
        """(0-based batch, loss) of this epoch's first non-finite training loss, the earliest
        over all processes, or None."""
        batch = self.trainer.strategy.reduce(self._bad_batch.clone(), reduce_op="min")
        batch = int(batch)
        if batch == _NO_BATCH:
            return None
        # under DDP another process may have found it: its loss value is not here
        own = int(self._bad_batch) == batch
        return batch, float(self._bad_loss) if own else float("nan")

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

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
        c = self.optim_cfg
        params = self.net.parameters()
        if c.name == "sgd":
            opt = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                  weight_decay=c.weight_decay)
        elif c.name == "adam":
            opt = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        elif c.name == "rmsprop":  # defaults: the Inception papers' decay 0.9 and eps 1.0
            opt = torch.optim.RMSprop(params, lr=c.lr, alpha=c.get("alpha", 0.9),
                                      eps=c.get("eps", 1.0), momentum=c.momentum,
                                      weight_decay=c.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        if c.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_epochs)
            return {"optimizer": opt, "lr_scheduler": sched}
        return opt


class _EpochLog(Callback):
    """Stops a diverged run, writes metrics.csv and TensorBoard's scalars (the columns every
    backend shares, once per epoch, on the first process), drives the shared progress display
    and times the training epochs, excluding validation, so images/s is comparable across
    backends."""

    def __init__(self, log: MetricsLog | None, show_progress: bool,
                 board_dir: Path | None = None):
        self.metrics_log, self.rows, self.train_time, self.images = log, [], 0.0, 0
        self.show_progress, self.progress = show_progress, None
        self.board_dir, self.board = board_dir, None

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0, self._val_time = time.perf_counter(), 0.0
        self._steps_before = trainer.global_step
        # the rate used in this epoch (Lightning steps epoch schedulers before on_train_epoch_end)
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]
        if self.progress is None:
            self.progress = EpochProgress(trainer.max_epochs, trainer.num_training_batches,
                                          self.show_progress and trainer.is_global_zero)
        self.progress.start_epoch(trainer.current_epoch + 1)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._v0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._val_time += time.perf_counter() - self._v0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += len(batch[1]) * trainer.world_size
        loss, correct, n = pl_module.last_step
        self.progress.step(1, lambda: {"loss": loss.item(), "acc": correct.item() / n})

    def on_train_epoch_end(self, trainer, pl_module):
        elapsed = time.perf_counter() - self._t0
        self.train_time += elapsed - self._val_time
        row = {"epoch": trainer.current_epoch + 1, "epoch_time_s": elapsed,
               "lr": self._lr}
        row.update(pl_module.epoch_means())  # collective under DDP: every process gets here
        self._check_divergence(trainer, pl_module, row)
        self.rows.append(row)
        self.progress.end_epoch(row)
        if trainer.is_global_zero:
            if self.metrics_log is not None:
                self.metrics_log.append(row)
            if self.board_dir is not None:
                if self.board is None:  # a resumed run adds an event file beside the earlier
                    self.board = ScalarWriter(self.board_dir)
                self.board.write(row["epoch"], {k: v for k, v in row.items() if k != "epoch"})

    def _check_divergence(self, trainer, pl_module, row):
        """Runs before _EpochCheckpoint: a diverged epoch leaves no row and no checkpoint."""
        bad = pl_module.first_bad_batch()
        if bad is not None:
            batch, loss = bad
            raise TrainingDiverged(
                f"training diverged: train_loss is {loss} at step {self._steps_before + batch + 1}"
                f" (epoch {row['epoch']}, batch {batch + 1} of {trainer.num_training_batches}); "
                "lower optim.lr")
        if not math.isfinite(row.get("train_loss", 0.0)):  # finite steps whose mean overflows
            raise TrainingDiverged(f"training diverged: train_loss is {row['train_loss']} in epoch "
                                   f"{row['epoch']} (the mean of finite steps); lower optim.lr")

    def teardown(self, trainer, pl_module, stage):
        if self.progress is not None:
            self.progress.close()
        if self.board is not None:
            self.board.close()
            self.board = None


class _EpochCheckpoint(Callback):
    """After each training epoch (Lightning validates first; _EpochLog, listed before this,
    has raised if it diverged) the full training state goes to ``checkpoints/epoch-NNNN/``."""

    def __init__(self, run_dir: Path):
        self.dir = CheckpointDir(run_dir)

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch + 1

        def write(folder: Path) -> None:
            trainer.save_checkpoint(folder / CHECKPOINT, weights_only=False)

        if trainer.is_global_zero:
            self.dir.save(epoch, write, {"backend": "torch"})
        else:  # save_checkpoint is collective under DDP (a barrier); only rank 0 writes files
            write(self.dir.root / f".epoch-{epoch:04d}.tmp")


class _SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files, always loaded with ``weights_only=True``."""

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_state(path)


class _EpochBatches(torch.utils.data.Sampler):
    """The data layer's per-epoch order (``epoch_order``) cut into batches: each item is one
    whole batch, ``(indices, epoch)``, which ``_SplitBatches`` fetches with one vectorised
    ``Split.take`` (no per-image ``__getitem__``, no collation). Lightning calls set_epoch;
    the items carry the epoch, since an augmented split's images depend on it and DataLoader
    worker processes never see set_epoch.

    Under DDP Lightning wraps this sampler in its ``DistributedSamplerWrapper``, which deals
    out whole batches: for training in an order of its own (a permutation seeded from the
    run's seed and the epoch, so resumes and reruns repeat it), for validation in turn. Every
    process then trains on ``data.batch_size`` images per step, so a step's global batch is
    ``data.batch_size`` x processes, as with a per-image distributed sampler, and each batch
    holds the same images as on one device. When the processes do not divide the number of
    batches, the wrapper repeats a few whole batches (fewer than the processes) so that every
    process takes the same number of steps; those repeats count in the epoch's means."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool):
        self.n, self.batch_size, self.seed, self.shuffle, self.epoch = n, batch_size, seed, \
            shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        order, epoch, bs = epoch_order(self.n, self.seed, self.epoch, self.shuffle), self.epoch, \
            self.batch_size
        return iter([(order[i:i + bs], epoch) for i in range(0, self.n, bs)])


class _SplitBatches(torch.utils.data.Dataset):
    """A Split read batch by batch: the key is ``(indices, epoch)`` (``_EpochBatches``), the
    item the batch's images (N, C, H, W) float32 and labels int64, as tensors."""

    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        indices, epoch = key
        x, y = self.split.take(indices, epoch)
        return torch.from_numpy(x), torch.from_numpy(y)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        if cfg.hardware.threads:
            torch.set_num_threads(cfg.hardware.threads)
        self._trainer = None

    @property
    def is_main_process(self) -> bool:
        if self._trainer is not None:
            return self._trainer.is_global_zero
        return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0

    def build(self, spec, input_size):
        pl.seed_everything(self.cfg.seed, workers=True, verbose=False)
        net = SpecModule(spec, input_size)
        if self.cfg.backend.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net

    def count_params(self, model) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def input_pipeline(self, split, shuffle: bool):
        """A DataLoader of whole batches (``_EpochBatches``: one item per batch, so
        ``batch_size=None``), the same batches in the same order as ``split.take`` of
        ``epoch_order``; ``loader.sampler.set_epoch`` picks the epoch."""
        workers = self.cfg.backend.num_workers
        if workers > 0:  # workers fork from here: they share the kept images, never copy them
            split.fill_memory()
        # a generator of its own: starting an iterator draws a seed, which from the global
        # generator (dropout's) would shift its numbers differently in a resumed run
        return torch.utils.data.DataLoader(
            _SplitBatches(split), batch_size=None, num_workers=workers,
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(self.cfg.seed),
            sampler=_EpochBatches(len(split), self.cfg.data.batch_size, self.cfg.seed, shuffle))

    def train(self, model, train, val, resume=None) -> TrainReport:
        c, hw = self.cfg, self.cfg.hardware
        _check_gpus(hw)
        epoch_log = _EpochLog(MetricsLog(self.run_dir / "metrics.csv") if self.is_main_process
                              else None, c.trainer.progress_bar, self.run_dir / "tensorboard")
        self._trainer = trainer = pl.Trainer(
            accelerator=hw.accelerator, devices=hw.devices, num_nodes=hw.num_nodes,
            strategy=hw.strategy,
            precision=hw.precision, max_epochs=c.trainer.max_epochs,
            limit_train_batches=_limit(c.trainer.limit_train_batches),
            limit_val_batches=_limit(c.trainer.limit_val_batches),
            deterministic=c.trainer.deterministic, enable_progress_bar=False,  # ours: _EpochLog
            # _EpochLog first: a diverged epoch raises before _EpochCheckpoint writes it
            callbacks=[epoch_log, _EpochCheckpoint(self.run_dir)], enable_checkpointing=False,
            # logs: _EpochLog writes metrics.csv and TensorBoard once per epoch, as every backend
            plugins=[_SafeCheckpointIO()], logger=False, default_root_dir=self.run_dir,
            enable_model_summary=False, num_sanity_val_steps=0)
        train_loader, val_loader = self.input_pipeline(train, True), self.input_pipeline(val, False)
        if resume is not None:  # Lightning starts the first iterator (workers prefetch) before
            train_loader.sampler.set_epoch(resume.epoch)  # it sets the resumed epoch
        classifier = Classifier(model, c.optim, c.trainer.max_epochs, c.backend.channels_last,
                                c.seed)
        # resuming restores weights, optimizer, schedulers and loop counters (weights_only)
        resume_from = {"ckpt_path": resume.file(CHECKPOINT)} if resume is not None else {}
        if resume is not None and "weights_only" in inspect.signature(trainer.fit).parameters:
            resume_from["weights_only"] = True  # _SafeCheckpointIO enforces it on older ones
        trainer.fit(classifier, train_loader, val_loader, **resume_from)
        seconds = max(epoch_log.train_time, 1e-9)
        latest = CheckpointDir(self.run_dir).latest()
        return TrainReport(history=epoch_log.rows, train_time_s=seconds,
                           images_per_s=epoch_log.images / seconds,
                           checkpoint=latest.file(CHECKPOINT) if latest else None,
                           extra={"device": str(trainer.strategy.root_device)})

    def predict(self, model, images: np.ndarray) -> np.ndarray:
        model = model.cpu().float().eval()
        with torch.inference_mode():
            return model(torch.from_numpy(images)).numpy()

    def save_checkpoint(self, model, path: Path) -> None:
        torch.save(model.state_dict(), path)

    def load_checkpoint(self, model, path: Path) -> None:
        state = load_state(path)
        if "state_dict" in state:  # a Lightning checkpoint: weights live under "net."
            state = {k[len("net."):]: v for k, v in state["state_dict"].items()
                     if isinstance(k, str) and k.startswith("net.")}
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path}: does not fit this model: {_one_line(err)}") from None

    def _parameters(self, model):
        """(canonical key, kind, param, tensor) of every parameter and batch-norm statistic."""
        for node, kind, params in parametrised(model.spec):
            module = model.layers[model.key(node.name)]
            for p in params:
                yield key(node.name, p), kind, p, getattr(module, native_name("torch", kind, p))

    def get_weights(self, model) -> dict[str, np.ndarray]:
        return {k: to_canonical("torch", kind, p, t.detach().cpu().numpy())
                for k, kind, p, t in self._parameters(model)}

    def set_weights(self, model, weights) -> None:
        check_weights(weights, expected_shapes(model.spec, model.input_size))
        with torch.no_grad():  # copy_ keeps each tensor's device and memory format
            for k, kind, p, t in self._parameters(model):
                t.copy_(torch.from_numpy(to_native("torch", kind, p, weights[k])))

    def export_onnx(self, model, path: Path, example: np.ndarray, opset: int) -> None:
        model = model.cpu().float().eval()
        batch = torch.export.Dim("batch")  # traced at batch 2, valid for any batch
        # the exporter's progress lines and "torchvision is not installed" notes are noise here
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        for name in ("onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.from_numpy(example),), str(path), dynamo=True,
                              external_data=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], dynamic_shapes=({0: batch},),
                              verbose=False)


def load_state(path) -> dict:
    """A checkpoint file as a dict, with ``torch.load(weights_only=True)``: tensors and plain
    containers only, so nothing in the file is ever run. Raises ``CheckpointError`` (one line)
    for a file that would need more, or that cannot be read."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # what weights_only refuses
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        why = (f"loading it would call {found.group(1)}" if found
               else "it holds objects other than tensors and plain containers")
        raise CheckpointError(f"{path}: refused: {why}; only checkpoints written by cnnzoo are "
                              "loaded") from None
    except Exception as err:  # noqa: BLE001 - damaged, truncated, missing, not a checkpoint
        detail = (_one_line(err) if isinstance(err, (OSError, RuntimeError)) else
                  f"not a PyTorch checkpoint ({type(err).__name__}: {_one_line(err)})")
        raise CheckpointError(f"{path}: cannot be read: {detail}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a checkpoint")
    return state


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _check_gpus(hw) -> None:
    if hw.accelerator != "gpu":
        return
    found = torch.cuda.device_count()
    if found == 0:
        raise ConfigError(f"hardware.accelerator=gpu but torch {torch.__version__} sees no GPU: "
                          "use hardware=cpu, or install a CUDA build of torch (README, GPU section)")
    if hw.devices > found:
        raise ConfigError(f"hardware.devices={hw.devices} but torch sees {found} GPU(s): "
                          f"use hardware.devices={found} or -1 (all)")


def _limit(v):
    """Lightning reads 1.0 as a fraction and 1 as one batch: keep whole numbers as ints."""
    return int(v) if v > 1 else float(v)
