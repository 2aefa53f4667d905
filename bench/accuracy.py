"""``python -m bench.accuracy``: the README's accuracy table. Every architecture trains with the
project's defaults (``optim=paper``: its own recipe; ``data=digits``) at its smallest input
(``max(min_input_size, 32)``) for ``--epochs`` epochs, each run a ``run.py`` subprocess, one
after another (one run uses every core). Reported per (architecture, backend): best val_acc and
its epoch, the first epoch reaching ``--target``, the final val_acc, the wall time and the
learning-rate recipe; the spread of best val_acc across backends shows whether they agree.

Each run lives in ``<out>/<arch>-<backend>/`` (its Hydra run directory). A finished run with
the same overrides is not trained again, and a partial one continues from its last checkpoint
(run.py resumes when the same command reuses the directory), so a killed bench picks up where it
stopped. Writes ``accuracy.json`` and ``accuracy.md`` to ``--out``; ``--readme`` also rewrites
the table between the README's markers."""
from __future__ import annotations

import argparse
import datetime as dt
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.common import (
    BACKENDS,
    ROOT,
    child_env,
    fingerprint,
    input_size_of,
    log,
    split_csv,
)
from bench.report import md_table

MIN_INPUT = 32               # the smallest input of every run, raised to the spec's minimum
MULTI_BACKEND = ("lenet5", "resnet50", "vgg16")  # also in keras and mxnet by default
FIXED = ("hardware=cpu", "export.enabled=false", "trainer.progress_bar=false")
MARKERS = ("<!-- accuracy-table:start -->", "<!-- accuracy-table:end -->")
LOG, WALL = "bench-accuracy.log", "bench-accuracy.json"  # the bench's own files in a run dir
DASH = "—"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like run.py's mistakes
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", help="architectures, comma-separated (default: all eleven)")
    p.add_argument("--backends", help="backends for every chosen architecture (default: torch; "
                                      f"also keras and mxnet for {', '.join(MULTI_BACKEND)})")
    p.add_argument("--epochs", type=int, default=15, help="epochs per run (default 15)")
    p.add_argument("--target", type=float, default=0.90,
                   help="val_acc whose first epoch is reported (default 0.90)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "accuracy",
                   help="output folder (default bench/results/accuracy)")
    p.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                   help="run.py overrides for every run, e.g. optim=adam")
    p.add_argument("--readme", nargs="?", type=Path, const=ROOT / "README.md", metavar="PATH",
                   help="rewrite the table between the markers of README.md (or PATH)")
    a = p.parse_args(argv)
    if a.epochs < 1:
        p.error(f"--epochs {a.epochs}: expected at least 1")
    if not 0 < a.target <= 1:
        p.error(f"--target {a.target:g}: expected a value in (0, 1]")
    a.runs = plan(a.archs, a.backends, p)
    if a.readme is not None:
        check_markers(a.readme, p)
    a.out = a.out.resolve()
    for arch, backend in a.runs:  # a mistake shows now, not after hours of training
        label = f"{arch} on {backend}" + (f" with --extra {' '.join(a.extra)}" if a.extra else "")
        check_config(overrides(arch, backend, a.epochs, a.extra), label, p)
    return a


def plan(archs: str | None, backends: str | None, p) -> list[tuple[str, str]]:
    """(arch, backend) pairs in run order, architectures by canonical name."""
    import architectures
    from cnnzoo.core.backend import available_backends
    names = []
    for name in split_csv(archs) if archs is not None else architectures.list_archs():
        try:
            names.append(architectures.arch_info(name).name)
        except KeyError as err:
            p.error(err.args[0])
    chosen = split_csv(backends) if backends is not None else None
    for b in chosen or ():
        if b not in available_backends():
            p.error(f"unknown backend '{b}'; choose one of {', '.join(available_backends())}")
    runs = [(arch, b) for arch in dict.fromkeys(names) for b in (
        chosen if chosen is not None else BACKENDS if arch in MULTI_BACKEND else ("torch",))]
    if not runs:
        p.error("no architecture or backend chosen")
    return runs


def check_markers(path: Path, p) -> None:
    if not path.is_file() or any(m not in path.read_text() for m in MARKERS):
        p.error(f"--readme {path}: needs the lines {MARKERS[0]} and {MARKERS[1]}")


