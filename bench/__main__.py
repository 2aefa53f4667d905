"""``python -m bench``: the benchmark harness. See ``python -m bench --help`` and
docs/benchmarks.md. Each framework's measurements run in child processes (bench/child.py);
this process orchestrates, judges the targets and writes results.csv/json/md."""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

from bench import report
from bench.common import (
    BACKENDS,
    ROOT,
    Row,
    arch_name,
    fingerprint,
    flops_per_image,
    input_size_of,
    load_average,
    log,
    physical_cores,
    run_jobs,
    split_csv,
)

PARTS = ("peak", "training", "efficiency", "inference", "startup", "data")
DEFAULT_BATCH = {"lenet5": 32}          # others: 16 (ResNet-50's target case)
# batches per epoch / repetition; others: 8 (ResNet-50: ~13 s epochs, so the per-epoch
# checkpoint of its 200 MB training state weighs as in an epoch of minutes, not of a few steps)
DEFAULT_STEPS = {"lenet5": 128}
# overhead-bound: the hand-written baseline also runs at the framework's default thread count
# (a tiny model may run faster on fewer threads); the faster one is the baseline
OVERHEAD_BOUND = {"lenet5"}
DEFAULT_VARIANTS = ["torch:backend.channels_last=false",
                    "torch@lenet5:data.in_memory_mb=0",
                    "keras@lenet5:backend.steps_per_execution=1",
                    "keras@lenet5:backend.jit_compile=true",
                    "mxnet@lenet5:hardware.threads=1"]

