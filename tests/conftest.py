"""Shared helpers: run ``run.py`` in a real subprocess and compose configs with Hydra's API."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cnnzoo.conformance import toy_spec  # noqa: F401  (the tests' small all-layer-types spec)

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "tensorflow", "keras", "mxnet", "pytorch_lightning", "onnx")

# Runs run.py as a user would, then reports which frameworks the process imported.
_PROBE = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print('FRAMEWORKS_LOADED=' + ','.join("
    f"m for m in {FRAMEWORKS!r} if m in sys.modules)))\n"
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


def run_cli(run_dir: Path, *overrides: str, timeout: int = 600, env: dict | None = None) -> CliResult:
    """``python run.py <overrides> hydra.run.dir=<run_dir>`` in a subprocess, from the repo root."""
    args = [*overrides] + ([] if any(a.startswith("--") for a in overrides)
                           else [f"hydra.run.dir={run_dir}"])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr, run_dir)


def run_python(code: str, timeout: int = 300, env: dict | None = None):
    """``python -c <code>`` in a fresh process from the repo root (for what must not share this
    process's imports or settings); the CompletedProcess, with text output."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture
def cli(tmp_path):
    return lambda *overrides, **kw: run_cli(tmp_path / "run", *overrides, **kw)


def compose_cfg(*overrides: str, **kwargs):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), **kwargs)


def config_options(group: str) -> list[str]:
    """The options of a config group; for ``backend``, every backend usable here (its conf file
    ships with its package)."""
    if group == "backend":
        from cnnzoo.core.backend import usable_backends
        return usable_backends()
    # a file named _x.yaml is a part other options include (conf/optim/_schedule.yaml)
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")
                  if not p.stem.startswith("_"))
