"""What every measurement shares: timing statistics, the result row, the hardware fingerprint,
composed configs, and the child processes each framework's measurements run in.

Kept free of any framework import: the parent process (``python -m bench``) only orchestrates,
and each framework loads in its own child process with its own thread settings."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/data_pipeline.py` and the children run from ROOT
    sys.path.insert(0, str(ROOT))

SEED = 42
# the hand-written loop timed in a product's own process: that product row's baseline
SAME_PROCESS = "hand-written, in the product's process"
BACKENDS = ("torch", "keras", "mxnet")
VERSION_PACKAGES = {"torch": "torch", "pytorch_lightning": "pytorch-lightning",
                    "tensorflow": ("tensorflow-cpu", "tensorflow"), "keras": "keras",
                    "mxnet": "mxnet", "onnx": "onnx", "onnxruntime": "onnxruntime",
                    "numpy": "numpy", "hydra": "hydra-core"}


# --------------------------------------------------------------------------- statistics
@dataclass
class Stats:
    """Median and spread of repeated timed samples of one quantity."""
    median: float
    min: float
    max: float
    reps: int

    @classmethod
    def of(cls, samples) -> Stats:
        samples = [float(s) for s in samples]
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent: how much the repetitions disagree."""
        return 100.0 * (self.max - self.min) / self.median if self.median else 0.0

    def scaled(self, factor: float) -> Stats:
        """The same samples times ``factor`` (> 0)."""
        return Stats(self.median * factor, self.min * factor, self.max * factor, self.reps)


def timed(fn, warmup: int, reps: int, sync=None) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed ones; ``sync()``
    (if given) runs inside the timed region after each call (asynchronous engines)."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------- rows
ROW_FIELDS = ("part", "measurement", "arch", "backend", "variant", "input_size", "batch",
              "threads", "metric", "unit", "median", "min", "max", "spread_pct", "reps",
              "warmup", "baseline", "ratio", "target", "status", "note")


@dataclass
class Row:
    part: str                  # training, efficiency, peak, inference, startup, data
    measurement: str           # what was timed, e.g. "product", "hand-written (channels_last)"
    metric: str                # e.g. "throughput", "latency", "wall time", "efficiency"
    unit: str                  # images/s, ms, s, GFLOP/s, fraction
    stats: Stats | None
    arch: str = ""
    backend: str = ""
    variant: str = ""          # config overrides (product) or the baseline's settings
    input_size: int | str = ""
    batch: int | str = ""
    threads: int | str = ""
    warmup: int | str = ""
    baseline: str = ""         # what ``ratio`` divides by
    ratio: float | str = ""
    target: str = ""           # e.g. ">= 0.95x hand-written"
    status: str = ""           # pass, gap, error, or "" (no target)
    note: str = ""
    extra: dict = field(default_factory=dict)

    def flat(self, fingerprint: dict) -> dict:
        s = self.stats
        out = {"part": self.part, "measurement": self.measurement, "arch": self.arch,
               "backend": self.backend, "variant": self.variant, "input_size": self.input_size,
               "batch": self.batch, "threads": self.threads, "metric": self.metric,
               "unit": self.unit,
               "median": _num(s.median) if s else "", "min": _num(s.min) if s else "",
               "max": _num(s.max) if s else "",
               "spread_pct": round(s.spread_pct, 1) if s else "", "reps": s.reps if s else "",
               "warmup": self.warmup, "baseline": self.baseline,
               "ratio": _num(self.ratio) if isinstance(self.ratio, float) else self.ratio,
               "target": self.target, "status": self.status, "note": self.note}
        out.update(fingerprint)
        return out

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("part", "measurement", "metric", "unit", "arch",
                                           "backend", "variant", "input_size", "batch",
                                           "threads", "warmup", "baseline", "ratio", "target",
                                           "status", "note", "extra")}
        d["stats"] = None if self.stats is None else self.stats.__dict__
        return d

    @classmethod
    def from_json(cls, d: dict) -> Row:
        d = dict(d)
        stats = d.pop("stats")
        return cls(stats=None if stats is None else Stats(**stats), **d)


def _num(v: float) -> float:
    """Four significant digits: enough for timings that vary by a few percent."""
    return float(f"{v:.4g}")


