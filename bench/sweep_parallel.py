"""How much faster a sweep runs with trials in parallel (joblib launcher) than one after another.

Runs the same N-trial sweep through run.py, sequentially (Hydra's basic launcher) and with
``launcher=joblib`` at --jobs processes, alternating, --repeats times each; prints the median wall
times and their ratio. The sweep is a grid over the learning rate, or (--sweeper optuna) an
Optuna study of N trials launched --jobs at a time, in a fresh SQLite storage each run. It also
times one trial alone with all threads and with its share of them (what each parallel trial
gets): the parallel sweep cannot beat ``jobs * t(all threads) / t(share)``, whatever the
launcher does, and the speed-up is reported as a fraction of that bound. Usage:

    python bench/sweep_parallel.py [--sweeper grid|optuna] [--trials 4] [--jobs 2]
                                   [--repeats 3] [--epochs 10]
                                   [override ...]   (e.g. backend=mxnet, for every run)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep(extra: list[str], trials: int, epochs: int, sweeper: str, jobs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        if sweeper == "optuna":
            how = ["hparams_search=optuna", f"hydra.sweeper.n_trials={trials}",
                   f"hydra.sweeper.n_jobs={jobs}", f"hydra.sweeper.storage=sqlite:///{tmp}/s.db"]
        else:
            how = ["-m", "optim.lr=" + ",".join(f"{0.001 * (k + 1):g}" for k in range(trials))]
        cmd = [sys.executable, "run.py", *how, f"trainer.max_epochs={epochs}",
               "trainer.progress_bar=false", f"hydra.sweep.dir={tmp}/sweep", *extra]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0


def single(threads: int, epochs: int, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "run.py", f"trainer.max_epochs={epochs}",
               "trainer.progress_bar=false", f"hardware.threads={threads}",
               f"hydra.run.dir={tmp}/run", *overrides]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return json.loads((Path(tmp) / "run" / "results.json").read_text())["timings"]["total_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweeper", choices=("grid", "optuna"), default="grid")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("overrides", nargs="*", help="config overrides for every run")
    a = p.parse_args()
    seq, par = [], []
    for _ in range(a.repeats):  # alternate, so both see the same machine conditions
        seq.append(sweep(a.overrides, a.trials, a.epochs, a.sweeper, 1))
        par.append(sweep([*a.overrides, "launcher=joblib", f"hydra.launcher.n_jobs={a.jobs}"],
                         a.trials, a.epochs, a.sweeper, a.jobs))
    cores = os.cpu_count() or 1
    share = max(1, cores // a.jobs)
    alone = [single(cores, a.epochs, a.overrides) for _ in range(a.repeats)]
    shared = [single(share, a.epochs, a.overrides) for _ in range(a.repeats)]
    s, q = statistics.median(seq), statistics.median(par)
    print(f"{a.sweeper} sweep, {a.trials} trials of LeNet-5 ({a.epochs} epochs, digits"
          f"{', ' + ' '.join(a.overrides) if a.overrides else ''}), {a.repeats} repeats")
    print(f"sequential (basic launcher): median {s:.1f} s  runs {[round(x, 1) for x in seq]}")
    print(f"joblib, {a.jobs} jobs:          median {q:.1f} s  runs {[round(x, 1) for x in par]}")
    print(f"speed-up: {s / q:.2f}x")
    t_all, t_share = statistics.median(alone), statistics.median(shared)
    bound = a.jobs * t_all / t_share
    print(f"one trial alone (results.json total_s, the framework's import included): "
          f"{t_all:.1f} s at {cores} threads, {t_share:.1f} s at {share}; "
          f"bound for {a.jobs} jobs: {bound:.2f}x")
    print(f"speed-up / bound: {s / q / bound:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
