"""``task=verify``: one set of weights, every backend, native and ONNX, compared pair by pair.

    python run.py task=verify                                  # arch (LeNet-5) in every backend
    python run.py task=verify arch=xception arch.input_size=32
    python run.py task=verify verify.archs=all verify.input_size=32   # the 11 x 3 matrix

For each architecture: build it in every backend of ``verify.backends``, load the same weights
into each (``verify.weights``, a neutral .npz of ``cnnzoo.core.weights``, or the reference
backend's seeded initialisation with every batch-norm vector randomised from the seed, so that
batch norm's four arrays are really exercised), run the same preprocessed validation images
through each native model in inference mode and through each backend's own ONNX export in
onnxruntime, and compare:

- every native model with the reference backend's native model;
- every ONNX model with its own native model (``export.export_and_verify``, the export stage
  of training, at ``export.batch_sizes``), in every runtime of ``export.runtimes``;
- with ``export.caffe=true``, Caffe's deploy files written from the shared weights, run in
  OpenCV's DNN module, with the reference's native model;
- every native parameter count with the spec's.

A pair passes under the export rule (``export.check.compare``): |a - b| <= atol + rtol * |b|
elementwise, no NaN/Inf, and top-1 agreement >= ``verify.min_top1_agreement``.
``verification.json`` and ``verification.md`` (one row per architecture x backend) are written
after each architecture, so a long matrix keeps what it has done; the run exits with code 1
when any pair fails.

``verify.archs`` null checks ``arch`` as configured (``arch.input_size``, its channels and
options). A list (or ``all``) checks each architecture with its defaults (canonical channels
and options, ``arch.num_classes``). ``verify.input_size`` replaces the input size, raised to
each architecture's minimum where that is larger.
"""
from __future__ import annotations

import gc
import tempfile
import time
import traceback
from dataclasses import asdict
from importlib import resources
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

import architectures

from ..core.backend import backend_info, usable_backends
from ..core.errors import ConfigError, RunFailed, WeightsError
from ..core.rundir import SCHEMA_VERSION, atomic_write_bytes, package_versions, write_json
from .experiment import make_backend, prepare, spec_of


# --------------------------------------------------------------------------- configuration
def arch_names(cfg: DictConfig) -> list[str] | None:
    """The canonical names of ``verify.archs``: ``all``, one name or a list (None: the
    configured ``arch`` alone)."""
    archs = cfg.verify.archs
    if archs is None:
        return None
    names = (architectures.list_archs() if archs == "all" else
             [archs] if isinstance(archs, str) else list(archs))
    return list(dict.fromkeys(architectures.arch_info(n).name for n in names))


def input_size_for(spec, configured: int, override: int | None) -> int:
    """``override`` (raised to the spec's minimum input) or the configured size."""
    return configured if override is None else max(int(override), spec.min_input_size())


def arch_config(cfg: DictConfig, name: str | None) -> DictConfig:
    """``cfg`` with the ``arch`` node of one architecture at its verification input size."""
    out = cfg.copy()
    with open_dict(out):
        if name is not None:  # an architecture of the list: its defaults
            info = architectures.arch_info(name)
            # arch.train (optim=paper's recipe) stays: inference never reads it
            out.arch.update(name=info.name, input_size=info.input_size,
                            in_channels=info.in_channels, options={})
        out.arch.input_size = input_size_for(spec_of(out), out.arch.input_size,
                                             cfg.verify.input_size)
    return out


def backend_config(cfg: DictConfig, name: str) -> DictConfig:
    """``cfg`` with the ``backend`` node of backend ``name``: the configured one when it is the
    chosen backend (command-line settings kept), else its ``conf/backend/<name>.yaml`` through
    Hydra or, outside a Hydra app, from the backend's own package."""
    if cfg.backend.name == name:
        return cfg
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    try:
        if GlobalHydra.instance().is_initialized():
            node = compose(config_name="config", overrides=[f"backend={name}"]).backend
        else:  # the file the backend's package ships (BackendInfo.conf)
            conf = backend_info(name).conf
            if conf is None:
                raise FileNotFoundError(name)
            node = OmegaConf.load(resources.files(conf) / "backend" / f"{name}.yaml")
    except (MissingConfigException, FileNotFoundError):
        raise ConfigError(f"verify.backends: backend '{name}' has no conf/backend/{name}.yaml "
                          "on the config search path") from None
    out = cfg.copy()
    with open_dict(out):
        out.backend = node
    return out


