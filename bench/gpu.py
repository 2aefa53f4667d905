"""The GPU check of the torch backend, one prepared command for a bare GPU machine:

    python -m bench.gpu                      # on the GPU (a few minutes on one GPU)
    python -m bench.gpu --device cpu         # the same checks with tiny sizes (the test suite)

It measures and checks, in one run, with the device's name in every result:

- ``peak``: the card's bf16 matrix-multiply rate (square products, the median of timed runs),
  which the training rows are a fraction of;
- ``default job``: ``python run.py`` with ``hardware=gpu`` (bf16-mixed) and ``hardware=auto``:
  val_acc, images/s, and the ONNX file of the GPU-trained mixed-precision model verified on
  the CPU in onnxruntime;
- ``lenet5``: the per-step cost of the training loop, where the GPU's own work is small:
  LeNet-5 in batches of 32 through the product (with and without DataLoader workers), a
  hand-written loop, and the least a Lightning ``Trainer.fit`` and a Lightning Fabric loop
  cost on the same preloaded batches;
- ``resnet50``: ResNet-50 at 224x224, channels-last, in bf16-mixed and 16-mixed: the product
  (``backend.train``, its own input pipeline; in bf16 also without DataLoader workers and with
  ``backend.compile``) next to a hand-written loop in this process on preloaded batches (the
  same model, optimizer and autocast), each as images/s and as a fraction of the bf16 peak
  (3 x the forward FLOPs per image);
- ``resume``: ``trainer.deterministic=true``; a run killed (SIGKILL) once its first epoch's
  checkpoint is written and then re-run ends with the weights of an uninterrupted run.

Results: ``gpu.csv`` and ``gpu.md`` in ``--out`` (default ``bench/results/gpu-<time>``).
The exit code is 1 when a check fails (a verification, the resume hash).
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, compose, synthetic_data

# (device) -> sizes: the GPU run measures, the CPU run only exercises every code path
SIZES = {
    "cuda": {"peak_n": 8192, "peak_reps": 10, "resnet_size": 224, "batch": 128, "steps": 48,
             "epochs": 3, "hand_steps": 30, "default_epochs": 10, "resume_epochs": 3,
             "lenet_steps": 256},
    "cpu": {"peak_n": 256, "peak_reps": 3, "resnet_size": 32, "batch": 4, "steps": 2,
            "epochs": 2, "hand_steps": 2, "default_epochs": 1, "resume_epochs": 2,
            "lenet_steps": 4},
}
PRECISIONS = ("bf16-mixed", "16-mixed")


def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def bf16_peak(device: str, n: int, reps: int) -> float:
    """TFLOP/s of an n x n x n bf16 matrix product (median of ``reps`` after 3 warm-ups)."""
    import torch
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(3 + reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def run_cli(run_dir: Path, *overrides: str, kill_after: Path | None = None) -> dict:
    """``python run.py`` in a subprocess; its results.json (or the exit code). With
    ``kill_after``, SIGKILL it as soon as that path exists."""
    cmd = [sys.executable, "run.py", *overrides, f"hydra.run.dir={run_dir}",
           "trainer.progress_bar=false"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    if kill_after is not None:
        while proc.poll() is None and not kill_after.exists():
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    path = run_dir / "results.json"
    if proc.returncode != 0 or not path.exists():
        return {"returncode": proc.returncode, "wall_s": wall, "output": out[-2000:]}
    return {**json.loads(path.read_text()), "returncode": 0, "wall_s": wall}


# --------------------------------------------------------------------------- the checks
def default_jobs(device: str, sizes: dict, work: Path) -> list[dict]:
    presets = ("gpu", "auto") if device == "cuda" else ("cpu",)
    rows = []
    for preset in presets:
        r = run_cli(work / f"default-{preset}", f"hardware={preset}",
                    f"trainer.max_epochs={sizes['default_epochs']}")
        ok = r["returncode"] == 0 and r["export"]["passed"] is True
        rows.append({"check": "default job", "what": f"lenet5, digits, hardware={preset}",
                     "precision": r.get("hardware", {}).get("precision", ""),
                     "device": r.get("hardware", {}).get("device", ""),
                     "value": round(r["timings"]["images_per_s"]) if ok else None,
                     "unit": "images/s", "passed": ok,
                     "note": (f"val_acc {r['metrics']['val_acc']:.4f}, wall {r['wall_s']:.1f} s, "
                              f"ONNX on the CPU: max abs diff {r['export']['max_abs_diff']:.1e}")
                     if ok else r.get("output", "")[-300:]})
    return rows


def resnet50(device: str, sizes: dict, work: Path, peak_tflops: float) -> list[dict]:
    import torch

    import architectures
    from runners.torch.model import SpecModule

    size, batch, steps = sizes["resnet_size"], sizes["batch"], sizes["steps"]
    spec = architectures.build_spec("resnet50", 10, 3)
    train_flops = 3 * spec.analyze(size).flops  # forward + backward (about 2x forward)
    rows = []
    for precision in PRECISIONS:
        if device == "cpu" and precision == "16-mixed":
            continue  # float16 autocast is a GPU feature
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        hand = _hand_loop(SpecModule(spec, size), device, dtype, batch, size, 3,
                          sizes["hand_steps"])
        # the product's defaults, and in bf16 what each of its switches changes: DataLoader
        # workers (auto: several on a GPU) and torch.compile (on the CPU it needs minutes)
        variants = [()]
        if precision == "bf16-mixed":
            variants += [("backend.num_workers=0",)] + \
                [("backend.compile=true",)] * (device == "cuda")
        for variant in variants:
            overrides = ["arch=resnet50", f"hardware.precision={precision}",
                         *synthetic_data(steps * batch, batch, size), "data.num_classes=10",
                         f"trainer.max_epochs={sizes['epochs']}", *variant]
            rate = _product(device, overrides, work / f"resnet50-{precision}-{len(rows)}")
            rows.append(_row("resnet50", "product (backend.train)" + _named(variant),
                             precision, device, rate, train_flops, peak_tflops,
                             f"{steps} steps of {batch}, {size}x{size}, epochs after the first; "
                             f"product / hand-written {rate / hand:.2f}x"))
        rows.append(_row("resnet50", "hand-written loop", precision, device, hand, train_flops,
                         peak_tflops, f"preloaded batches of {batch}, channels-last"))
    return rows


def lenet5(device: str, sizes: dict, work: Path, peak_tflops: float) -> list[dict]:
    """The cost of a training step beyond the GPU's work: LeNet-5 on 32x32 gray images in
    batches of 32 (the default job's shapes), fp32, through the product (with and without
    DataLoader workers), a hand-written loop, and the least that Lightning's ``Trainer.fit``
    and Lightning Fabric cost on the same preloaded batches."""
    import architectures
    from runners.torch.model import SpecModule

    batch, steps = 32, sizes["lenet_steps"]
    spec = architectures.build_spec("lenet5", 10, 1)
    flops = 3 * spec.analyze(32).flops
    hand = _hand_loop(SpecModule(spec, 32), device, None, batch, 32, 1, steps)
    rows = []
    for variant in ((), ("backend.num_workers=4",)):
        overrides = ["arch=lenet5", "hardware.precision=32-true", "data.channels=1",
                     *synthetic_data(steps * batch, batch, 32), "trainer.max_epochs=3", *variant]
        rate = _product(device, overrides, work / f"lenet5-{len(rows)}")
        rows.append(_row("lenet5", "product (backend.train)" + _named(variant), "32-true",
                         device, rate, flops, peak_tflops, f"{steps} steps of {batch}, epochs "
                         f"after the first; product / hand-written {rate / hand:.2f}x"))
    rows.append(_row("lenet5", "hand-written loop", "32-true", device, hand, flops, peak_tflops,
                     f"{steps} steps on one preloaded batch"))
    for what, loop in (("minimal Lightning Trainer.fit", _lightning_loop),
                       ("minimal Lightning Fabric loop", _fabric_loop)):
        rate = loop(SpecModule(spec, 32), device, batch, steps)
        rows.append(_row("lenet5", what, "32-true", device, rate, flops, peak_tflops,
                         f"the loss only, preloaded batches; {rate / hand:.2f}x the "
                         "hand-written loop"))
    return rows


def _named(variant) -> str:
    return f", {' '.join(variant)}" if variant else ""


def _row(check: str, what: str, precision: str, device: str, rate: float, train_flops: float,
         peak_tflops: float, note: str) -> dict:
    fraction = rate * train_flops / (peak_tflops * 1e12)
    return {"check": check, "what": what, "precision": precision, "device": device,
            "value": round(rate, 1), "unit": "images/s", "passed": True,
            "note": f"{note}; {fraction:.1%} of the bf16 peak"}


def _product(device: str, overrides: list[str], run_dir: Path) -> float:
    """images/s of the product's training epochs after the first (metrics.csv's epoch times),
    ``backend.train`` on the config run.py composes with ``overrides`` (SGD, no validation
    beyond one image, no export)."""
    from cnnzoo.app.experiment import build_model, prepare

    cfg = compose("backend=torch", f"hardware.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
                  "optim=sgd", "optim.lr=0.01", "trainer.limit_val_batches=1",
                  "trainer.progress_bar=false", "export.enabled=false", *overrides)
    exp = prepare(cfg)
    backend, model, _ = build_model(cfg, run_dir, exp)
    report = backend.train(model, exp.train_split, exp.val_split)
    times = [r["epoch_time_s"] for r in report.history[1:]] or [report.train_time_s]
    return len(exp.train_split) / statistics.median(times)


def _batch(device: str, batch: int, channels: int, size: int):
    import torch
    x = torch.randn(batch, channels, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (batch,), device=device)


def _hand_loop(net, device: str, dtype, batch: int, size: int, channels: int,
               steps: int) -> float:
    """images/s of SGD steps on one preloaded channels-last batch, under autocast to ``dtype``
    (None: fp32)."""
    import torch
    import torch.nn.functional as F

    net = net.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    x, y = _batch(device, batch, channels, size)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(3):  # warm-up
        step()
    return _timed(step, device, steps) * batch


def _timed(step, device: str, steps: int) -> float:
    """Steps per second of ``steps`` calls of ``step``."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps / (time.perf_counter() - t0)


