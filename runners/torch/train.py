"""Training with Lightning Fabric: the loss of a batch (``Classifier``), the epoch sums
(``EpochSums``) and the loop that runs ``cnnzoo.core.training.TrainingProtocol``.

Fabric keeps what Lightning gives this backend (accelerators, the presets' strategies with
their launchers, precision plugins, device placement) without the ``Trainer``'s per-step
hooks: on LeNet-5 a minimal ``Trainer.fit`` reached 0.79x of a hand-written loop on an H200
and 0.88x on a 2-core CPU, a Fabric loop 1.00x and 0.95x (docs/benchmarks.md, GPU).

The loop is the protocol's: ``start_epoch`` (its seed seeds torch), the steps (each with the
schedule's rate), validation between ``begin_validation`` and ``end_validation``, ``end_epoch``
with the training state written into the epoch folder (``state.training_state``).
Under DDP every process runs it (``is_main`` = global rank 0): the means, the first bad step
and the save are collective."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning_fabric import Fabric

from architectures import spec as S
from cnnzoo.core.errors import CheckpointError, ConfigError
from cnnzoo.core.finetune import FineTuning
from cnnzoo.core.optim import Optimizer, num_batches
from cnnzoo.core.training import FirstBadStep, TrainingProtocol, TrainReport

from .model import SpecModule
from .state import CHECKPOINT, load_state, net_weights, one_line, training_state

# Lightning's tips (num_workers, logger suggestions) are noise for this product's users
for _name in ("lightning_fabric.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)

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


class Classifier(torch.nn.Module):
    """A SpecModule's cross-entropy loss, with the weighted auxiliary losses in training
    (GoogLeNet, Inception-v3). Fabric wraps this module (DDP included), so the whole loss is
    computed inside the wrapper's forward.

    ``compile_net``: the network's forward goes through ``torch.compile``, made at the first
    call in the process that trains (a compiled function does not pickle, which ddp_spawn
    needs); the module is held once, as ``net``, so the state's keys and the exported module
    are those of the eager network. ``label_smoothing`` applies to the training loss only
    (validation reports the plain cross-entropy)."""

    def __init__(self, net: SpecModule, channels_last: bool, compile_net: bool = False,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.net, self.channels_last, self.compile_net = net, channels_last, compile_net
        self.label_smoothing = label_smoothing
        self._compiled = None

    def forward(self, x, y):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compile_net and self._compiled is None:
            self._compiled = torch.compile(self.net.forward)
        out = self._compiled(x) if self.compile_net else self.net(x)
        logits, *aux = out if self.training and self.net.aux_outputs else (out,)
        smoothing = self.label_smoothing if self.training else 0.0
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        if aux:
            loss = loss + self.net.aux_weight * sum(
                F.cross_entropy(a, y, label_smoothing=smoothing) for a in aux)
        return loss, logits


class EpochSums:
    """What an epoch's means come from, kept on the device (no host sync per step) and read
    once at the epoch's end, summed (or the minimum taken) over all processes. A training
    step keeps its detached loss, its predicted classes and its labels (one op: the argmax);
    the sums, the correct count and the first non-finite loss are computed from them at the
    end (on LeNet-5, running sums and a running first non-finite step, a dozen small ops per
    step, cost 4% of a step). Validation keeps running sums."""

    def __init__(self, fabric: Fabric):
        self.fabric, device = fabric, fabric.device
        # float64 (MPS has none: float32 there): a sum over a long epoch stays exact enough,
        # and a finite loss times the batch size never overflows it
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.start_epoch()

    def start_epoch(self):
        self.losses, self.predicted, self.labels = [], [], []  # per training step
        device = self.fabric.device
        self.val_loss = torch.zeros((), dtype=self.dtype, device=device)
        self.val_correct = torch.zeros((), dtype=self.dtype, device=device)
        self.val_seen = 0  # an epoch without validation reports none

    @property
    def train_seen(self) -> int:
        return sum(len(y) for y in self.labels)  # batch sizes: known on the host

    def add_train(self, loss, logits, y):
        self.losses.append(loss.detach())
        self.predicted.append(logits.argmax(1))
        self.labels.append(y)

    def add_val(self, loss, logits, y):
        n = len(y)
        self.val_loss.add_(loss.detach(), alpha=n)  # the batch's mean loss times its images
        self.val_correct.add_((logits.argmax(1) == y).sum())
        self.val_seen += n

    def running(self) -> dict:
        return {"loss": self.losses[-1].item(),
                "acc": (self.predicted[-1] == self.labels[-1]).float().mean().item()}

    def means(self) -> dict[str, float]:
        """This epoch's ``train_loss``, ``train_acc`` and (after a validation) ``val_loss``,
        ``val_acc``: means per image over every process's images (one collective)."""
        zero = torch.zeros((), dtype=self.dtype, device=self.val_loss.device)
        train_loss = train_correct = zero
        if self.losses:
            images = torch.tensor([len(y) for y in self.labels], dtype=self.dtype,
                                  device=zero.device)
            train_loss = (torch.stack(self.losses).to(self.dtype) * images).sum()
            train_correct = (torch.cat(self.predicted) == torch.cat(self.labels)).sum()
        sums = torch.stack([train_loss, train_correct.to(self.dtype), self.val_loss,
                            self.val_correct])
        seen = torch.tensor([self.train_seen, self.val_seen], dtype=sums.dtype,
                            device=sums.device)
        totals = self.fabric.all_reduce(torch.cat([sums, seen]), reduce_op="sum").tolist()
        means = {}
        for stage, (loss, correct, n) in {"train": (totals[0], totals[1], totals[4]),
                                          "val": (totals[2], totals[3], totals[5])}.items():
            if n > 0:
                means[f"{stage}_loss"], means[f"{stage}_acc"] = loss / n, correct / n
        return means

    def first_bad_step(self) -> FirstBadStep | None:
        """This epoch's first non-finite training loss, the earliest over all processes (a
        collective), or None."""
        own = torch.tensor(_NO_BATCH, device=self.val_loss.device)  # 0-based step
        if self.losses:
            losses = torch.stack(self.losses)
            bad = ~torch.isfinite(losses)
            own = torch.where(bad.any(), bad.int().argmax(), own)
        batch = int(self.fabric.all_reduce(own.clone(), reduce_op="min"))
        if batch == _NO_BATCH:
            return None
        # under DDP another process may have found it: its loss value is not here
        return FirstBadStep(batch + 1, float(self.losses[batch]) if int(own) == batch
                            else float("nan"))


