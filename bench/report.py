"""Derived rows (ratios, compute efficiency), the targets' pass/gap verdicts, and the three
output files: results.csv, results.json and results.md."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from bench.common import ROW_FIELDS, SAME_PROCESS, Row

TRAIN_RATIO = 0.95                      # product >= 0.95x the best hand-written loop
TRAIN_TARGET_ARCHS = {"lenet5": 32, "resnet50": 224}
EFFICIENCY = {"torch": 0.80, "keras": 0.75, "mxnet": 0.50}  # ResNet-50, 224, batch 16
EFFICIENCY_CASE = ("resnet50", 224, 16)
ORT_SPEEDUP, ORT_CASE = 1.4, ("resnet50", 224, "torch", 1)
PIPELINE_RATIO = 5.0
STARTUP_S = 1.0
ORT_STATED = "onnxruntime (ORT_ENABLE_ALL"


def _verdict(ok: bool) -> str:
    return "pass" if ok else "gap"


def _key(r: Row) -> tuple:
    return (r.arch, r.backend, r.batch, r.input_size)


def is_product(r: Row) -> bool:
    return r.part == "training" and r.measurement.startswith("product") and r.stats is not None


def is_hand(r: Row) -> bool:
    return r.part == "training" and r.measurement.startswith("hand-written") and r.stats is not None


# --------------------------------------------------------------------------- training
def judge_training(rows: list[Row]) -> None:
    """Each product row against the hand-written loop timed in its own process where there is
    one (``SAME_PROCESS``: LeNet-5, whose rates move by about 20% between processes), else
    the fastest hand-written loop of its framework and case."""
    best: dict[tuple, Row] = {}
    paired: dict[tuple, Row] = {}
    for r in filter(is_hand, rows):
        if r.measurement == SAME_PROCESS:
            paired[(*_key(r), r.variant)] = r
        elif _key(r) not in best or r.stats.median > best[_key(r)].stats.median:
            best[_key(r)] = r
    for r in filter(is_product, rows):
        hand = paired.get((*_key(r), r.variant)) or best.get(_key(r))
        if hand is None:
            continue
        r.baseline = f"{hand.measurement} ({hand.stats.median:,.1f} images/s)"
        r.ratio = r.stats.median / hand.stats.median
        images = r.extra.get("images_per_epoch")
        if images:  # what an epoch of the product costs beyond the hand-written steps
            r.extra["overhead_s_per_epoch"] = round(
                images / r.stats.median - images / hand.stats.median, 4)
        if TRAIN_TARGET_ARCHS.get(r.arch) == r.input_size:
            r.target = f">= {TRAIN_RATIO:g}x hand-written"
            r.status = _verdict(r.ratio >= TRAIN_RATIO)


def efficiency_rows(rows: list[Row], peak_gflops: float, peak_label: str,
                    flops: dict[tuple, int]) -> list[Row]:
    """Achieved training FLOP/s (spec FLOPs x 3 per image) over the matmul peak, one row per
    training row."""
    out = []
    for r in rows:
        if not (is_product(r) or is_hand(r)) or (r.arch, r.input_size) not in flops:
            continue
        per_image = 3 * flops[(r.arch, r.input_size)]
        eff = r.stats.scaled(per_image / (peak_gflops * 1e9))
        row = Row("efficiency", r.measurement, "fraction of matmul peak", "fraction", eff,
                  arch=r.arch, backend=r.backend, variant=r.variant, input_size=r.input_size,
                  batch=r.batch, threads=r.threads, warmup=r.warmup,
                  baseline=f"{peak_label}: {peak_gflops:,.1f} GFLOP/s",
                  note=f"{r.stats.median * per_image / 1e9:,.1f} GFLOP/s achieved "
                       f"({per_image / 1e9:.3g} GFLOP per training image)")
        if is_product(r) and (r.arch, r.input_size, r.batch) == EFFICIENCY_CASE \
                and r.backend in EFFICIENCY:
            need = EFFICIENCY[r.backend]
            row.target = f">= {need:.0%} of peak"
            row.status = _verdict(eff.median >= need)
        out.append(row)
    return out


# --------------------------------------------------------------------------- the rest
def judge_inference(rows: list[Row]) -> None:
    for r in rows:
        if (r.part == "inference" and r.metric == "latency" and r.stats is not None
                and r.measurement.startswith(ORT_STATED)
                and (r.arch, r.input_size, r.backend, r.batch) == ORT_CASE and isinstance(r.ratio, float)):
            r.target = f">= {ORT_SPEEDUP:g}x faster than torch eager"
            r.status = _verdict(r.ratio >= ORT_SPEEDUP)


def judge_startup(rows: list[Row]) -> None:
    for r in rows:
        if r.part == "startup" and r.target and r.stats is not None:
            r.status = _verdict(r.stats.median < STARTUP_S)


def judge_data(rows: list[Row]) -> None:
    """Pipelines against LeNet-5's product training rate: each backend's own pipeline against
    its own rate; the file formats (read by every backend) against the fastest backend's."""
    lenet = {r.backend: r for r in rows if is_product(r) and r.arch == "lenet5"
             and r.variant == "default"}
    fastest = max(lenet.values(), key=lambda r: r.stats.median, default=None)
    for r in rows:
        if r.part != "data" or r.stats is None:
            continue
        train = lenet.get(r.backend) if r.backend else fastest
        if train is None:
            continue
        r.baseline = (f"LeNet-5 training, product, {train.backend} "
                      f"({train.stats.median:,.0f} images/s, batch {train.batch})")
        r.ratio = r.stats.median / train.stats.median
        r.target = f">= {PIPELINE_RATIO:g}x LeNet-5 training"
        r.status = _verdict(r.ratio >= PIPELINE_RATIO)


