"""Static int8 quantization of an exported ``model.onnx`` with onnxruntime's own tools, and what
it costs and gains, measured on real labelled images.

``quantize_int8`` writes a QDQ model (QuantizeLinear/DequantizeLinear pairs around the quantized
ops; onnxruntime fuses them into integer kernels when it loads the file): weights int8 per output
channel, activations 8-bit (uint8, see ``ACTIVATIONS``) with one scale per tensor from calibration
images. The fp32 file's
``metadata_props`` (preprocessing, class names, layout) are kept, so ``python -m
cnnzoo.app.predict model.int8.onnx images/`` runs it exactly like the fp32 model.

``compare_int8`` measures both files on the same validation images (accuracy, top-1 agreement,
size, batch-1 latency on the CPU) and ``int8_lines`` reports it with a verdict: FAILED when the
int8 model loses more than ``max_drop_pp`` percentage points of accuracy (MMDeploy's usual bound
for int8 is 1 pp)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from cnnzoo.core.data.preprocess import to_layout
from cnnzoo.core.errors import ExportError
from cnnzoo.core.rundir import atomic_write_bytes

METHODS = ("minmax", "entropy", "percentile")
CALIBRATION_BATCH = 16  # images per calibration run (the exported models have a dynamic batch)
EVAL_BATCH = 64
# Activations as uint8 (U8S8 with the int8 weights), chosen by measurement: onnxruntime's CPU
# provider fuses every QDQ Conv and Add of a uint8 ResNet-50 (torch export) into QLinearConv and
# QLinearAdd (53 + 16, one Q/DQ pair left at the edges) but, with int8 activations, only 33 of
# the 53 Convs and no Add, which stay fp32 between DQ and Q: batch-1 latency on 1 thread went
# from 5.2 ms (fp32) to 2.0 ms with uint8 and to 4.7 ms with int8 (AMD EPYC, AVX512-VNNI), at
# the same accuracy (-0.28 pp, 359 digits). onnxruntime's docs warn that U8S8 can saturate on
# x86 CPUs without VNNI (AVX2, older AVX512), where they suggest reduce_range: re-check the
# accuracy on such a deployment CPU.
ACTIVATIONS = "uint8"


def _calibration_method(method: str):
    from onnxruntime.quantization import CalibrationMethod
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ExportError(f"unknown int8 calibration method {method!r}: choose one of "
                          f"{', '.join(METHODS)}")


def _reader(input_name: str, calibration: np.ndarray, layout: str):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """The calibration images in batches, in the model's input layout."""

        def __init__(self):
            self.starts = iter(range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self):
            start = next(self.starts, None)
            if start is None:
                return None
            batch = calibration[start:start + CALIBRATION_BATCH]
            return {input_name: to_layout(np.ascontiguousarray(batch, np.float32), layout)}

    return Reader()


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray,
                  layout: str = "NCHW", method: str = "minmax") -> None:
    """Quantize the ONNX model ``fp32_path`` to int8 (QDQ, per-channel int8 weights, 8-bit
    activations calibrated on ``calibration``: preprocessed NCHW float32 images, given to the
    model in ``layout``, e.g. 128 training images) and write it atomically to ``out_path`` with
    the fp32 file's metadata. Raises ExportError (one line) for a bad method or input, or when
    onnxruntime cannot quantize the model.

    ``method``: how activation ranges come from the calibration outputs: ``minmax`` (the
    extremes), ``entropy`` (KL-divergence threshold, TensorRT's), ``percentile`` (99.999th)."""
    _quantize(Path(fp32_path), Path(out_path), calibration, layout, method)


def _quantize(fp32_path: Path, out_path: Path, calibration: np.ndarray, layout: str, method: str,
              pre_process: bool = True, activations: str = ACTIVATIONS) -> None:
    """``quantize_int8`` with the choices it makes open (for measuring them)."""
    _check_method(method)
    calibration = np.asarray(calibration)
    if calibration.ndim != 4 or not len(calibration):
        raise ExportError(f"int8 calibration needs a batch of NCHW images, got shape "
                          f"{calibration.shape}")
    if not fp32_path.is_file():
        raise ExportError(f"{fp32_path} does not exist: export the fp32 model first")
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = onnx.load(str(fp32_path))
    input_name = source.graph.input[0].name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as tmp:
        model_in = fp32_path
        if pre_process:
            # onnxruntime's recommended pre-processing (symbolic shape inference, then its basic
            # graph optimisations: constant folding, BatchNormalization folded into Conv,
            # MatMul + Add into Gemm). Measured, it matters for two of the three exporters:
            # tf2onnx (keras) gives weights through Transpose/Reshape subgraphs and MatMul + Add,
            # which stay fp32 without it (LeNet-5 int8 file 1.1x smaller instead of 3.2x, and
            # slower); MXNet keeps 53 BatchNormalization nodes in ResNet-50, left fp32 between
            # DQ and Q without it (batch-1 int8 3.4 ms instead of 2.4 ms). Torch's exports are
            # already folded: the same graph, the same accuracy and speed, either way.
            model_in = Path(tmp) / "preprocessed.onnx"
            # it logs "Performing symbolic shape inference..." at INFO, which Hydra prints
            logging.getLogger("onnxruntime.quantization.shape_inference").setLevel(logging.WARNING)
            try:
                quant_pre_process(str(fp32_path), str(model_in))
            except Exception as err:  # noqa: BLE001  onnxruntime raises its own types
                raise ExportError(f"int8 pre-processing of {fp32_path.name} failed: "
                                  f"{str(err).splitlines()[0]}") from None
        raw = Path(tmp) / "int8.onnx"
        try:  # the histogram calibrators print their progress: not the product's output
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(model_in), str(raw), _reader(input_name, calibration, layout),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=_calibration_method(method),
                    calibration_providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001  onnxruntime raises its own types
            raise ExportError(f"int8 quantization of {fp32_path.name} failed: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                              ) from None
        model = onnx.load(str(raw))
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    entry = model.metadata_props.add()
    entry.key, entry.value = "quantization", json.dumps({
        "format": "QDQ", "weights": "int8, per output channel, symmetric",
        "activations": f"{activations}, per tensor", "calibration_method": method,
        "calibration_images": len(calibration), "pre_processed": pre_process,
        "source": fp32_path.name})
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"int8 model fails onnx.checker: {str(err).splitlines()[0]}") from None
    atomic_write_bytes(out_path, model.SerializeToString())