# every size-like option: (full run, --quick)
PRESETS = {"archs": ("lenet5,resnet50", "lenet5"), "reps": (3, 2), "warmup": (1, 1),
           "steps": (None, 8), "infer_batches": ("1,16", "1,8"), "infer_reps": (5, 2),
           "min_rep_s": (0.25, 0.01), "startup_reps": (5, 1), "first_step_reps": (3, 1),
           "startup_warmup": (1, 0), "format_images": (10000, 128), "data_reps": (3, 1),
           "formats": (None, "digits,npz"), "peak_sizes": ("1024,2048,4096", "256,512"),
           "peak_reps": (5, 2), "variants": (None, ["none"])}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=(
            "Benchmark cnnzoo: training throughput through the product vs a hand-written loop "
            "per framework, compute efficiency against the measured fp32 matmul peak, "
            "inference native vs onnxruntime, start-up, and the data pipeline next to LeNet-5 "
            "training. Writes results.csv, results.json and results.md."),
        epilog="Full run (docs/benchmarks.md): python -m bench   Quick check: python -m bench "
               "--quick --out /tmp/bench")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    p.add_argument("--archs", help="architectures (conf/arch names); default lenet5,resnet50 "
                                   "(--quick: lenet5)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="default torch,keras,mxnet")
    p.add_argument("--batch-sizes", help="training batch sizes for every arch (default: "
                                         "lenet5 32, others 16)")
    p.add_argument("--input-size", type=int, help="input size for every arch (default: each "
                                                  "arch's canonical size)")
    p.add_argument("--steps", type=int, help="batches per epoch/repetition (default: lenet5 "
                                             "128, others 8; --quick 8)")
    p.add_argument("--reps", type=int, help="timed repetitions: training epochs, peak (default "
                                            "3; --quick 2)")
    p.add_argument("--warmup", type=int, help="untimed warm-up epochs of the product "
                                              "(default 1)")
    p.add_argument("--infer-batches", help="inference batch sizes (default 1,16; --quick 1,8)")
    p.add_argument("--infer-reps", type=int, help="inference repetitions (default 5)")
    p.add_argument("--min-rep-s", type=float, help="inference: shortest repetition, seconds "
                                                   "(default 0.25)")
    p.add_argument("--ort-levels", default="all",
                   help="onnxruntime graph optimization levels to time: all, extended, basic, "
                        "disabled (default all)")
    p.add_argument("--startup-reps", type=int, help="--help/task=summary runs (default 5)")
    p.add_argument("--first-step-reps", type=int, help="one-step training runs per backend "
                                                       "(default 3)")
    p.add_argument("--startup-warmup", type=int, help="untimed start-up runs first (default 1)")
    p.add_argument("--format-images", type=int, help="images per file format (default 10000)")
    p.add_argument("--formats", help="file formats to time (data.name values; default all)")
    p.add_argument("--data-reps", type=int, help="data pipeline epochs timed (default 3)")
    p.add_argument("--peak-sizes", help="matmul sizes (default 1024,2048,4096)")
    p.add_argument("--peak-reps", type=int, help="matmul repetitions per size (default 5)")
    p.add_argument("--variants", nargs="*",
                   help="product config variants, each BACKEND[@ARCH]:override[,override]; "
                        "{cores} is the physical core count; 'none' for none (default: "
                        + " ".join(DEFAULT_VARIANTS) + ")")
    p.add_argument("--hardware", default="cpu",
                   help="the hardware preset (conf/hardware) of the product's training runs and "
                        "of a plugin's hand-written loop (default cpu; the built-in loops run "
                        "on the CPU only: python -m bench.gpu measures torch on a GPU)")
    p.add_argument("--threads", type=int, default=physical_cores(),
                   help="threads of the hand-written loops, matmul peak and inference "
                        "(default: the physical cores)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                   help="output folder (default bench/results)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for tests: LeNet-5 only, 8 steps, 2 repetitions, no "
                        "variants (explicit options still win)")
    a = p.parse_args(argv)
    for key, (full, quick) in PRESETS.items():
        if getattr(a, key) is None:
            setattr(a, key, quick if a.quick else full)
    a.parts = split_csv(a.parts)
    unknown = set(a.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    a.archs, a.backends = split_csv(a.archs), split_csv(a.backends)
    a.infer_batches = [int(b) for b in split_csv(a.infer_batches)]
    a.peak_sizes = [int(n) for n in split_csv(a.peak_sizes)]
    a.batch_sizes = [int(b) for b in split_csv(a.batch_sizes)] if a.batch_sizes else None
    a.formats = split_csv(a.formats) if a.formats else None
    a.ort_levels = split_csv(a.ort_levels)
    a.variants = parse_variants(DEFAULT_VARIANTS if a.variants is None else a.variants,
                                physical_cores(), p)
    return a


def parse_variants(items: list[str], cores: int, p) -> list[tuple[str, str | None, list[str]]]:
    """[(backend, arch or None, overrides)]."""
    out = []
    for item in items:
        if item == "none":
            continue
        head, sep, body = item.partition(":")
        if not sep or not body:
            p.error(f"--variants {item!r}: expected BACKEND[@ARCH]:override[,override]")
        backend, _, arch = head.partition("@")
        out.append((backend, arch or None, split_csv(body.replace("{cores}", str(cores)))))
    return out


# --------------------------------------------------------------------------- orchestration
class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.rows: list[Row] = []
        self.sizes = {arch: input_size_of(arch, a.input_size) for arch in a.archs}

    def batches(self, arch: str) -> list[int]:
        return self.a.batch_sizes or [DEFAULT_BATCH.get(arch_name(arch), 16)]

    def steps(self, arch: str) -> int:
        return self.a.steps or DEFAULT_STEPS.get(arch_name(arch), 8)

    def run(self, what: str, jobs: list[dict], part_of: list[tuple[str, dict]]) -> None:
        """Run ``jobs`` in one child; rows (or an error row per failed job) are collected."""
        if not jobs:
            return
        t0 = time.perf_counter()
        log(f"[bench] {what} ...")
        results = run_jobs(jobs, self.a.timeout)
        for job, result, (part, ident) in zip(jobs, results, part_of):
            if "error" in result:
                log(f"[bench]   {job['task']} failed: {result['error']}")
                self.rows.append(report.error_row(part, job["task"], result["error"], **ident))
            else:
                self.rows += [Row.from_json(r) for r in result["rows"]]
        log(f"[bench]   done in {time.perf_counter() - t0:.0f} s")

    def peak(self, when: str) -> None:
        self.run(f"matmul peak ({when})",
                 [{"task": "peak", "args": {"sizes": self.a.peak_sizes, "reps": self.a.peak_reps,
                                            "warmup": 2, "threads": self.a.threads,
                                            "when": when}}],
                 [("peak", {})])

    def train_args(self, arch: str, backend: str, batch: int) -> dict:
        steps = self.steps(arch)
        size = self.sizes.get(arch) or input_size_of(arch, None)
        return {"arch": arch, "backend": backend, "batch": batch,
                "input_size": size, "steps": steps, "reps": self.a.reps,
                "warmup": self.a.warmup, "warmup_steps": steps if steps > 4 else 2,
                "threads": self.a.threads, "hardware": self.a.hardware}

    def native(self, backend: str) -> None:
        """Everything of ``backend`` that runs at a fixed thread count, in one process: the
        hand-written loops, inference, the input pipeline."""
        a, jobs, ids = self.a, [], []
        if "training" in a.parts:
            for arch in a.archs:
                for batch in self.batches(arch):
                    jobs.append({"task": "train_hand", "args": {
                        **self.train_args(arch, backend, batch),
                        "diagnose_pipeline": arch_name(arch) in OVERHEAD_BOUND}})
                    ids.append(("training", {"arch": arch, "backend": backend, "batch": batch}))
        if "inference" in a.parts:
            for arch in a.archs:
                jobs.append({"task": "inference", "args": {
                    "arch": arch, "backend": backend, "input_size": self.sizes[arch],
                    "batches": a.infer_batches, "reps": a.infer_reps,
                    "min_rep_s": a.min_rep_s, "threads": a.threads,
                    "ort_levels": a.ort_levels}})
                ids.append(("inference", {"arch": arch, "backend": backend}))
        if "data" in a.parts:
            args = self.train_args("lenet5", backend, DEFAULT_BATCH["lenet5"])
            args["reps"] = a.data_reps
            jobs.append({"task": "pipeline", "args": args})
            ids.append(("data", {"backend": backend}))
        self.run(f"{backend}: hand-written / inference / input pipeline "
                 f"({a.threads} threads)", jobs, ids)
        if "training" in a.parts and not a.quick:
            jobs = [{"task": "train_hand", "args": {**self.train_args(arch, backend, batch),
                                                    "threads": None}}
                    for arch in a.archs if arch_name(arch) in OVERHEAD_BOUND
                    for batch in self.batches(arch)]
            self.run(f"{backend}: hand-written at the framework's default threads", jobs,
                     [("training", {"arch": j["args"]["arch"], "backend": backend,
                                    "batch": j["args"]["batch"]}) for j in jobs])

    def product(self, backend: str, arch: str, batch: int, variant: list[str]) -> None:
        args = {**self.train_args(arch, backend, batch), "variant": variant,
                "paired": arch_name(arch) in OVERHEAD_BOUND}
        self.run(f"{backend}: product train() {arch} batch {batch} "
                 f"{' '.join(variant) or 'default'}",
                 [{"task": "train_product", "args": args}],
                 [("training", {"arch": arch, "backend": backend, "batch": batch,
                                "variant": " ".join(variant) or "default"})])

    def main(self) -> None:
        a = self.a
        wants_peak = bool({"peak", "efficiency"} & set(a.parts))
        if wants_peak:
            self.peak("start")
        for backend in a.backends:
            self.native(backend)
            if "training" in a.parts:
                for arch in a.archs:
                    for batch in self.batches(arch):
                        self.product(backend, arch, batch, [])
                        for vb, varch, overrides in a.variants:
                            if vb == backend and varch in (None, arch, arch_name(arch)):
                                self.product(backend, arch, batch, overrides)
            if "data" in a.parts and not ("training" in a.parts and "lenet5" in a.archs):
                self.product(backend, "lenet5", DEFAULT_BATCH["lenet5"], [])
        if wants_peak and "training" in a.parts and not a.quick:
            self.peak("end")
        if "startup" in a.parts:
            self.startup()
        if "data" in a.parts:
            self.run("data formats (Split.take, torch DataLoader)",
                     [{"task": "formats", "args": {"images": a.format_images,
                                                   "reps": a.data_reps,
                                                   "warmup": 0 if a.quick else 1,
                                                   "formats": a.formats}}],
                     [("data", {})])
        self.judge()

    def startup(self) -> None:
        from bench import startup
        log("[bench] start-up: run.py --help, task=summary, first training step ...")
        t0 = time.perf_counter()
        first_arch = self.a.archs[0]
        try:
            self.rows += startup.measure(
                self.a.archs, self.a.backends, self.a.startup_reps, self.a.first_step_reps,
                self.a.startup_warmup, first_arch, self.batches(first_arch)[0],
                self.sizes[first_arch])
        except Exception as err:  # noqa: BLE001
            self.rows.append(report.error_row("startup", "run.py", f"{type(err).__name__}: "
                                                                   f"{err}"))
        log(f"[bench]   done in {time.perf_counter() - t0:.0f} s")

    def judge(self) -> None:
        rows = self.rows
        report.judge_training(rows)
        peaks = [r for r in rows if r.part == "peak" and r.measurement == "fp32 matmul peak"
                 and r.stats is not None]
        if "efficiency" in self.a.parts and peaks:
            best = max(peaks, key=lambda r: r.stats.median)
            flops = {(arch, self.sizes[arch]): flops_per_image(arch, self.sizes[arch])
                     for arch in self.a.archs}
            rows += report.efficiency_rows(rows, best.stats.median,
                                           f"{best.variant}, {best.note}", flops)
        report.judge_inference(rows)
        report.judge_startup(rows)
        report.judge_data(rows)
        order = {p: i for i, p in enumerate(("training", "efficiency", "inference", "startup",
                                              "data", "peak"))}
        rows.sort(key=lambda r: order.get(r.part, 99))  # stable: measurement order kept


NOTES = [
    ("Training: one epoch/repetition is `steps` batches of synthetic images. Product = "
     "`backend.train()` on a config composed with Hydra's compose API (data=synthetic, "
     "optim=sgd lr 0.01 momentum 0.9 wd 5e-4 constant, hardware=cpu, export off); the first "
     "epoch is warm-up, every later epoch one repetition: the wall time between the epoch "
     "lines the product prints (steps, data loading, a one-image validation, the per-epoch "
     "checkpoint and logs). 'extra s/epoch' is what a product epoch costs beyond the "
     "hand-written steps. "
     "Hand-written = the same `backend.build` model, images preprocessed once, an expert's "
     "loop per framework (bench/training.py), all physical cores."),
    ("Compute efficiency = images/s x 3 x the spec's forward FLOPs per image (2 x "
     "multiply-adds) / the best fp32 `torch.mm` GFLOP/s measured in the same run."),
    ("Inference: the product's native predict path vs the product's ONNX export in "
     "onnxruntime (CPU provider, the stated SessionOptions), same images; speed-up = native "
     "latency / onnxruntime latency."),
    "Start-up: `python run.py ...` as subprocesses, wall time from launch.",
    ("Data: each backend's `input_pipeline` iterated for an epoch without training, and the "
     "file formats through `Split.take`/torch DataLoader, next to LeNet-5's product training "
     "rate from the same run."),
    "Every number: untimed warm-up, then repetitions; median, min-max and the count shown.",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    started = dt.datetime.now().astimezone()
    load_before = load_average()
    if load_before is not None and load_before > 0.5 * physical_cores() and not a.quick:
        log(f"[bench] warning: load average {load_before:.2f} on {physical_cores()} cores: "
            "other work is running and the timings will show it")
    t0 = time.perf_counter()
    bench = Bench(a)
    bench.main()
    meta = {"command": "python -m bench " + " ".join(argv), "started": started.isoformat(
        timespec="seconds"), "duration_s": round(time.perf_counter() - t0, 1),
        "load_before": load_before, "load_after": load_average(), "fingerprint": fingerprint(),
        "settings": {k: v for k, v in vars(a).items() if k != "out"}, "notes": NOTES}
    paths = report.write_all(a.out, bench.rows, meta)
    judged = [r for r in bench.rows if r.status]
    for r in judged:
        print(f"{r.status.upper():5} {r.part:10} {r.arch:8} {r.backend:6} {r.measurement} "
              f"[{r.variant}] {report._measured(r)} {r.target} {r.note if r.status == 'error' else ''}")
    print(f"wrote {', '.join(str(p) for p in paths.values())} "
          f"({meta['duration_s']:.0f} s)")
    return 1 if any(r.status == "error" for r in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