def error_row(part: str, what: str, error: str, **kw) -> Row:
    return Row(part, what, "error", "", None, status="error", note=error, **kw)


# --------------------------------------------------------------------------- files
def write_all(out: Path, rows: list[Row], meta: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    fp = meta["fingerprint"]
    flat = [r.flat(fp) for r in rows]
    paths = {"csv": out / "results.csv", "json": out / "results.json", "md": out / "results.md"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*ROW_FIELDS, *fp])
        writer.writeheader()
        writer.writerows(flat)
    targets = [r for r in flat if r["target"]]
    paths["json"].write_text(json.dumps(
        {**meta, "rows": [{**f, "extra": r.extra} for f, r in zip(flat, rows)],
         "targets": [{k: t[k] for k in ("part", "measurement", "arch", "backend", "variant",
                                        "batch", "median", "unit", "ratio", "target",
                                        "status")} for t in targets]},
        indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(rows, meta))
    return paths


def _fmt(v, unit: str = "") -> str:
    if v == "" or v is None:
        return ""
    if unit == "fraction":
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}"
    return str(v)


def md_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines]
    return "\n".join(out) + "\n"


def _spread(r: Row) -> str:
    s = r.stats
    return "" if s is None else f"{_fmt(s.min, r.unit)}-{_fmt(s.max, r.unit)} ({s.reps})"


def _status(r: Row) -> str:
    return {"pass": "**pass**", "gap": "**GAP**", "error": "**error**"}.get(r.status, "")


def _ratio(r: Row) -> str:
    return f"{r.ratio:.2f}x" if isinstance(r.ratio, float) else ""


