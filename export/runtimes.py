"""The inference runtimes an exported model is verified in, each loaded the same way:
``load(runtime, path, threads, layout)`` -> a ``Runner`` whose ``run`` maps NCHW float32 images
to logits.

==============  =======================  =====================================================
runtime         formats                  package
==============  =======================  =====================================================
onnxruntime     ONNX                     onnxruntime (always installed)
opencv          ONNX, Caffe              opencv-python-headless (``pip install ".[deploy]"``)
openvino        ONNX                     openvino (``pip install ".[deploy]"``)
==============  =======================  =====================================================

A Caffe model is given by its ``deploy.prototxt``; its weights are the ``deploy.caffemodel``
beside it. Each runtime runs in fp32 on the CPU (onnxruntime also on CUDA when it is there):
OpenVINO's CPU plugin would otherwise compute in bf16 on CPUs that have it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import numpy as np

from cnnzoo.core.data.preprocess import to_layout
from cnnzoo.core.errors import ExportError

ONNX, CAFFE = "onnx", "caffe"
FORMATS = {"onnxruntime": (ONNX,), "opencv": (ONNX, CAFFE), "openvino": (ONNX,)}
_PACKAGES = {"onnxruntime": "onnxruntime", "opencv": "opencv-python-headless",
             "openvino": "openvino"}
MODULES = {"onnxruntime": "onnxruntime", "opencv": "cv2", "openvino": "openvino"}


@dataclass
class Runner:
    runtime: str
    version: str  # the runtime's version and where it runs, for reports
    run: Callable[[np.ndarray], np.ndarray]


def format_of(path: Path) -> str:
    return CAFFE if Path(path).suffix in (".prototxt", ".caffemodel") else ONNX


def _import(runtime: str):
    try:
        return import_module(MODULES[runtime])
    except ImportError:
        raise ExportError(f"runtime {runtime} is not installed: pip install -c constraints.txt "
                          f"{_PACKAGES[runtime]} (or the project's extra: -e \".[deploy]\")") from None


def load(runtime: str, path: Path, threads: int | None = None, layout: str = "NCHW") -> Runner:
    """``path`` (an .onnx file, or a Caffe deploy.prototxt) loaded in ``runtime``."""
    fmt = format_of(path)
    if runtime not in FORMATS:
        raise ExportError(f"unknown runtime '{runtime}'; choose from {', '.join(FORMATS)}")
    if fmt not in FORMATS[runtime]:
        raise ExportError(f"runtime {runtime} does not run {fmt} models")
    try:
        return {"onnxruntime": _onnxruntime, "opencv": _opencv,
                "openvino": _openvino}[runtime](Path(path), threads, layout)
    except ExportError:
        raise
    except Exception as err:  # noqa: BLE001  each runtime raises its own types
        raise ExportError(f"{runtime} cannot load {Path(path).name}: "
                          f"{one_line(err) or type(err).__name__}") from None


def onnxruntime_session(path: Path, threads: int | None = None):
    """The product's onnxruntime session: its default options, CUDA when it is there."""
    ort = _import("onnxruntime")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), opts, providers=providers)


def _onnxruntime(path: Path, threads: int | None, layout: str) -> Runner:
    import onnxruntime as ort

    sess = onnxruntime_session(path, threads)
    name = sess.get_inputs()[0].name
    return Runner("onnxruntime", f"onnxruntime {ort.__version__}, {sess.get_providers()[0]}",
                  lambda x: sess.run(None, {name: to_layout(x, layout)})[0])


def _opencv(path: Path, threads: int | None, layout: str) -> Runner:
    cv2 = _import("opencv")
    cv2.setLogLevel(2)  # errors only as exceptions, reported by the caller; not on stderr too
    if threads:
        cv2.setNumThreads(threads)
    try:
        if format_of(path) == CAFFE:
            prototxt = path.with_suffix(".prototxt")
            caffemodel = prototxt.with_suffix(".caffemodel")
            net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
        else:
            net = cv2.dnn.readNetFromONNX(str(path))
    except cv2.error as err:  # its message is the C++ assertion's; keep the reason
        what = (f"{prototxt.name} with {caffemodel.name} (a truncated or damaged .caffemodel, "
                "or a .prototxt of another network?)" if format_of(path) == CAFFE else path.name)
        raise ExportError(f"OpenCV cannot load {what}: {one_line(err)}") from None
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

    def run(x: np.ndarray) -> np.ndarray:
        try:
            net.setInput(np.ascontiguousarray(to_layout(x, layout), dtype=np.float32))
            return net.forward().reshape(len(x), -1)
        except cv2.error as err:
            raise ExportError(f"OpenCV cannot run {path.name}: {one_line(err)}") from None

    if format_of(path) == CAFFE:  # OpenCV checks weights against the network only when it runs
        from .caffe.files import input_shape, read_prototxt
        try:
            shape = input_shape(read_prototxt(prototxt))
            if shape:
                run(np.zeros(shape, np.float32))
        except ExportError as err:
            raise ExportError(f"{caffemodel.name} does not fit {prototxt.name} ({err}); give the "
                              "pair run.py wrote") from None
    return Runner("opencv", f"OpenCV DNN {cv2.__version__}, CPU", run)


def one_line(err: Exception, limit: int = 300) -> str:
    """A runtime's (often multi-line) message as one line."""
    text = " ".join(str(getattr(err, "err", err)).split()).strip("> ")
    return text if len(text) <= limit else text[:limit] + " ..."


def _openvino(path: Path, threads: int | None, layout: str) -> Runner:
    ov = _import("openvino")
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: to_layout(x, layout)})[compiled.output(0)])

    return Runner("openvino", f"OpenVINO {ov.__version__.split('-')[0]}, CPU, f32", run)