def shared_weights(cfg: DictConfig, spec, input_size: int) -> dict | None:
    """The user's ``verify.weights``, checked against the spec (None: seeded init): a zoo
    model or a weights file (``cnnzoo.core.zoo``), or a Caffe model (its ``.prototxt`` and the
    ``.caffemodel`` of the same name)."""
    from ..core.zoo.load import import_weights

    if cfg.verify.weights is None:
        return None
    path = Path(cfg.verify.weights)
    try:
        if path.suffix in (".prototxt", ".caffemodel"):  # a Caffe model: the pair, same name
            from export.caffe.reader import caffe_weights
            prototxt = path.with_suffix(".prototxt")
            return caffe_weights(prototxt, prototxt.with_suffix(".caffemodel"), spec, input_size)
        imported = import_weights(cfg.verify.weights, spec, input_size,
                                  options=cfg.arch.get("options") or {})
        if imported.reinitialised:
            raise WeightsError(f"their classifier has another class count than the model's "
                               f"{spec.num_classes}: set arch.num_classes to theirs")
    except WeightsError as err:
        raise ConfigError(f"verify.weights={cfg.verify.weights}: {err} ({spec.name} at "
                          f"input_size {input_size}, {spec.num_classes} classes)") from None
    return imported.weights


def randomize_batch_norm(weights: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A fresh model's batch norms are the identity (mean 0, var 1, gamma 1, beta 0), which
    hides swapped or missing statistics: give all four vectors seeded non-trivial values."""
    rng = np.random.default_rng([seed, 0xB4])
    draws = {"weight": lambda n: rng.uniform(0.5, 1.5, n), "bias": lambda n: rng.normal(0, 0.1, n),
             "running_mean": lambda n: rng.normal(0, 0.1, n),
             "running_var": lambda n: rng.uniform(0.5, 1.5, n)}
    out = dict(weights)
    for key, value in weights.items():
        node, param = key.rsplit("/", 1)
        if f"{node}/running_var" in weights:  # a batch-norm node
            out[key] = draws[param](value.shape).astype(np.float32)
    return out


# --------------------------------------------------------------------------- one architecture
def _pair(a: np.ndarray, b: np.ndarray, vc) -> dict:
    """``a`` against the reference outputs ``b``: the export verification's diffs and verdict."""
    from export.check import Report, compare

    comparison = compare(a, b, len(b), vc.atol, vc.rtol)
    report = Report(vc.atol, vc.rtol, vc.min_top1_agreement, "native", batches=[comparison])
    return {**asdict(comparison), "passed": report.passed}


def _node_outputs(backend, model, images) -> dict | str:
    """Every node's output, or why the backend cannot give them."""
    try:
        return backend.node_outputs(model, images)
    except NotImplementedError as err:
        return str(err)


def _layer_report(backend, model, images, reference_nodes, spec, vc) -> dict:
    """``verify.layers``: this backend's node outputs against the reference's, node by node
    (export.layer_report): the first that differs, and the tolerance that would pass it."""
    from export.layer_report import compare_layers

    mine = _node_outputs(backend, model, images)
    missing = next((x for x in (reference_nodes, mine) if isinstance(x, str)), None)
    if missing:
        return {"error": missing, "line": f"layer report: {missing}"}
    report = compare_layers(mine, reference_nodes, [n.name for n in spec.nodes], vc.atol,
                            vc.rtol)
    line = report.line(backend.name, vc.reference)
    print(f"    {line}", flush=True)
    return {**report.as_dict(), "line": line}


def verify_arch(cfg: DictConfig, run_dir: Path, onnx_dir: Path, name: str | None) -> list[dict]:
    """One row per backend for one architecture (``name``; None: the configured arch)."""
    from export import export_and_verify, export_caffe

    vc = cfg.verify
    acfg = arch_config(cfg, name)
    exp = prepare(acfg)
    spec, analysis, size = exp.spec, exp.analysis, acfg.arch.input_size
    images, _ = exp.val_split.batch(0, min(vc.num_images, len(exp.val_split)))
    weights = shared_weights(acfg, spec, size)
    source = vc.weights or (f"{vc.reference} seeded init (seed {cfg.seed}), batch-norm "
                            "vectors randomised")
    print(f"{spec.name} at {size}x{size}: {len(images)} {cfg.data.name} images, "
          f"weights: {source}", flush=True)
    order = [vc.reference, *(b for b in vc.backends if b != vc.reference)]
    export_cfg = OmegaConf.create({"opset": cfg.export.opset, "verify": True,
                                   "batch_sizes": list(cfg.export.batch_sizes),
                                   "runtimes": list(cfg.export.runtimes),
                                   "atol": vc.atol, "rtol": vc.rtol,
                                   "min_top1_agreement": vc.min_top1_agreement})
    metadata = exp.export_metadata(vc.reference, package_versions())
    rows, reference, reference_nodes = [], None, None
    for backend_name in order:
        t0 = time.perf_counter()
        row = {"arch": spec.name, "input_size": size, "backend": backend_name,
               "reference": backend_name == vc.reference, "spec_params": analysis.params,
               "native_params": None, "native_vs_reference": None, "onnx_vs_native": None,
               "caffe_vs_native": None, "layers_vs_reference": None,
               "opset": None, "max_abs_logit": None, "error": None}
        try:
            bcfg = backend_config(acfg, backend_name)
            backend = make_backend(bcfg, run_dir)
            model = backend.build(spec, size)
            row["native_params"] = backend.count_params(model)
            if weights is None:  # the reference comes first: its init is everyone's weights
                # (should it fail, the next backend's init stands in; its rows fail anyway)
                weights = randomize_batch_norm(backend.get_weights(model), cfg.seed)
            backend.set_weights(model, weights)
            native = backend.predict(model, images)
            row["max_abs_logit"] = float(np.abs(native).max())
            if backend_name == vc.reference:
                reference = native
                reference_nodes = _node_outputs(backend, model, images) if vc.layers else None
            elif reference is not None:
                row["native_vs_reference"] = _pair(native, reference, vc)
                if reference_nodes is not None:
                    row["layers_vs_reference"] = _layer_report(
                        backend, model, images, reference_nodes, spec, vc)
            out = onnx_dir / f"{spec.name}-{backend_name}.onnx"
            block, _ = export_and_verify(backend, model, images, export_cfg, out,
                                         {**metadata, "backend": backend_name},
                                         cfg.hardware.threads)
            row["onnx_vs_native"] = block
            row["opset"] = block["opset"]
            if cfg.export.caffe and backend_name == vc.reference:  # the weights are everyone's
                caffe_dir = onnx_dir / f"{spec.name}-caffe"
                caffe_dir.mkdir(exist_ok=True)
                row["caffe_vs_native"], _ = export_caffe(
                    spec, size, weights, images, lambda x: backend.predict(model, x), export_cfg,
                    caffe_dir, {**metadata, "backend": backend_name}, cfg.hardware.threads)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001  one broken cell must not hide the others
            traceback.print_exc()
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        finally:
            backend = model = None
            gc.collect()  # the next backend's model (VGG: 0.5 GB each) takes its place
        row["passed"] = _row_passed(row)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        print("  " + _row_line(row), flush=True)
        rows.append(row)
    return rows


def _row_passed(row: dict) -> bool:
    onnx, caffe = row["onnx_vs_native"], row["caffe_vs_native"]
    return (row["error"] is None and row["native_params"] == row["spec_params"]
            and (row["reference"] or bool(row["native_vs_reference"]
                                          and row["native_vs_reference"]["passed"]))
            and bool(onnx and onnx["passed"]) and (caffe is None or caffe["passed"]))


def _row_line(row: dict) -> str:
    native = row["native_vs_reference"]
    onnx = row["onnx_vs_native"]
    parts = [f"{row['backend']:<7}", f"params {row['native_params'] or 0:,}"]
    if native:
        parts.append(f"native vs reference max abs {native['max_abs_diff']:.2e}")
    if onnx:
        parts.append(f"ONNX vs native max abs {_num(onnx['max_abs_diff'])} (opset {row['opset']}, "
                     f"{', '.join(onnx.get('runtimes', {}))})")
    if row["caffe_vs_native"]:
        parts.append(f"Caffe (OpenCV) vs native max abs "
                     f"{_num(row['caffe_vs_native']['max_abs_diff'])}")
    if row["error"]:
        parts.append(row["error"])
    return "  ".join(parts) + f"  {'passed' if row['passed'] else 'FAILED'} ({row['seconds']} s)"


# --------------------------------------------------------------------------- reports
def failures(rows: list[dict], reference: str) -> list[str]:
    """One line per failing architecture x backend, naming the failing pair(s) and why."""
    lines = []
    for r in rows:
        if r["passed"]:
            continue
        what = f"{r['arch']} {r['backend']}"
        if r["error"]:
            lines.append(f"{what}: {r['error']}")
            continue
        if r["native_params"] != r["spec_params"]:
            lines.append(f"{what}: {r['native_params']:,} native parameters, the spec has "
                         f"{r['spec_params']:,}")
        native, onnx, caffe = r["native_vs_reference"], r["onnx_vs_native"], r["caffe_vs_native"]
        if native is None and not r["reference"]:
            lines.append(f"{what}: no native comparison: the {reference} reference failed")
        if native and not native["passed"]:
            layers = r.get("layers_vs_reference")
            lines.append(f"{what}: native vs {reference} native: {_why(native)}"
                         + (f"; {layers['line']}" if layers else ""))
        for fmt, block in (("ONNX", onnx), ("Caffe", caffe)):
            for name, runtime in (block or {}).get("runtimes", {}).items():
                if not runtime["passed"]:
                    lines.append(f"{what}: {fmt} in {name} vs {r['backend']} native: "
                                 + (runtime["error"] or _why({**runtime, **_rule(block)})))
    return lines


def _num(v) -> str:
    return "—" if v is None else f"{v:.2e}"


def _rule(block: dict) -> dict:
    return {k: block[k] for k in ("atol", "rtol") if k in block}


def _why(p: dict) -> str:
    return (f"max abs diff {p['max_abs_diff']:.3g}, max rel diff {p['max_rel_diff']:.3g}, "
            f"top-1 agreement {p['top1_agreement']:.3f}"
            + (", NaN/Inf in the outputs" if p.get("non_finite") or any(
                b["non_finite"] for b in p.get("batches", [])) else "")
            + (f" (atol {p['atol']:g}, rtol {p['rtol']:g})" if "atol" in p else ""))


def markdown_table(rows: list[dict], reference: str) -> list[str]:
    """The matrix: one row per architecture x backend, one column per runtime."""
    def num(v):
        return "—" if v is None else f"{v:.1e}"

    def diffs(p):
        if p is None:
            return "—"
        if p.get("error") or p["max_abs_diff"] is None:
            return "error"
        return f"{p['max_abs_diff']:.1e} / {p['max_rel_diff']:.1e}"

    runtimes = list(dict.fromkeys(n for r in rows for n in (r["onnx_vs_native"] or {}).get(
        "runtimes", {})))
    caffe = any(r["caffe_vs_native"] for r in rows)
    head = ("architecture", "input", "backend", "params (spec)", "params (native)",
            f"native vs {reference} (max abs / rel diff)",
            *(f"ONNX in {n} vs native" for n in runtimes),
            *(["Caffe in opencv vs native"] if caffe else []),
            f"top-1 agreement (vs {reference} / exports)", "max \\|logit\\|", "opset", "result")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        native, onnx = r["native_vs_reference"], r["onnx_vs_native"] or {}
        exports = [onnx.get("runtimes", {}).get(n) for n in runtimes]
        exports += [(r["caffe_vs_native"] or {}).get("runtimes", {}).get("opencv")] if caffe else []
        worst = [p["top1_agreement"] for p in exports if p and p["top1_agreement"] is not None]
        top1 = (("—" if native is None else f"{native['top1_agreement']:.3f}") + " / "
                + (f"{min(worst):.3f}" if worst else "—"))
        cells = (r["arch"], str(r["input_size"]), r["backend"], f"{r['spec_params']:,}",
                 "—" if r["native_params"] is None else f"{r['native_params']:,}",
                 "reference" if r["reference"] else diffs(native), *map(diffs, exports), top1,
                 num(r["max_abs_logit"]),
                 str(r["opset"] or "—"), "pass" if r["passed"] else "**FAIL**")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_reports(run_dir: Path, cfg: DictConfig, rows: list[dict], seconds: float) -> dict:
    """verification.json and verification.md in the run directory; returns the json."""
    vc = cfg.verify
    failed = failures(rows, vc.reference)
    report = {"schema_version": SCHEMA_VERSION, "task": "verify", "passed": not failed,
              "reference": vc.reference, "backends": list(vc.backends),
              "weights": vc.weights or f"{vc.reference} seeded init, batch norm randomised",
              "seed": cfg.seed, "data": cfg.data.name, "num_images": vc.num_images,
              "atol": vc.atol, "rtol": vc.rtol, "min_top1_agreement": vc.min_top1_agreement,
              "export_batch_sizes": list(cfg.export.batch_sizes), "total_s": round(seconds, 1),
              "failures": failed, "rows": rows, "versions": package_versions()}
    write_json(run_dir / "verification.json", report)
    md = [f"# Cross-framework verification: {len({r['arch'] for r in rows})} architecture(s) x "
          f"{len(vc.backends)} backend(s), reference {vc.reference}", "",
          f"Weights: {report['weights']}. Inputs: {vc.num_images} {cfg.data.name} validation "
          f"images. Pass: |a - b| <= {vc.atol:g} + {vc.rtol:g} |b| elementwise, no NaN/Inf, "
          f"top-1 agreement >= {vc.min_top1_agreement:g}, native parameters = spec. "
          f"{seconds:.0f} s.", "", *markdown_table(rows, vc.reference), ""]
    md += [f"**{len(failed)} failure(s):**", "", *(f"- {line}" for line in failed), ""] \
        if failed else ["All pairs passed.", ""]
    atomic_write_bytes(run_dir / "verification.md", "\n".join(md).encode())
    return report


# --------------------------------------------------------------------------- the task
def verify_task(cfg: DictConfig, run_dir: Path) -> float:
    """Run the verification; raise RunFailed naming every failing pair. Returns the fraction
    of architecture x backend rows that passed."""

    t0 = time.perf_counter()
    if cfg.verify.backends is None:  # every backend whose framework is installed
        with open_dict(cfg):
            cfg.verify.backends = usable_backends()
    names = arch_names(cfg)
    rows: list[dict] = []
    keep = cfg.verify.keep_onnx
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".verify-") as tmp:
        onnx_dir = run_dir if keep else Path(tmp)
        for name in names or [None]:
            rows += verify_arch(cfg, run_dir, onnx_dir, name)
            report = write_reports(run_dir, cfg, rows, time.perf_counter() - t0)
    print("\n".join(markdown_table(rows, cfg.verify.reference)))
    passed = sum(r["passed"] for r in rows)
    status = "ok" if report["passed"] else "verification_failed"
    # results.json as every run writes it, so sweeps (-m arch=a,b) summarise verify runs too
    write_json(run_dir / "results.json", {
        "schema_version": SCHEMA_VERSION, "task": "verify", "status": status,
        "arch": ",".join(dict.fromkeys(r["arch"] for r in rows)),
        "backend": cfg.verify.reference, "seed": cfg.seed,
        "verification": {"passed": report["passed"], "rows": len(rows), "rows_passed": passed,
                         "file": "verification.json"},
        "timings": {"total_s": report["total_s"]}, "versions": report["versions"]})
    print(f"verification: {passed} of {len(rows)} architecture x backend rows passed; "
          f"{run_dir / 'verification.md'}")
    if report["failures"]:
        raise RunFailed("cross-framework verification failed:\n" + "\n".join(report["failures"]))
    return passed / max(len(rows), 1)
