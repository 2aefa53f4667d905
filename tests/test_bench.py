"""The benchmark harness (``python -m bench``): its options, its verdicts and, end to end, a
``--quick`` run of LeNet-5 on every backend as a real subprocess. Only the shape and sanity of
the results are asserted, never a timing: the numbers depend on the machine."""
from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))  # bench/ is a folder of the checkout, not an installed package
from bench import accuracy, report
from bench.__main__ import PARTS, parse_args
from bench.common import SAME_PROCESS, Row, Stats

BACKENDS = ("torch", "keras", "mxnet")
ROW_COLUMNS = ["part", "measurement", "arch", "backend", "variant", "input_size", "batch",
               "threads", "metric", "unit", "median", "min", "max", "spread_pct", "reps",
               "warmup", "baseline", "ratio", "target", "status", "note"]
FINGERPRINT_COLUMNS = ["cpu", "physical_cores", "logical_cpus", "gpu", "os", "python", "torch",
                       "pytorch_lightning", "tensorflow", "keras", "mxnet", "onnx",
                       "onnxruntime", "numpy", "hydra", "git_commit"]


# --------------------------------------------------------------------------- fast
def test_quick_preset_and_explicit_options():
    a = parse_args(["--quick"])
    assert a.archs == ["lenet5"] and a.reps == 2 and a.steps == 8 and a.variants == []
    assert a.infer_batches == [1, 8] and a.parts == list(PARTS)
    a = parse_args(["--quick", "--reps", "4", "--archs", "lenet5,resnet50",
                    "--variants", "torch:backend.channels_last=true",
                    "mxnet@lenet5:hardware.threads={cores},backend.static_shape=false"])
    assert a.reps == 4 and a.archs == ["lenet5", "resnet50"]
    assert a.variants[0] == ("torch", None, ["backend.channels_last=true"])
    backend, arch, overrides = a.variants[1]
    assert (backend, arch) == ("mxnet", "lenet5") and overrides[1] == "backend.static_shape=false"
    assert overrides[0].startswith("hardware.threads=") and "{" not in overrides[0]
    full = parse_args([])
    assert full.archs == ["lenet5", "resnet50"] and full.steps is None and full.variants
    with pytest.raises(SystemExit):
        parse_args(["--parts", "training,nonsense"])


def _train(measurement, backend, median, arch="lenet5", size=32, batch=32, variant="default"):
    return Row("training", measurement, "throughput", "images/s",
               Stats(median, median * 0.9, median * 1.1, 3), arch=arch, backend=backend,
               input_size=size, batch=batch, variant=variant)


def test_verdicts_compare_product_with_the_fastest_hand_written_loop():
    rows = [_train("hand-written: plain loop, NCHW", "torch", 100.0),
            _train("hand-written: plain loop, channels_last", "torch", 200.0),
            _train("product: backend.train()", "torch", 195.0),
            _train("product: backend.train()", "torch", 150.0, variant="x=1"),
            _train("hand-written: tf.function step", "keras", 10.0, "resnet50", 224, 16),
            _train("product: backend.train()", "keras", 9.0, "resnet50", 224, 16),
            _train("product: backend.train()", "mxnet", 9.0, "resnet50", 224, 16)]  # no baseline
    report.judge_training(rows)
    assert [r.status for r in rows[2:]] == ["pass", "gap", "", "gap", ""]
    assert rows[2].ratio == pytest.approx(0.975) and "channels_last" in rows[2].baseline
    # efficiency: 9 images/s x 3 x 4.1 GFLOP = 110.7 GFLOP/s of a 140 GFLOP/s peak = 79%
    eff = report.efficiency_rows(rows, 140.0, "peak", {("resnet50", 224): 4_100_000_000})
    keras = next(r for r in eff if r.backend == "keras" and r.measurement.startswith("product"))
    assert keras.stats.median == pytest.approx(9 * 3 * 4.1 / 140) and keras.status == "pass"
    assert keras.target == ">= 75% of peak"
    # the data pipeline against the LeNet-5 product rate of its backend
    pipe = Row("data", "torch input_pipeline", "throughput", "images/s",
               Stats(900.0, 800.0, 1000.0, 3), backend="torch")
    report.judge_data(rows + [pipe])
    assert pipe.status == "gap" and pipe.ratio == pytest.approx(900 / 195)