def _fabric_loop(net, device: str, batch: int, steps: int) -> float:
    """images/s of the hand-written loop's steps through Lightning Fabric (``setup``,
    ``fabric.backward``), fp32, on one preloaded batch."""
    import lightning_fabric
    import torch
    import torch.nn.functional as F

    fabric = lightning_fabric.Fabric(accelerator="gpu" if device == "cuda" else "cpu",
                                     devices=1, precision="32-true")
    net = net.to(memory_format=torch.channels_last)
    net, opt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))
    x, y = _batch(device, batch, 1, 32)

    def step():
        opt.zero_grad(set_to_none=True)
        fabric.backward(F.cross_entropy(net(x), y))
        opt.step()

    for _ in range(3):
        step()
    return _timed(step, device, steps) * batch


def _lightning_loop(net, device: str, batch: int, steps: int) -> float:
    """images/s of the second epoch of ``Trainer.fit`` on a module whose step is the loss alone
    (no logger, checkpoint, progress bar or validation), ``steps`` preloaded batches per
    epoch, fp32."""
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F

    batches = [_batch(device, batch, 1, 32)] * steps

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net.to(memory_format=torch.channels_last)

        def training_step(self, b, _):
            return F.cross_entropy(self.net(b[0]), b[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class Clock(pl.Callback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_train_epoch_start(self, *_):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, *_):
            _sync(device)
            self.seconds.append(time.perf_counter() - self.t0)

    clock = Clock()
    trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                         max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock])
    trainer.fit(Plain(), torch.utils.data.DataLoader(batches, batch_size=None))
    return steps * batch / clock.seconds[-1]