def check_config(args: list[str], label: str, p) -> None:
    """``args`` compose into a valid config (the product's own rules), or one line and exit 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bench.common import compose
    from cnnzoo.app.cli import one_line
    from cnnzoo.core.errors import BAD_INPUT
    try:
        compose(*args)
    except (HydraException, OmegaConfBaseException) as err:
        p.error(f"{label}: {one_line(err)}")
    except BAD_INPUT as err:
        p.error(f"{label}: {'; '.join(str(err).splitlines())}")


def overrides(arch: str, backend: str, epochs: int, extra: list[str]) -> list[str]:
    """run.py's overrides of one run (also what tells a finished run of these settings)."""
    return [f"arch={arch}", f"backend={backend}",
            f"arch.input_size={input_size_of(arch, MIN_INPUT)}", f"trainer.max_epochs={epochs}",
            *FIXED, *extra]


# --------------------------------------------------------------------------- one run
def _json(path: Path) -> dict:
    """A JSON file, or {} when it is missing or damaged (the run is then trained again)."""
    from cnnzoo.core.errors import CheckpointError
    from cnnzoo.core.rundir import read_json
    try:
        return read_json(path, "") if path.is_file() else {}
    except CheckpointError:
        return {}


def state(run_dir: Path, args: list[str]) -> str:
    """'done' (finished with these overrides), 'resume' (a partial run of the same command),
    'stale' (a run of other settings: it cannot be resumed) or 'new'."""
    results = _json(run_dir / "results.json")
    if results.get("status") == "ok" and results.get("overrides") == args:
        return "done"
    recorded = run_dir / ".hydra" / "overrides.yaml"  # the last command run.py accepted
    if not recorded.is_file():
        return "new"
    return "resume" if yaml.safe_load(recorded.read_text()) == args else "stale"


def attempts(run_dir: Path) -> list[float]:
    """Wall seconds of each run.py process of the run: a finished one whole, a killed one (the
    bench was stopped) up to its last finished epoch, the work a resume keeps."""
    record = _json(run_dir / WALL)
    done, since = record.get("attempts_s", []), record.get("running_since")
    metrics = run_dir / "metrics.csv"
    if since is not None and metrics.is_file() and metrics.stat().st_mtime > since:
        done = [*done, round(metrics.stat().st_mtime - since, 1)]
    return done


def train(run_dir: Path, args: list[str]) -> str | None:
    """Run ``run.py`` once (it resumes from the directory's checkpoint, if any); its output is
    appended to the run's log and its wall time to the run's attempts. The error, if it failed."""
    from cnnzoo.core.rundir import write_json
    run_dir.mkdir(parents=True, exist_ok=True)
    before = attempts(run_dir)
    write_json(run_dir / WALL, {"attempts_s": before, "running_since": time.time()})
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "run.py", *args, f"hydra.run.dir={run_dir}"],
                          check=False, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    write_json(run_dir / WALL, {"attempts_s": [*before, round(time.perf_counter() - t0, 1)]})
    with (run_dir / LOG).open("a") as f:
        f.write(f"$ {shlex.join(['python', 'run.py', *args])}\n{proc.stdout}{proc.stderr}")
    if proc.returncode == 0:  # finished: the table needs its metrics, not its training state
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # (VGG's: 1 GB)
        return None
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    last = (errors or proc.stderr.strip().splitlines() or ["no output"])[0]
    return f"exit {proc.returncode}: {last}"


def epochs_of(run_dir: Path) -> list[dict]:
    """metrics.csv's rows (epoch, val_acc, ...), [] before the first epoch ends."""
    from cnnzoo.core.rundir import MetricsLog
    path = run_dir / "metrics.csv"
    return MetricsLog(path).rows() if path.is_file() else []


def recipe(run_dir: Path, results: dict) -> dict:
    """The learning-rate recipe: the effective values results.json records (its ``optim``
    block, where cnnzoo writes one), else the configured ones of the run's resolved config."""
    config = run_dir / "config.yaml"  # resolved: .hydra/config.yaml holds ${arch.train.lr}
    configured = (yaml.safe_load(config.read_text()) or {}).get("optim", {}) \
        if config.is_file() else {}
    effective = results.get("optim") or {}
    return {**configured, **effective, "lr_source": "results.json" if "lr" in effective
            else "config.yaml"}


