"""The export stage of ``task=train``: ``model.onnx`` verified in ``export.runtimes``; with
``export.caffe``, Caffe's deploy files verified in OpenCV; with ``export.int8.enabled``,
``model.int8.onnx`` with its accuracy, size and latency next to the fp32 model's."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def export_run(cfg: DictConfig, backend, model, exp, run_dir: Path,
               versions: dict) -> tuple[dict, list[str]]:
    """Export and verify; returns the results.json ``export`` block and one line per failed
    verification (empty when everything passed)."""
    from export import export_and_verify  # loads onnx: only once training is done

    spec, analysis, val_split = exp.spec, exp.analysis, exp.val_split
    images, _ = val_split.batch(0, min(cfg.export.num_images, len(val_split)))
    metadata = exp.export_metadata(cfg.backend.name, versions)
    threads = cfg.hardware.threads
    failures = []
    block, reports = export_and_verify(backend, model, images, cfg.export,
                                       run_dir / "model.onnx", metadata, threads)
    _print(f"ONNX verification of {block['path']} against {cfg.backend.name}", reports)
    failures += _failed("ONNX", reports, cfg, run_dir)

    if cfg.export.caffe:
        from export import export_caffe
        caffe, reports = export_caffe(spec, analysis.input_size, backend.get_weights(model),
                                      images, lambda x: backend.predict(model, x), cfg.export,
                                      run_dir, metadata, threads)
        block["caffe"] = caffe
        _print(f"Caffe verification of {caffe['prototxt']} against {cfg.backend.name}", reports)
        failures += _failed("Caffe", reports, cfg, run_dir)

    if cfg.export.int8.enabled:
        block["int8"], failed = _int8(cfg, exp, run_dir / "model.onnx", backend.onnx_layout,
                                      threads)
        failures += failed
    return block, failures


def _print(title: str, reports) -> None:
    for report in reports:
        print(f"{title} ({report.version or report.runtime}):")
        print("\n".join(report.lines()))


def _failed(what: str, reports, cfg: DictConfig, run_dir: Path) -> list[str]:
    lines = []
    for r in reports:
        if r.passed:
            continue
        why = (r.error if r.error else
               f"max abs diff {r.worst('max_abs_diff'):.3g}, top-1 agreement "
               f"{r.worst('top1_agreement'):.3f} (atol {cfg.export.atol:g}, rtol "
               f"{cfg.export.rtol:g})")
        lines.append(f"{what} verification in {r.runtime} failed: {why}; see "
                     f"{run_dir / 'results.json'}")
    return lines


def _int8(cfg: DictConfig, exp, fp32: Path, layout: str, threads) -> tuple[dict, list[str]]:
    """Quantize, then measure both models on the whole validation split."""
    from export.quantize import compare_int8, int8_lines, quantize_int8

    q = cfg.export.int8
    calibration, _ = exp.train_split.batch(0, min(q.calibration_images, len(exp.train_split)))
    out = fp32.with_name("model.int8.onnx")
    quantize_int8(fp32, out, calibration, layout, q.method)
    images, labels = exp.val_split.batch(0, len(exp.val_split))
    block = {"path": out.name, "method": q.method, "calibration_images": len(calibration),
             "max_acc_drop": q.max_acc_drop,
             **compare_int8(fp32, out, images, labels, layout, threads)}
    block["passed"] = block["acc_drop_pp"] <= q.max_acc_drop
    print(f"int8 model {out.name} against {fp32.name} on {len(images)} validation images:")
    print("\n".join(int8_lines(block, q.max_acc_drop)))
    failed = [] if block["passed"] else [(
        f"int8 model loses {block['acc_drop_pp']:.2f} percentage points of validation accuracy "
        f"(export.int8.max_acc_drop={q.max_acc_drop:g}); try export.int8.method=entropy or "
        "percentile, or more export.int8.calibration_images")]
    return block, failed