def test_a_product_row_is_judged_against_the_hand_written_loop_of_its_own_process():
    """LeNet-5's rates move by about 20% between processes: where the product's process also
    timed the hand-written loop, that loop (same variant) is the baseline, not the fastest
    loop of another process; a variant without one falls back to the fastest."""
    rows = [_train("hand-written: plain loop, channels_last", "torch", 200.0),
            _train("product: backend.train()", "torch", 150.0),
            _train(SAME_PROCESS, "torch", 155.0),
            _train("product: backend.train()", "torch", 150.0, variant="x=1"),
            _train(SAME_PROCESS, "torch", 300.0, variant="y=1")]  # another variant's
    report.judge_training(rows)
    assert rows[1].ratio == pytest.approx(150 / 155) and rows[1].status == "pass"
    assert rows[1].baseline.startswith(SAME_PROCESS)
    assert rows[3].ratio == pytest.approx(0.75) and rows[3].status == "gap"
    assert rows[2].status == rows[4].status == ""  # baselines are not judged


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--archs", "lenet5",
                           "--backends", ",".join(BACKENDS), "--out", str(out)],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return proc, out


def _positive(value: str) -> float:
    v = float(value)
    assert v > 0 and math.isfinite(v)
    return v


@pytest.mark.slow
def test_quick_run_writes_csv_json_and_markdown(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "results.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ROW_COLUMNS + FINGERPRINT_COLUMNS
        rows = list(reader)
    assert rows and not [r for r in rows if r["status"] == "error"]
    for r in rows:  # every row carries the machine it ran on
        assert r["cpu"] and int(r["physical_cores"]) >= 1 and int(r["logical_cpus"]) >= 1
        assert r["gpu"] and r["python"].startswith("3.") and r["torch"] and r["onnxruntime"]
        lo, mid, hi = _positive(r["min"]), _positive(r["median"]), _positive(r["max"])
        assert lo <= mid <= hi and int(r["reps"]) >= 1
        assert r["status"] in ("", "pass", "gap")
        assert (r["status"] != "") == (r["target"] != "")

    def find(part, backend=None, prefix=""):
        return [r for r in rows if r["part"] == part and r["measurement"].startswith(prefix)
                and (backend is None or r["backend"] == backend)]

    for b in BACKENDS:
        product = find("training", b, "product")
        assert len(product) == 1 and product[0]["arch"] == "lenet5"
        assert product[0]["input_size"] == "32" and product[0]["batch"] == "32"
        assert product[0]["target"] and _positive(product[0]["ratio"])
        assert find("training", b, "hand-written")
        paired = [r for r in find("training", b) if r["measurement"] == SAME_PROCESS]
        assert len(paired) == 1 and product[0]["baseline"].startswith(SAME_PROCESS)
        assert find("efficiency", b, "product")[0]["unit"] == "fraction"
        native = find("inference", b, "native")
        ort = find("inference", b, "onnxruntime")
        assert {r["batch"] for r in native} == {r["batch"] for r in ort} == {"1", "8"}
        assert all(_positive(r["ratio"]) for r in ort if r["metric"] == "latency")
        assert len(find("startup", b, f"python run.py backend={b}: time to first")) == 1
        pipe = find("data", b)
        assert len(pipe) == 1 and pipe[0]["status"] in ("pass", "gap")
    assert find("startup", prefix="python run.py --help")[0]["target"] == "< 1 s"
    assert find("startup", prefix="python run.py task=summary arch=lenet5")
    assert find("peak", prefix="fp32 matmul peak")
    assert find("data", prefix="npz") and find("data", prefix="digits")


@pytest.mark.slow
def test_quick_run_json_and_markdown_agree_with_the_csv(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["command"].startswith("python -m bench --quick")
    assert set(FINGERPRINT_COLUMNS) <= set(data["fingerprint"])
    with (out / "results.csv").open(newline="") as f:
        assert len(data["rows"]) == len(list(csv.DictReader(f)))
    assert data["targets"] and {t["status"] for t in data["targets"]} <= {"pass", "gap"}
    product = [r for r in data["rows"]
               if r["part"] == "training" and r["measurement"].startswith("product")]
    assert len(product) == len(BACKENDS)
    assert all(r["extra"]["reported_images_per_s"] > 0 for r in product)
    md = (out / "results.md").read_text()
    for heading in ("## Targets", "## Training throughput", "## Compute efficiency",
                    "## Inference", "## Start-up", "## Data pipeline",
                    "## fp32 matrix-multiply peak"):
        assert heading in md
    assert all(f"| {b} |" in md for b in BACKENDS)
    assert data["fingerprint"]["cpu"] in md


# --------------------------------------------------------------------------- the GPU check
@pytest.mark.slow
def test_gpu_check_runs_every_part_in_cpu_mode(tmp_path):
    """``python -m bench.gpu --device cpu``: the GPU command's own code paths (peak, default
    job with its ONNX verification, SIGKILL resume, LeNet-5's per-step costs, ResNet-50
    product vs hand-written loop in bf16-mixed) with tiny sizes, as a real subprocess."""
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "gpu.csv").open()))
    assert [r["check"] for r in rows] == ["peak", "default job", "resume"] + ["lenet5"] * 5 \
        + ["resnet50"] * 3
    assert all(r["passed"] == "True" for r in rows)
    assert "resumed from epoch 1" in rows[2]["note"]
    assert "ONNX on the CPU: max abs diff" in rows[1]["note"]
    what = {(r["check"], r["what"]): r for r in rows}
    assert set(what) >= {("lenet5", "minimal Lightning Trainer.fit"),
                         ("lenet5", "minimal Lightning Fabric loop"),
                         ("resnet50", "product (backend.train), backend.num_workers=0")}
    for r in rows[3:]:
        assert float(r["value"]) > 0
        assert r["what"].startswith("product") == ("product / hand-written" in r["note"])
    assert (tmp_path / "gpu.md").read_text().startswith("# GPU check: ")