def resume(device: str, sizes: dict, work: Path) -> list[dict]:
    accelerator = "gpu" if device == "cuda" else "cpu"
    common = [f"hardware.accelerator={accelerator}", "trainer.deterministic=true",
              f"trainer.max_epochs={sizes['resume_epochs']}", "export.enabled=false"]
    straight = run_cli(work / "straight", *common)
    killed_dir = work / "killed"
    run_cli(killed_dir, *common, kill_after=killed_dir / "checkpoints" / "epoch-0001")
    from cnnzoo.core.checkpoints import CheckpointDir
    latest = CheckpointDir(killed_dir).latest()
    resumed = run_cli(killed_dir, *common)
    ok = (straight.get("returncode") == 0 and resumed.get("returncode") == 0
          and straight["weights_sha256"] == resumed["weights_sha256"])
    return [{"check": "resume", "what": "lenet5 killed after epoch 1's checkpoint, re-run",
             "precision": "32-true", "device": straight.get("hardware", {}).get("device", ""),
             "value": None, "unit": "", "passed": ok,
             "note": (f"resumed from epoch {latest.epoch if latest else 0}; weights_sha256 "
                      f"{resumed.get('weights_sha256', '?')[:12]} vs uninterrupted "
                      f"{straight.get('weights_sha256', '?')[:12]}")}]


# --------------------------------------------------------------------------- the report
def device_name(device: str) -> str:
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    from bench.common import cpu_model
    return cpu_model()


def write(out: Path, rows: list[dict], header: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = ["check", "what", "precision", "device", "value", "unit", "passed", "note"]
    with (out / "gpu.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# GPU check: {header['device_name']}", "",
             ", ".join(f"{k} {v}" for k, v in header.items() if k != "device_name"), "",
             "| check | what | precision | value | passed | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['what']} | {r['precision']} | "
              f"{'' if r['value'] is None else r['value']} {r['unit']} | "
              f"{'yes' if r['passed'] else '**no**'} | {r['note']} |" for r in rows]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import numpy
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: torch {torch.__version__} sees no GPU: run on a GPU machine, or "
              "--device cpu", file=sys.stderr)
        return 2
    sizes = SIZES[args.device]
    out = args.out or ROOT / "bench" / "results" / time.strftime("gpu-%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    peak = bf16_peak(args.device, sizes["peak_n"], sizes["peak_reps"])
    rows = [{"check": "peak", "what": f"bf16 matmul {sizes['peak_n']}^3", "precision": "bf16",
             "device": args.device, "value": round(peak, 1), "unit": "TFLOP/s", "passed": True,
             "note": f"median of {sizes['peak_reps']}"}]
    header = {"device_name": device_name(args.device), "python": sys.version.split()[0],
              "torch": torch.__version__, "numpy": numpy.__version__}
    with tempfile.TemporaryDirectory(prefix="cnnzoo-gpu-") as tmp:
        work = Path(tmp)
        for part in (default_jobs, resume, functools.partial(lenet5, peak_tflops=peak),
                     functools.partial(resnet50, peak_tflops=peak)):
            rows += part(args.device, sizes, work)
            header["total_s"] = round(time.perf_counter() - t0, 1)
            write(out, rows, header)  # what is done survives a later part's failure
    print((out / "gpu.md").read_text())
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