def _session(path: Path, threads: int | None):
    """A CPU session: int8 QDQ models are a CPU deployment (a GPU provider runs them as
    dequantize + fp32 ops), and both models must be timed on the same provider."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _predict(sess, images: np.ndarray, layout: str) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: to_layout(images[s:s + EVAL_BATCH], layout)})[0]
                           for s in range(0, len(images), EVAL_BATCH)]).argmax(1)


def _latencies_ms(sessions, image: np.ndarray, layout: str, runs: int, warmup: int = 10):
    """Median wall time of one single-image ``run`` of each session, after ``warmup`` runs;
    the sessions take turns, so a change in the machine's load falls on all of them alike."""
    feeds = [{s.get_inputs()[0].name: to_layout(image[None], layout)} for s in sessions]
    for _ in range(warmup):
        for sess, feed in zip(sessions, feeds):
            sess.run(None, feed)
    times = [[] for _ in sessions]
    for _ in range(runs):
        for sess, feed, t in zip(sessions, feeds, times):
            t0 = time.perf_counter()
            sess.run(None, feed)
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def compare_int8(fp32_path: Path, int8_path: Path, images: np.ndarray, labels: np.ndarray,
                 layout: str = "NCHW", threads: int | None = None, latency_runs: int = 50) -> dict:
    """Accuracy, top-1 agreement, size and batch-1 CPU latency of both models on the labelled
    NCHW ``images``. ``size_ratio`` and ``speedup`` are fp32 / int8 (above 1: int8 is smaller,
    faster); ``acc_drop_pp`` is fp32 - int8 accuracy in percentage points."""
    images, labels = np.asarray(images, np.float32), np.asarray(labels)
    if not len(images) or len(images) != len(labels):
        raise ExportError(f"int8 comparison needs labelled images: {len(images)} images, "
                          f"{len(labels)} labels")
    fp32, int8 = _session(fp32_path, threads), _session(int8_path, threads)
    p32, p8 = _predict(fp32, images, layout), _predict(int8, images, layout)
    fp32_acc, int8_acc = float((p32 == labels).mean()), float((p8 == labels).mean())
    size32, size8 = Path(fp32_path).stat().st_size / 1e6, Path(int8_path).stat().st_size / 1e6
    lat32_ms, lat8_ms = _latencies_ms((fp32, int8), images[0], layout, max(1, latency_runs))
    return {"images": len(images), "fp32_acc": fp32_acc, "int8_acc": int8_acc,
            "acc_drop_pp": round((fp32_acc - int8_acc) * 100, 6),
            "top1_agreement": float((p32 == p8).mean()),
            "fp32_size_mb": round(size32, 6), "int8_size_mb": round(size8, 6),
            "size_ratio": round(size32 / size8, 3),
            "fp32_latency_ms": round(lat32_ms, 4), "int8_latency_ms": round(lat8_ms, 4),
            "speedup": round(lat32_ms / lat8_ms, 3), "threads": threads}


def int8_lines(block: dict, max_drop_pp: float) -> list[str]:
    """A short human report of ``compare_int8``'s ``block``, ending with the verdict: FAILED
    when the int8 model loses more than ``max_drop_pp`` percentage points of accuracy."""
    passed = block["acc_drop_pp"] <= max_drop_pp
    images = f"  ({block['images']} images)" if "images" in block else ""
    threads = block.get("threads")
    threads = f", {threads} thread{'s' if threads > 1 else ''}" if threads else ""
    return [
        (f"  accuracy   fp32 {block['fp32_acc']:.4f}  int8 {block['int8_acc']:.4f}  "
         f"drop {block['acc_drop_pp']:+.2f} pp  top-1 agree {block['top1_agreement']:.4f}{images}"),
        (f"  size       fp32 {block['fp32_size_mb']:.3f} MB  int8 {block['int8_size_mb']:.3f} MB"
         f"  ({block['size_ratio']:.2f}x smaller)"),
        (f"  latency    fp32 {block['fp32_latency_ms']:.3f} ms  int8 "
         f"{block['int8_latency_ms']:.3f} ms  (batch 1{threads}; {block['speedup']:.2f}x speedup)"),
        f"  {'PASSED' if passed else 'FAILED'} (accuracy drop <= {max_drop_pp:g} pp)"]