def fit(cfg, run_dir: Path, net: SpecModule, loaders, resume=None, hooks=()
        ) -> tuple[Fabric, TrainReport]:
    """Train ``net`` (resuming from the checkpoint ``resume``) on the batches of
    ``loaders(rank, world_size)`` (the training and validation loaders of one process), with
    the backend's epoch-end ``hooks``; returns the Fabric and this process's protocol report.
    Under ddp_spawn the processes it started trained: rank 0's report comes back, and ``net``
    loads the last checkpoint."""
    hw = cfg.hardware
    fabric = Fabric(accelerator=hw.accelerator, devices=hw.devices, num_nodes=hw.num_nodes,
                    strategy=hw.strategy, precision=hw.precision)
    report, trained_in = fabric.launch(_train, cfg, Path(run_dir), net, loaders, resume,
                                       tuple(hooks))
    if trained_in != os.getpid():  # ddp_spawn: the weights are in the last checkpoint
        net.load_state_dict(net_weights(load_state(report.checkpoint)))
    return fabric, report


def _train(fabric: Fabric, cfg, run_dir: Path, net: SpecModule, loaders, resume, hooks):
    """One process's training (every process of a DDP run calls it): the protocol's report
    and the process id (rank 0's come back from ddp_spawn's processes)."""
    model, opt = training_modules(cfg, net)
    frozen = frozen_norms(FineTuning.from_config(cfg, net.spec), net)
    max_epochs = cfg.trainer.max_epochs
    start = resume.epoch if resume is not None else 0
    if resume is not None:
        path = resume.file(CHECKPOINT)
        try:
            restore(load_state(path), net, opt)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: cannot resume from it: {one_line(err)}") from None
    model, opt = fabric.setup(model, opt)
    train_loader, val_loader = loaders(fabric.global_rank, fabric.world_size)
    steps = num_batches(cfg.trainer.limit_train_batches, len(train_loader))
    val_steps = num_batches(cfg.trainer.limit_val_batches, len(val_loader))
    # each process takes data.batch_size images per step
    protocol = TrainingProtocol(cfg, run_dir, "torch", steps,
                                cfg.data.batch_size * fabric.world_size,
                                is_main=fabric.is_global_zero, checkpoint_file=CHECKPOINT,
                                hooks=hooks)
    rate, clip = protocol.schedule.rate, protocol.optim.clip_grad_norm
    sums = EpochSums(fabric)
    try:
        for epoch in range(start, max_epochs):
            # the same numbers whether this epoch follows the previous one or a resume
            torch.manual_seed(protocol.start_epoch(epoch))
            sums.start_epoch()
            model.train()
            for norm in frozen:  # their running statistics stay as loaded
                norm.eval()
            train_loader.sampler.set_epoch(epoch)
            for i, batch in zip(range(steps), train_loader):
                for group in opt.param_groups:
                    group["lr"] = rate(epoch * steps + i) * group.get("lr_scale", 1.0)
                train_step(fabric, model, opt, batch, sums, clip)
                protocol.step(1, sums.running)
            if val_steps > 0:
                protocol.begin_validation()
                model.eval()
                with torch.no_grad():
                    for _, batch in zip(range(val_steps), val_loader):
                        x, y = fabric.to_device(batch)
                        loss, logits = model(x, y)
                        sums.add_val(loss, logits, y)
                protocol.end_validation()
            means, first_bad = sums.means(), sums.first_bad_step()  # collectives
            protocol.end_epoch(  # raises TrainingDiverged before anything is written
                epoch, means, sums.train_seen * fabric.world_size, first_bad,
                lambda folder, done=epoch + 1: fabric.save(
                    Path(folder) / CHECKPOINT, training_state(net, opt, done)))
            if protocol.stop_reason:
                break
    finally:
        protocol.close()
    report = protocol.report({"device": str(fabric.device)}, checkpoint=resume.file(CHECKPOINT)
                             if resume is not None else None)
    return report, os.getpid()