# --------------------------------------------------------------------------- the loop floor
def test_loop_floor_times_every_loop_against_the_hand_written_one():
    """``python -m bench.loop_floor`` at tiny sizes: one row per loop, the hand-written one
    the 1.000x reference, every rate positive."""
    proc = subprocess.run([sys.executable, "-m", "bench.loop_floor", "--rounds", "2",
                           "--steps", "3", "--batch", "4"], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| loop")]
    assert [r[0].strip() for r in rows] == [
        "hand-written (preloaded, channels-last)", "minimal Fabric loop (preloaded)",
        "product step + epoch sums (preloaded)",
        "product step + epoch sums (product input_pipeline)"]
    assert rows[0][2].strip() == "1.000x"
    assert all(_positive(r[1].strip().replace(",", "")) for r in rows)
    assert all(_positive(r[2].strip().rstrip("x")) for r in rows)


# --------------------------------------------------------------------------- the accuracy table
@pytest.mark.parametrize("argv, says", [
    (["--archs", "lenet5,nonet"], "unknown architecture 'nonet'"),
    (["--backends", "torch,caffe"], "unknown backend 'caffe'"),
    (["--epochs", "0"], "--epochs 0"), (["--target", "0"], "--target 0"),
    (["--target", "1.5"], "--target 1.5"), (["--extra", "optim=nonsense"], "optim/nonsense"),
    (["--readme", "{no_markers}"], "<!-- accuracy-table:start -->")])
def test_accuracy_bad_input_is_one_line_and_exit_2(argv, says, tmp_path, capsys):
    (tmp_path / "README.md").write_text("# no markers here\n")
    argv = [a.format(no_markers=tmp_path / "README.md") for a in argv]
    with pytest.raises(SystemExit) as exit_:
        accuracy.main(["--archs", "lenet5", "--out", str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not (tmp_path / "out").exists()


def _fake_run(run_dir, val_accs, optim=None):
    """A finished run directory as run.py leaves it (only what the table reads)."""
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text("epoch,val_acc\n" + "".join(
        f"{e},{v}\n" for e, v in enumerate(val_accs, 1)))
    (run_dir / "config.yaml").write_text("optim:\n  name: sgd\n  lr: 0.1\n  scheduler: cosine\n")
    (run_dir / "results.json").write_text(json.dumps(
        {"status": "ok", "input_shape": [3, 32, 32], **({"optim": optim} if optim else {})}))


def test_accuracy_rows_mark_runs_below_the_target_and_the_spread_across_backends(tmp_path):
    _fake_run(tmp_path / "t", [0.5, 0.93, 0.91])
    _fake_run(tmp_path / "k", [0.4, 0.7, 0.8], optim={"lr": 0.025, "warmup_epochs": 2,
                                                           "label_smoothing": 0.1,
                                                           "clip_grad_norm": 2.0})
    rows = [accuracy.row("resnet50", "torch", tmp_path / "t", 0.9, None),
            accuracy.row("resnet50", "keras", tmp_path / "k", 0.9, None)]
    accuracy.add_spread(rows)
    torch_, keras = rows
    assert (torch_["best_val_acc"], torch_["best_epoch"], torch_["first_epoch_at_target"],
            torch_["final_val_acc"], torch_["epochs"]) == (0.93, 2, 2, 0.91, 3)
    assert keras["below_target"] and keras["first_epoch_at_target"] is None
    assert keras["optim"]["lr"] == 0.025 and keras["optim"]["lr_source"] == "results.json"
    assert torch_["optim"]["lr"] == 0.1 and torch_["optim"]["lr_source"] == "config.yaml"
    assert torch_["backend_spread"] == keras["backend_spread"] == pytest.approx(0.13)
    md = accuracy.table(rows, {"target": 0.9, "epochs": 3, "extra": [], "command": "c",
                               "started": "2026-01-01T00:00:00", "fingerprint": {
                                   "cpu": "CPU X", "physical_cores": 2, "git_commit": "abc"}})
    lines = md.splitlines()
    assert "| resnet50 | torch | 32 | 3 | 0.9300 (2) | 2 | 0.9100 | sgd 0.1, cosine |" in md
    keras_line = next(ln for ln in lines if "| keras |" in ln)
    assert "**0.8000** (3), below 0.90" in keras_line
    assert "| sgd 0.025, warmup 2 ep, cosine, smoothing 0.1, clip 2 |" in keras_line
    assert "| 0.1300 |" in keras_line and lines[0].startswith("Measured on CPU X")


def test_accuracy_tables_finished_runs_of_earlier_parts_with_the_same_settings(tmp_path):
    """A bench run in parts builds one table: finished runs of the same settings in --out join
    the rows (in the plan's order); runs of other settings do not."""
    args = accuracy.parse_args(["--archs", "resnet50", "--backends", "torch", "--epochs", "3",
                                "--out", str(tmp_path)])
    for arch, backend, epochs in (("lenet5", "mxnet", 3), ("vgg16", "torch", 3),
                                  ("alexnet", "torch", 5)):
        _fake_run(tmp_path / f"{arch}-{backend}", [0.5, 0.9, 0.95])
        results = tmp_path / f"{arch}-{backend}" / "results.json"
        results.write_text(json.dumps({**json.loads(results.read_text()), "overrides":
                                       accuracy.overrides(arch, backend, epochs, [])}))
    _fake_run(tmp_path / "resnet50-torch", [0.9])
    rows = accuracy.with_other_finished_runs(
        args, [accuracy.row("resnet50", "torch", tmp_path / "resnet50-torch", 0.9, None)])
    assert [(r["arch"], r["backend"]) for r in rows] == [
        ("lenet5", "mxnet"), ("resnet50", "torch"), ("vgg16", "torch")]  # list_archs' order


@pytest.fixture(scope="module")
def accuracy_run(tmp_path_factory):
    """``python -m bench.accuracy`` on LeNet-5, torch, one epoch, as a user runs it."""
    out = tmp_path_factory.mktemp("accuracy") / "out"
    argv = [sys.executable, "-m", "bench.accuracy", "--archs", "lenet5", "--backends", "torch",
            "--epochs", "1", "--out", str(out)]

    def run(*more):
        return subprocess.run([*argv, *more], check=False, cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
    return run, run(), out


@pytest.mark.slow
def test_accuracy_trains_reports_and_does_not_train_a_finished_run_again(accuracy_run):
    run, first, out = accuracy_run
    assert first.returncode == 0, first.stderr[-3000:]
    data = json.loads((out / "accuracy.json").read_text())
    (row,) = data["rows"]
    with (out / "lenet5-torch" / "metrics.csv").open(newline="") as f:
        val_acc = [float(r["val_acc"]) for r in csv.DictReader(f)]
    assert len(val_acc) == 1 and 0 <= val_acc[0] <= 1
    assert (row["arch"], row["backend"], row["input_size"], row["epochs"]) == ("lenet5", "torch",
                                                                               32, 1)
    assert row["best_val_acc"] == row["final_val_acc"] == val_acc[0] and row["status"] == "ok"
    assert row["optim"]["name"] == "adam" and row["optim"]["lr"] == 0.001 and row["wall_s"] > 0
    assert data["cpu"] and data["commit"] and "--epochs 1" in data["command"]
    md = (out / "accuracy.md").read_text()
    assert "| lenet5 | torch | 32 | 1 |" in md and f"{val_acc[0]:.4f}" in md and data["cpu"] in md
    results = out / "lenet5-torch" / "results.json"
    mtime, t0 = results.stat().st_mtime_ns, time.perf_counter()
    again = run()
    assert again.returncode == 0 and "done already" in again.stderr, again.stderr[-3000:]
    assert results.stat().st_mtime_ns == mtime and time.perf_counter() - t0 < 30
    assert json.loads((out / "accuracy.json").read_text())["rows"][0]["best_val_acc"] == val_acc[0]


@pytest.mark.slow
def test_accuracy_readme_rewrites_only_what_lies_between_the_markers(accuracy_run, tmp_path):
    run, first, out = accuracy_run
    assert first.returncode == 0, first.stderr[-3000:]
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)  # the real README carries the markers
    start, end = accuracy.MARKERS
    before = readme.read_text()
    proc = run("--readme", str(readme))
    assert proc.returncode == 0 and "done already" in proc.stderr, proc.stderr[-3000:]
    after = readme.read_text()
    assert after.split(start)[0] == before.split(start)[0]
    assert after.split(end)[1] == before.split(end)[1]
    block = after.split(start)[1].split(end)[0]
    assert block.strip() == (out / "accuracy.md").read_text().split("\n", 2)[2].strip()
    assert "| lenet5 | torch | 32 | 1 |" in block and "Not measured yet" not in block
