"""Where the torch product's LeNet-5 epoch goes, measured in one process:
``python -m bench.loop_floor [--rounds 30] [--steps 128] [--batch 32]``.

A LeNet-5 product rate moves by about 20% from one process to the next on a 2-core machine,
more than the costs it is made of. Here every loop runs in the same process, one epoch of
``--steps`` batches each, in turn, for ``--rounds`` rounds; each loop's rate is divided by the
hand-written loop's rate of the same round, and the median of those ratios is reported:

1. hand-written: a plain loop (SGD, ``zero_grad(set_to_none=True)``), channels-last, on
   preloaded batches (what ``python -m bench`` calls the hand-written loop);
2. the same step through Lightning Fabric (``setup``, ``fabric.backward``);
3. the product's step on preloaded batches: its ``Classifier`` (the loss inside the wrapped
   module) and ``EpochSums`` (what the epoch's means come from);
4. the product's step on the product's own batches (``runners.torch.data.input_pipeline``:
   a shuffled, normalised batch from the data layer every step, through the DataLoader).

What (4) leaves out of a product epoch is per-epoch work: validation, metrics.csv,
TensorBoard and the checkpoint (``TrainingProtocol.end_epoch``), a few milliseconds for
LeNet-5. Threads: torch's default, as the product's."""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT  # noqa: F401  (puts the repository on sys.path)
from bench.training import LR, MOMENTUM, WEIGHT_DECAY, config_overrides


def loops(steps: int, batch: int) -> dict:
    """name -> a function that trains one epoch of ``steps`` batches."""
    import lightning_fabric
    import numpy as np
    import torch
    import torch.nn.functional as F

    from bench.common import compose
    from cnnzoo.app.experiment import build_model, prepare
    from runners.torch.data import input_pipeline
    from runners.torch.train import Classifier, EpochSums, train_step

    cfg = compose(*config_overrides("lenet5", "torch", batch, 32, steps, 1))
    exp = prepare(cfg)
    run_dir = Path(tempfile.mkdtemp(prefix="cnnzoo-loop-floor-"))

    def net():
        return build_model(cfg, run_dir, exp)[1].to(memory_format=torch.channels_last)

    def sgd(module):
        return torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM,
                               weight_decay=WEIGHT_DECAY)

    x, y = exp.train_split.take(np.arange(len(exp.train_split)))  # preprocessed once
    xs = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    ys = torch.from_numpy(y)
    preloaded = [(xs[i:i + batch], ys[i:i + batch]) for i in range(0, len(ys), batch)]
    fabric = lightning_fabric.Fabric(accelerator="cpu", devices=1, precision="32-true")

    hand_net = net()
    hand_opt = sgd(hand_net)

    def hand():
        for xb, yb in preloaded:
            hand_opt.zero_grad(set_to_none=True)
            F.cross_entropy(hand_net(xb), yb).backward()
            hand_opt.step()

    fabric_net = net()
    fabric_net, fabric_opt = fabric.setup(fabric_net, sgd(fabric_net))

    def fabric_loop():
        for xb, yb in preloaded:
            fabric_opt.zero_grad(set_to_none=True)
            fabric.backward(F.cross_entropy(fabric_net(xb), yb))
            fabric_opt.step()

    def product_step(batches):
        """The product's step (``runners.torch.train.train_step``) over ``batches()``."""
        inner = net()
        model, opt = fabric.setup(Classifier(inner, channels_last=True), sgd(inner))
        sums = EpochSums(fabric)

        def epoch():
            sums.start_epoch()
            for batch_ in batches():
                train_step(fabric, model, opt, batch_, sums)
            sums.means(), sums.first_bad_step()
        return epoch

    loader, epochs = input_pipeline(exp.train_split, True, batch, cfg.seed), iter(range(10**9))

    def product_batches():
        loader.sampler.set_epoch(next(epochs))
        return loader

    timed = {"hand-written (preloaded, channels-last)": hand,
             "minimal Fabric loop (preloaded)": fabric_loop,
             "product step + epoch sums (preloaded)": product_step(lambda: preloaded),
             "product step + epoch sums (product input_pipeline)": product_step(product_batches)}
    shutil.rmtree(run_dir, ignore_errors=True)  # every model is built: nothing reads it again
    return timed


def measure(rounds: int, steps: int, batch: int) -> list[tuple[str, float, float]]:
    """(loop, median images/s, median of its per-round ratio to the hand-written loop)."""
    fns = loops(steps, batch)
    for fn in fns.values():  # warm-up: allocation, oneDNN primitives
        fn()
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(steps * batch / (time.perf_counter() - t0))
    hand = rates[next(iter(fns))]
    return [(name, statistics.median(r), statistics.median(a / b for a, b in zip(r, hand)))
            for name, r in rates.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loop_floor", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=128, help="batches per epoch")
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    print(f"LeNet-5, torch, {a.steps} batches of {a.batch} per epoch, {a.rounds} rounds")
    print("| loop | images/s (median) | vs hand-written (median of per-round ratios) |")
    print("|---|---|---|")
    for name, rate, ratio in measure(a.rounds, a.steps, a.batch):
        print(f"| {name} | {rate:,.0f} | {ratio:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
