"""The GPU check of the torch backend, one prepared command for a bare GPU machine:

    python -m bench.gpu                      # on the GPU (a few minutes on one GPU)
    python -m bench.gpu --device cpu         # the same checks with tiny sizes (the test suite)

It measures and checks, in one run, with the device's name in every result:

- ``peak``: the card's bf16 matrix-multiply rate (square products, the median of timed runs),
  which the training rows are a fraction of;
- ``default job``: ``python run.py`` with ``hardware=gpu`` (bf16-mixed) and ``hardware=auto``:
  val_acc, images/s, and the ONNX file of the GPU-trained mixed-precision model verified on
  the CPU in onnxruntime;
- ``resnet50``: ResNet-50 at 224x224, channels-last, in bf16-mixed and 16-mixed: the product
  (``backend.train``, its own input pipeline) next to a hand-written loop in this process on
  preloaded batches (the same model, optimizer and autocast, with and without ``torch.compile``),
  each as images/s and as a fraction of the bf16 peak (3 x the forward FLOPs per image);
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
    "cuda": {"peak_n": 8192, "peak_reps": 10, "resnet_size": 224, "batch": 128, "steps": 24,
             "epochs": 3, "hand_steps": 30, "default_epochs": 10, "resume_epochs": 3},
    "cpu": {"peak_n": 256, "peak_reps": 3, "resnet_size": 32, "batch": 4, "steps": 2,
            "epochs": 2, "hand_steps": 2, "default_epochs": 1, "resume_epochs": 2},
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
    accelerator = "gpu" if device == "cuda" else "cpu"
    rows = []
    for precision in PRECISIONS:
        if device == "cpu" and precision == "16-mixed":
            continue  # float16 autocast is a GPU feature
        overrides = [
            "arch=resnet50", "backend=torch", f"hardware.accelerator={accelerator}",
            f"hardware.precision={precision}", "backend.channels_last=true",
            *synthetic_data(steps * batch, batch, size), "data.num_classes=10", "optim=sgd",
            "optim.lr=0.01", f"trainer.max_epochs={sizes['epochs']}",
            "trainer.limit_val_batches=1", "trainer.progress_bar=false", "export.enabled=false"]
        product = _product(compose(*overrides), work / f"resnet50-{precision}")
        rows.append(_row("resnet50 product (backend.train)", precision, device, product,
                         train_flops, peak_tflops, f"{steps} steps of {batch}, {size}x{size}, "
                         "epochs after the first"))
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        # torch.compile (bf16 on the GPU only): on the CPU it needs a C++ toolchain and
        # minutes, and each compilation costs the GPU run about a minute
        compile_too = device == "cuda" and precision == "bf16-mixed"
        for compiled in (False, True) if compile_too else (False,):
            rate = _hand_loop(SpecModule(spec, size), device, dtype, batch, size,
                              sizes["hand_steps"], compiled)
            note = f"preloaded batches of {batch}, channels-last"
            if not compiled:
                rows[-1]["note"] += f"; product / hand-written {product / rate:.2f}x"
            rows.append(_row("resnet50 hand-written loop" + (", torch.compile" if compiled else ""),
                             precision, device, rate, train_flops, peak_tflops, note))
    return rows


def _row(what: str, precision: str, device: str, rate: float, train_flops: float,
         peak_tflops: float, note: str) -> dict:
    fraction = rate * train_flops / (peak_tflops * 1e12)
    return {"check": "resnet50", "what": what, "precision": precision, "device": device,
            "value": round(rate, 1), "unit": "images/s", "passed": True,
            "note": f"{note}; {fraction:.1%} of the bf16 peak"}


def _product(cfg, run_dir: Path) -> float:
    """images/s of the product's training epochs after the first (metrics.csv's epoch times)."""
    from cnnzoo.app.experiment import build_model, prepare

    exp = prepare(cfg)
    backend, model, _ = build_model(cfg, run_dir, exp)
    report = backend.train(model, exp.train_split, exp.val_split)
    times = [r["epoch_time_s"] for r in report.history[1:]] or [report.train_time_s]
    return len(exp.train_split) / statistics.median(times)


def _hand_loop(net, device: str, dtype, batch: int, size: int, steps: int,
               compiled: bool) -> float:
    """images/s of SGD steps under autocast on preloaded channels-last batches."""
    import torch
    import torch.nn.functional as F

    net = net.to(device).to(memory_format=torch.channels_last).train()
    model = torch.compile(net) if compiled else net
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(3):  # warm-up (and compilation)
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


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
        for part in (default_jobs, resume, functools.partial(resnet50, peak_tflops=peak)):
            rows += part(args.device, sizes, work)
            header["total_s"] = round(time.perf_counter() - t0, 1)
            write(out, rows, header)  # what is done survives a later part's failure
    print((out / "gpu.md").read_text())
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