def row(arch: str, backend: str, run_dir: Path, target: float, error: str | None) -> dict:
    """One table row from the run's metrics.csv (per-epoch val_acc) and results.json."""
    from cnnzoo.core.errors import CheckpointError
    results, walls = _json(run_dir / "results.json"), attempts(run_dir)
    try:
        metrics = epochs_of(run_dir)
    except CheckpointError as err:  # a damaged metrics.csv: this row says so, the others go on
        metrics, error = [], error or str(err)
    accs = [(r["epoch"], r["val_acc"]) for r in metrics if "val_acc" in r]
    best = max(accs, key=lambda e: e[1], default=(None, None))  # the first epoch of the best
    return {"arch": arch, "backend": backend, "run_dir": str(run_dir),
            "input_size": (results.get("input_shape") or [input_size_of(arch, MIN_INPUT)])[-1],
            "epochs": accs[-1][0] if accs else 0, "best_val_acc": best[1], "best_epoch": best[0],
            "first_epoch_at_target": next((e for e, v in accs if v >= target), None),
            "final_val_acc": accs[-1][1] if accs else None,
            "below_target": best[1] is None or best[1] < target,
            "wall_s": round(sum(walls), 1) if walls else None,
            "commit": (results.get("git") or {}).get("commit"),  # the code that trained it
            "resumed_from_epoch": results.get("resumed_from_epoch"),
            "optim": recipe(run_dir, results),
            "status": "ok" if results.get("status") == "ok" and not error else "failed",
            "error": error, "val_acc": [v for _, v in accs]}


def add_spread(rows: list[dict]) -> None:
    """Each row's ``backend_spread``: max - min of its architecture's best val_acc over the
    backends it ran in (None for one backend): they are numerically equivalent."""
    for r in rows:
        bests = [o["best_val_acc"] for o in rows
                 if o["arch"] == r["arch"] and o["best_val_acc"] is not None]
        r["backend_spread"] = max(bests) - min(bests) if len(bests) > 1 else None


# --------------------------------------------------------------------------- reports
def _acc(v: float | None) -> str:
    return DASH if v is None else f"{v:.4f}"


def _recipe_text(o: dict) -> str:
    name, lr = o.get("name", "?"), o.get("effective_lr", o.get("lr"))  # the rate applied
    text = f"{name} {lr:.3g}" if isinstance(lr, (int, float)) else f"{name} ?"
    if o.get("warmup_epochs"):
        text += f", warmup {o['warmup_epochs']:g} ep"
    if o.get("scheduler") not in (None, "none"):
        text += f", {o['scheduler']}"
    if o.get("label_smoothing"):
        text += f", smoothing {o['label_smoothing']:g}"
    return text + (f", clip {o['clip_grad_norm']:g}" if o.get("clip_grad_norm") else "")


def _note(r: dict, planned: int) -> str:
    notes = [f"failed ({r['error']})"] if r["error"] else []
    if r["epochs"] < planned:
        notes.append(f"{r['epochs']} of {planned} epochs")
    if r["resumed_from_epoch"]:
        notes.append(f"resumed after epoch {r['resumed_from_epoch']}")
    return "; ".join(notes)


def table(rows: list[dict], meta: dict) -> str:
    """The Markdown table and a line naming the machine, the command and the date."""
    t = f"{meta['target']:.2f}"
    lines = []
    for r in rows:
        best = f"{_acc(r['best_val_acc'])} ({r['best_epoch'] or DASH})"
        if r["below_target"] and r["best_val_acc"] is not None:  # shown, never hidden
            best = f"**{_acc(r['best_val_acc'])}** ({r['best_epoch'] or DASH}), below {t}"
        lines.append([r["arch"], r["backend"], r["input_size"] or DASH, r["epochs"], best,
                      r["first_epoch_at_target"] or DASH, _acc(r["final_val_acc"]),
                      _recipe_text(r["optim"]), DASH if r["wall_s"] is None
                      else f"{r['wall_s']:.0f}",
                      _acc(r["backend_spread"]), _note(r, meta["epochs"])])
    fp, settings = meta["fingerprint"], ", ".join([*FIXED, *meta["extra"]])
    head = (f"Measured on {fp['cpu']} ({fp['physical_cores']} cores) on "
            f"{meta['started'][:10]}, git {fp['git_commit'] or 'n/a'}: `{meta['command']}`: "
            f"epochs per run: {meta['epochs']}; {settings}; everything else the defaults "
            "(data=digits, optim=paper: each architecture's own recipe) unless overridden.")
    header = ["arch", "backend", "input", "epochs", "best val_acc (epoch)",
              f"first epoch ≥ {t}", "final val_acc", "optimizer, lr", "wall s",
              "best spread across backends", "note"]
    foot = ("lr: the peak rate applied (results.json's `optim.effective_lr`: the recipe's rate "
            "scaled to the batch), else the configured `optim.lr`. Wall s: the run.py "
            "process's time; for a resumed run the sum of its attempts, a killed one up to its "
            "last finished epoch.")
    return f"{head}\n\n{md_table(header, lines)}\n{foot}\n"


