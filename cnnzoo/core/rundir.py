"""Files of a run directory: atomic writes, the per-epoch metrics log, and what a run records
to be reproduced (package versions, machine, git commit)."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .errors import CheckpointError

# one set of column names for every backend
METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s")
# the distributions every run records; each backend adds its own (BackendInfo.packages)
PACKAGES = ("cnnzoo", "numpy", "onnx", "onnxruntime", "hydra-core")
SCHEMA_VERSION = 1  # of results.json and verification.json (README, "results.json schema")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it, so a crash never leaves half a
    file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# the way out of a damaged file of a run that training would continue
RESTORE_OR_ELSEWHERE = "restore it, or train in another hydra.run.dir"


def read_json(path: Path, fix: str) -> dict:
    """A JSON file of a run directory; CheckpointError naming the file and ``fix`` when it is
    damaged."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}): {fix}") from None


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


class MetricsLog:
    """``metrics.csv``: one row per epoch with METRIC_COLUMNS, appended as epochs finish."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(METRIC_COLUMNS)

    def append(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c)) for c in METRIC_COLUMNS])

    def rows(self) -> list[dict]:
        """The rows written so far, numbers as floats (epoch as int); CheckpointError when the
        file is damaged (a resumed run continues it)."""
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            try:
                rows = [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items()
                         if v != ""} for r in reader]
                if any("epoch" not in r for r in rows):
                    raise ValueError("a row without an epoch")
                return rows
            except (ValueError, TypeError, csv.Error) as err:
                raise CheckpointError(f"{self.path} is damaged at line {reader.line_num} "
                                      f"({err}): {RESTORE_OR_ELSEWHERE}") from None

    def keep_epochs(self, epochs: int) -> None:
        """Drop the rows after epoch ``epochs`` (a resumed run redoes those epochs), atomically."""
        rows = self.rows()
        if any(r["epoch"] > epochs for r in rows):
            text = io.StringIO()
            writer = csv.writer(text)
            writer.writerow(METRIC_COLUMNS)
            writer.writerows([_fmt(r.get(c)) for c in METRIC_COLUMNS]
                             for r in rows if r["epoch"] <= epochs)
            atomic_write_bytes(self.path, text.getvalue().encode())


def _fmt(v):
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)


def package_versions() -> dict[str, str]:
    """The installed versions of the core's packages and of every installed backend's."""
    from .backend import available_backends, backend_info

    names = list(PACKAGES)
    for backend in available_backends():
        names += [n for n in backend_info(backend).packages if n not in names]
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def machine_info() -> dict:
    """The CPU, core count, OS and Python version a run used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version()}


def git_info(where: Path) -> dict | None:
    """The commit of the git checkout holding ``where`` and whether it had local changes, or
    None outside a checkout (or without git)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}