# --------------------------------------------------------------------------- fingerprint
def physical_cores() -> int:
    """Distinct (physical id, core id) pairs of /proc/cpuinfo; os.cpu_count() elsewhere."""
    try:
        pairs, phys = set(), "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":", 1)[1].strip()
            elif line.startswith("core id"):
                pairs.add((phys, line.split(":", 1)[1].strip()))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str:
    """The NVIDIA GPUs nvidia-smi lists, or "none" (no framework is imported to find out)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "none"
    names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
    return "; ".join(names) if out.returncode == 0 and names else "none"


def package_version(names) -> str:
    for name in (names,) if isinstance(names, str) else names:
        try:
            return version(name)
        except PackageNotFoundError:
            pass
    return ""


def fingerprint() -> dict:
    """The machine and software every row was measured on (flat, for CSV columns)."""
    from cnnzoo.core.rundir import git_info
    git = git_info(ROOT) or {}
    fp = {"cpu": cpu_model(), "physical_cores": physical_cores(),
          "logical_cpus": os.cpu_count() or 1, "gpu": gpu_name(),
          "os": platform.platform(), "python": platform.python_version()}
    fp.update({k: package_version(v) for k, v in VERSION_PACKAGES.items()})
    fp["git_commit"] = (git.get("commit", "")[:12] + ("+dirty" if git.get("dirty") else "")
                        if git else "")
    return fp


def load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------- configs
def compose(*overrides: str):
    """The experiment config run.py would see for these overrides, validated by the product's
    own rules (``cnnzoo.app.experiment.compose``)."""
    from cnnzoo.app.experiment import compose as compose_config
    return compose_config(*overrides)


def synthetic_data(train_images: int, batch: int, input_size: int) -> list[str]:
    """Overrides for ``train_images`` synthetic training images generated at the input size (no
    resize when batches are preprocessed) and a single validation image."""
    n = train_images + 1
    return ["data=synthetic", f"data.num_samples={n}", f"data.val_fraction={1.0 / n!r}",
            f"data.image_size={input_size}", f"data.batch_size={batch}",
            f"arch.input_size={input_size}"]


def input_size_of(arch: str, requested: int | None) -> int:
    """The architecture's canonical input size (conf/arch/<arch>.yaml), or ``requested``
    raised to its minimum."""
    from omegaconf import OmegaConf

    import architectures
    conf = OmegaConf.load(ROOT / "conf" / "arch" / f"{arch}.yaml")
    if requested is None:
        return int(conf.input_size)
    spec = architectures.build_spec(conf.name, conf.num_classes or 10, conf.in_channels,
                                    **conf.get("options", {}))
    return max(int(requested), spec.min_input_size())


def arch_name(arch: str) -> str:
    """The registry name behind a config option (aliases like vgg -> vgg16)."""
    from omegaconf import OmegaConf
    return str(OmegaConf.load(ROOT / "conf" / "arch" / f"{arch}.yaml").name)


def flops_per_image(arch: str, input_size: int, num_classes: int = 10) -> int:
    """The spec's forward FLOPs per image (2 x multiply-adds of conv and dense layers) at the
    benchmark's class count."""
    from omegaconf import OmegaConf

    import architectures
    conf = OmegaConf.load(ROOT / "conf" / "arch" / f"{arch}.yaml")
    spec = architectures.build_spec(conf.name, num_classes, conf.in_channels,
                                    **conf.get("options", {}))
    return int(spec.analyze(input_size).flops)


# --------------------------------------------------------------------------- children
def run_jobs(jobs: list[dict], timeout: float, env: dict | None = None) -> list[dict]:
    """Run ``jobs`` (``{"task", "args"}``) one after another in a fresh ``python -m bench.child``
    process (its own framework and thread settings). Returns one ``{"rows": [...]}`` or
    ``{"error": "..."}`` per job, also when the process crashed or timed out part-way."""
    with tempfile.TemporaryDirectory(prefix="cnnzoo-bench-") as tmp:
        spec, out = Path(tmp) / "jobs.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"jobs": jobs}))
        full_env = child_env(env)
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.child", str(spec), str(out)],
                                  check=False, cwd=ROOT, env=full_env, capture_output=True,
                                  text=True, timeout=timeout)
            why = (f"child exited with code {proc.returncode}: "
                   + " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:]))
        except subprocess.TimeoutExpired:
            why = f"child timed out after {timeout:.0f} s"
        done = json.loads(out.read_text()) if out.exists() else []
    return done + [{"error": why}] * (len(jobs) - len(done))


def child_env(extra: dict | None = None) -> dict:
    """This process's environment for a child, with the frameworks' warnings and TensorFlow's
    log lines silenced (they would bury the output that is read back)."""
    return {**os.environ, "PYTHONWARNINGS": "ignore", "TF_CPP_MIN_LOG_LEVEL": "2",
            **(extra or {})}


def split_csv(text: str) -> list[str]:
    """A comma-separated option's items, blanks dropped."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