def training_modules(cfg, net: SpecModule) -> tuple[Classifier, torch.optim.Optimizer]:
    """What a training step runs (before ``fabric.setup``): ``net`` in its loss module and the
    configured optimizer over its parameters; the kernels made deterministic if asked.
    task=lr_find steps the same ones (``lr_find``)."""
    if cfg.trainer.deterministic:
        use_deterministic_kernels()
    optim = Optimizer.from_config(cfg.optim)
    model = Classifier(net, cfg.backend.channels_last, cfg.backend.get("compile", False),
                       optim.label_smoothing)
    return model, torch_optimizer(optim, parameter_groups(FineTuning.from_config(cfg, net.spec),
                                                          net))


def parameter_groups(ft: FineTuning, net: SpecModule):
    """The optimizer's parameters: all of them, or with ``finetune.*`` one group per multiple
    of the rate (``lr_scale``, applied where the rate is set), a frozen node's parameters left
    out and no longer requiring gradients."""
    if not ft.active:
        return net.parameters()
    groups: dict[float, list] = {}
    for node in net.spec.nodes:
        params = list(net.layers[net.key(node.name)].parameters())
        if params and ft.lr_scale(node.name) == 0.0:
            for p in params:
                p.requires_grad_(False)
        elif params:
            groups.setdefault(ft.lr_scale(node.name), []).extend(params)
    return [{"params": p, "lr_scale": scale} for scale, p in groups.items()]


def frozen_norms(ft: FineTuning, net: SpecModule) -> list[torch.nn.Module]:
    """The batch norms of frozen nodes: kept in inference mode while the rest trains."""
    return [net.layers[net.key(n.name)] for n in net.spec.nodes
            if n.name in ft.frozen and isinstance(n.layer, S.BatchNorm)]


def train_step(fabric: Fabric, model, opt, batch, sums: EpochSums,
               clip_grad_norm: float | None = None) -> torch.Tensor:
    """One optimizer step of the set-up ``Classifier`` ``model`` on ``batch``; its loss and
    predictions go to ``sums``. Returns the loss (on the device, not read)."""
    x, y = fabric.to_device(batch)
    loss, logits = model(x, y)
    opt.zero_grad(set_to_none=True)
    fabric.backward(loss)
    if clip_grad_norm is not None:  # before the optimizer adds its weight decay
        fabric.clip_gradients(model, opt, max_norm=clip_grad_norm)
    opt.step()
    sums.add_train(loss, logits, y)
    return loss


def restore(state: dict, net, opt) -> None:
    """A checkpoint's weights and optimizer state into a fresh run (written by
    ``state.training_state``, or by the Lightning ``Trainer`` that earlier versions used:
    the same keys). The config's optimizer hyperparameters win over the checkpoint's: they are
    the same unless the run's config was changed, which only the Python API allows (task=train
    refuses to resume a changed config); the rate is set before every step."""
    net.load_state_dict(net_weights(state))
    config = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(state["optimizer_states"][0])  # the moments (and the saved rates)
    for group, values in zip(opt.param_groups, config):
        group.update(values)


def use_deterministic_kernels() -> None:
    """``trainer.deterministic``: torch's deterministic algorithms, no cuDNN autotuning, and
    the cuBLAS workspace setting that deterministic CUDA matrix products need."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


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