SECTIONS = [
    ("training", "Training throughput (images/s): product vs hand-written",
     ["arch", "input", "batch", "backend", "measurement", "variant", "threads", "median",
      "min-max (reps)", "vs hand-written", "target", "status", "extra s/epoch",
      "train() own images/s"],
     lambda r: [r.arch, r.input_size, r.batch, r.backend, r.measurement, r.variant, r.threads,
                _fmt(r.stats.median if r.stats else "", r.unit), _spread(r), _ratio(r),
                r.target, _status(r), _fmt(r.extra.get("overhead_s_per_epoch", "")),
                _fmt(r.extra.get("reported_images_per_s", ""))]),
    ("efficiency", "Compute efficiency: training FLOP/s (spec FLOPs x 3) / fp32 matmul peak",
     ["arch", "input", "batch", "backend", "measurement", "variant", "median", "min-max (reps)",
      "achieved", "target", "status"],
     lambda r: [r.arch, r.input_size, r.batch, r.backend, r.measurement, r.variant,
                _fmt(r.stats.median if r.stats else "", r.unit), _spread(r),
                r.note.split(" (")[0], r.target, _status(r)]),
    ("inference", "Inference: native vs onnxruntime",
     ["arch", "backend", "batch", "runtime", "metric", "median", "min-max (reps)",
      "speed-up vs native", "target", "status"],
     lambda r: [r.arch, r.backend, r.batch, r.measurement, f"{r.metric} ({r.unit})",
                _fmt(r.stats.median if r.stats else "", r.unit), _spread(r), _ratio(r),
                r.target, _status(r)]),
    ("startup", "Start-up (real subprocesses)",
     ["command", "backend", "median (s)", "min-max (reps)", "target", "status"],
     lambda r: [r.measurement, r.backend, _fmt(r.stats.median if r.stats else ""),
                _spread(r), r.target, _status(r)]),
    ("data", "Data pipeline next to LeNet-5 training",
     ["pipeline", "backend", "batch", "images/s", "min-max (reps)", "x training", "target",
      "status"],
     lambda r: [r.measurement, r.backend, r.batch, _fmt(r.stats.median if r.stats else ""),
                _spread(r), _ratio(r), r.target, _status(r)]),
    ("peak", "fp32 matrix-multiply peak",
     ["measurement", "threads", "GFLOP/s median", "min-max (reps)", "note"],
     lambda r: [r.measurement, r.threads, _fmt(r.stats.median if r.stats else ""), _spread(r),
                r.note or r.variant]),
]


def markdown(rows: list[Row], meta: dict) -> str:
    fp = meta["fingerprint"]
    libs = ", ".join(f"{k} {fp[k]}" for k in ("torch", "pytorch_lightning", "tensorflow",
                                               "keras", "mxnet", "onnxruntime", "onnx", "numpy")
                     if fp.get(k))
    machine = (f"{fp['cpu']}, {fp['physical_cores']} cores / {fp['logical_cpus']} threads, "
               f"GPU: {fp['gpu']}; {fp['os']}; Python {fp['python']}; {libs}; "
               f"git {fp.get('git_commit') or 'n/a'}")
    when = (f"Started {meta['started']}, took {meta['duration_s']:.0f} s; load average (1 min) "
            f"{meta.get('load_before')} before, {meta.get('load_after')} after.")
    lines = ["# cnnzoo benchmark results", "", f"Command: `{meta['command']}`  ", when, "",
             f"Machine (every row of results.csv/json carries these columns): {machine}.", ""]
    judged = [r for r in rows if r.target or r.status == "error"]
    if judged:
        lines += ["## Targets", "",
                  md_table(["part", "arch", "backend", "batch", "measurement", "variant",
                          "measured", "target", "status"],
                         [[r.part, r.arch, r.backend, r.batch, r.measurement, r.variant,
                           _measured(r), r.target or r.note, _status(r)] for r in judged])]
    for part, title, header, cells in SECTIONS:
        mine = [r for r in rows if r.part == part]
        if mine:
            lines += [f"## {title}", "", md_table(header, [cells(r) for r in mine])]
    notes = meta.get("notes", [])
    if notes:
        lines += ["## How it was measured", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _measured(r: Row) -> str:
    if r.stats is None:
        return ""
    if isinstance(r.ratio, float) and r.part in ("training", "data", "inference"):
        return f"{_ratio(r)} ({_fmt(r.stats.median, r.unit)} {r.unit})"
    return f"{_fmt(r.stats.median, r.unit)} {'' if r.unit == 'fraction' else r.unit}".strip()
