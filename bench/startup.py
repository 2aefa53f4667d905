"""Start-up, as a user meets it: ``python run.py ...`` as real subprocesses, wall-clock time from
launching the interpreter.

- ``--help`` and ``task=summary arch=<arch>``: process wall time (target < 1 s).
- Time to the first training step, per backend: ``python run.py backend=<b>`` training one
  step (one epoch of one batch of synthetic LeNet-5 images, no export); measured to the moment
  the product prints that epoch's line (after the step, the one-image validation and the
  checkpoint), and the whole process's wall time.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from bench.common import ROOT, Row, Stats, synthetic_data

TARGET_S = 1.0


def _env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def wall(args: list[str]) -> float:
    with tempfile.TemporaryDirectory(prefix="cnnzoo-bench-start-") as tmp:
        cmd = [sys.executable, "run.py", *args]
        if not any(a.startswith("--") for a in args):
            cmd.append(f"hydra.run.dir={tmp}/run")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(), capture_output=True,
                              text=True, timeout=300)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run.py {' '.join(args)} exited with {proc.returncode}: "
                           f"{proc.stderr.strip().splitlines()[-1:]}")
    return seconds


def first_step(backend: str, arch: str, batch: int, input_size: int) -> tuple[float, float]:
    """(seconds to the first epoch's line, process wall seconds) of a one-step training run."""
    args = [f"backend={backend}", f"arch={arch}", "hardware=cpu",
            *synthetic_data(batch, batch, input_size), "trainer.max_epochs=1", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1", "trainer.progress_bar=true", "export.enabled=false"]
    with tempfile.TemporaryDirectory(prefix="cnnzoo-bench-start-") as tmp:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "run.py", *args, f"hydra.run.dir={tmp}/run"],
                                cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        first = None
        for line in proc.stdout:  # not a terminal: one plain line per finished epoch
            if first is None and line.startswith("epoch 1/1"):
                first = time.perf_counter() - t0
        code = proc.wait()
        total = time.perf_counter() - t0
    if code != 0 or first is None:
        raise RuntimeError(f"one-step run of backend={backend} exited with {code}")
    return first, total


def measure(archs: list[str], backends: list[str], reps: int, first_reps: int, warmup: int,
            first_arch: str, first_batch: int, first_size: int) -> list[Row]:
    rows = []
    cases = [("python run.py --help", ["--help"], "")]
    cases += [(f"python run.py task=summary arch={a}", ["task=summary", f"arch={a}"], a)
              for a in archs]
    for label, args, arch in cases:
        for _ in range(warmup):  # the file cache, as for a user's second command
            wall(args)
        rows.append(Row("startup", label, "wall time", "s",
                        Stats.of([wall(args) for _ in range(reps)]), arch=arch,
                        warmup=warmup, target=f"< {TARGET_S:g} s"))
    for b in backends:
        for _ in range(warmup):
            first_step(b, first_arch, first_batch, first_size)
        runs = [first_step(b, first_arch, first_batch, first_size) for _ in range(first_reps)]
        common = {"arch": first_arch, "backend": b, "batch": first_batch,
                  "input_size": first_size, "warmup": warmup}
        rows.append(Row("startup", f"python run.py backend={b}: time to first training step",
                        "wall time", "s", Stats.of([r[0] for r in runs]), **common,
                        note="launch to the line printed after the first (only) step's epoch"))
        rows.append(Row("startup", f"python run.py backend={b}: one-step run, whole process",
                        "wall time", "s", Stats.of([r[1] for r in runs]), **common,
                        note="includes writing results.json and the summary"))
    return rows