def write_reports(out: Path, rows: list[dict], meta: dict) -> str:
    from cnnzoo.core.rundir import atomic_write_bytes, write_json
    block = table(rows, meta)
    write_json(out / "accuracy.json", {**meta, "rows": rows})
    atomic_write_bytes(out / "accuracy.md",
                       f"# cnnzoo: accuracy with the defaults\n\n{block}".encode())
    return block


def rewrite_readme(path: Path, block: str) -> None:
    """Replace what lies between the two markers (checked by parse_args) with ``block``."""
    from cnnzoo.core.rundir import atomic_write_bytes
    head, start, rest = path.read_text().partition(MARKERS[0])
    _, end, tail = rest.partition(MARKERS[1])
    atomic_write_bytes(path, f"{head}{start}\n{block}{end}{tail}".encode())


# --------------------------------------------------------------------------- main
def run_one(a: argparse.Namespace, arch: str, backend: str) -> dict:
    run_dir, args = a.out / f"{arch}-{backend}", overrides(arch, backend, a.epochs, a.extra)
    name, now, error = f"{arch}-{backend}", state(run_dir, args), None
    if now == "done":
        log(f"[accuracy] {name}: done already ({run_dir / 'results.json'})")
    else:
        if now == "stale":  # other epochs or overrides: run.py would refuse to resume it
            log(f"[accuracy] {name}: {run_dir} holds a run of other settings; training anew")
            shutil.rmtree(run_dir)
        log(f"[accuracy] {name}: {'resuming' if now == 'resume' else 'training'} "
            f"(epochs: {a.epochs}, {args[2]})")
        error = train(run_dir, args)
    r = row(arch, backend, run_dir, a.target, error)
    if now != "done":
        log(f"[accuracy] {name}: {'FAILED ' + error if error else 'finished'}; best val_acc "
            f"{_acc(r['best_val_acc'])}, {r['wall_s']} s")
    return r


def with_other_finished_runs(a: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """``rows`` and the finished runs of the same settings already in ``--out`` (a bench run in
    parts, e.g. ``--archs vgg16`` then ``--archs lenet5``, builds one table), in the default
    plan's order."""
    import architectures
    rows, have = list(rows), {(r["arch"], r["backend"]) for r in rows}
    for arch in architectures.list_archs():
        for backend in BACKENDS:
            run_dir = a.out / f"{arch}-{backend}"
            if (arch, backend) not in have and run_dir.is_dir() and state(
                    run_dir, overrides(arch, backend, a.epochs, a.extra)) == "done":
                rows.append(row(arch, backend, run_dir, a.target, None))
    order = {name: i for i, name in enumerate(architectures.list_archs())}
    return sorted(rows, key=lambda r: (order.get(r["arch"], len(order)),
                                       BACKENDS.index(r["backend"])
                                       if r["backend"] in BACKENDS else len(BACKENDS)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    meta = {"command": shlex.join(["python", "-m", "bench.accuracy", *argv]),
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "epochs": a.epochs, "target": a.target, "extra": a.extra,
            "fingerprint": fingerprint()}
    meta["cpu"], meta["commit"] = meta["fingerprint"]["cpu"], meta["fingerprint"]["git_commit"]
    planned = []
    for arch, backend in a.runs:
        planned.append(run_one(a, arch, backend))
        rows = with_other_finished_runs(a, planned)
        add_spread(rows)
        block = write_reports(a.out, rows, meta)  # after each run: a killed bench shows them
    if a.readme is not None:
        rewrite_readme(a.readme, block)
    print(block + f"\nwrote {a.out / 'accuracy.json'}, {a.out / 'accuracy.md'}"
          + (f", {a.readme}" if a.readme else ""))
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
