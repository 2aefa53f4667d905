"""Helpers of the plugin's tests: cnnzoo's ``run.py`` in a real subprocess (reporting which
frameworks the process imported), and test images. A module of its own, not conftest.py:
the tests also run beside cnnzoo's, whose helpers are a module named ``conftest`` too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cnnzoo

CNNZOO_ROOT = Path(cnnzoo.__file__).resolve().parents[1]  # run.py and conf/ (an editable install)
FRAMEWORKS = ("jax", "flax", "optax", "torch", "tensorflow", "mxnet")

# Runs run.py as a user would; ``block`` modules look uninstalled (``find_spec`` gives None
# and importing fails); at exit the process reports which frameworks it imported.
_PROBE = (
    "import atexit, runpy, sys\n"
    "for name in {block!r}:\n"
    "    sys.modules[name] = None\n"
    "atexit.register(lambda: print('FRAMEWORKS_LOADED=' + ','.join("
    f"m for m in {FRAMEWORKS!r} if sys.modules.get(m) is not None)))\n"
    "sys.argv = ['run.py', *sys.argv[1:]]\n"
    "runpy.run_path('run.py', run_name='__main__')\n"
)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def frameworks(self) -> set[str]:
        line = [ln for ln in self.stdout.splitlines() if ln.startswith("FRAMEWORKS_LOADED=")][-1]
        return {m for m in line.split("=", 1)[1].split(",") if m}

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("error:")]

    def results(self) -> dict:
        return json.loads((self.run_dir / "results.json").read_text())


def run_cli(run_dir: Path, *overrides: str, block: tuple[str, ...] = (),
            timeout: int = 600) -> CliResult:
    """``python run.py <overrides> hydra.run.dir=<run_dir>`` from cnnzoo's root."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(block=tuple(block)), *overrides,
                           f"hydra.run.dir={run_dir}"], cwd=CNNZOO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr, run_dir)


def images(n: int, c: int, size: int, seed: int = 0) -> np.ndarray:
    """A float32 NCHW batch of standard-normal pixels."""
    return np.random.default_rng(seed).standard_normal((n, c, size, size)).astype(np.float32)

