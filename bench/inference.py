"""Inference latency and throughput: the framework's native model next to its exported ONNX
model in onnxruntime, at batch 1 and a larger batch, on the same preprocessed images.

- Native: the product's own inference path, ``backend.predict`` (torch: eager
  ``nn.Module`` in ``inference_mode``; Keras: the ``tf.function`` of the float32 inference
  model; MXNet: the hybridized inference graph).
- ONNX: ``backend.export_onnx`` (the product's exporter, opset 18) then onnxruntime's CPU
  provider with stated SessionOptions: ``graph_optimization_level`` (ORT_ENABLE_ALL unless
  ``--ort-levels`` asks for others), ``intra_op_num_threads`` = physical cores,
  ``inter_op_num_threads`` = 1, sequential execution. The product's own verification session
  (``export.runtimes.onnxruntime_session``: onnxruntime's defaults) is timed too.
- Both sides run with every physical core. Each repetition times ``k`` calls (``k`` chosen in
  the warm-up so that a repetition lasts ``min_rep_s``); latency = repetition / k.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import SEED, Row, Stats, compose, synthetic_data

NATIVE = {"torch": "native: torch eager (inference_mode)",
          "keras": "native: Keras tf.function",
          "mxnet": "native: MXNet hybridized"}
LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
          "disabled": "ORT_DISABLE_ALL"}


def latencies(fn, reps: int, min_rep_s: float, warmup: int = 2) -> list[float]:
    """Seconds per call of ``fn``: ``reps`` repetitions of ``k`` calls each, after warm-up."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    k = max(1, min(1000, int(np.ceil(min_rep_s / once))))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        out.append((time.perf_counter() - t0) / k)
    return out


def session(path: Path, threads: int, level: str):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(args: dict) -> list[Row]:
    from cnnzoo.app.experiment import build_model, prepare
    from cnnzoo.core.data.preprocess import to_layout
    from export.runtimes import onnxruntime_session as product_session

    arch, name, size, threads = args["arch"], args["backend"], args["input_size"], args["threads"]
    batches, reps, min_rep_s = args["batches"], args["reps"], args["min_rep_s"]
    cfg = compose(f"arch={arch}", f"backend={name}", "hardware=cpu",
                  *synthetic_data(max(*batches, 3), max(batches), size),
                  f"hardware.threads={threads}", f"seed={SEED}")
    exp = prepare(cfg)
    images, _ = exp.train_split.take(np.arange(max(batches)))
    rows = []
    common = {"arch": arch, "backend": name, "input_size": size, "threads": threads}
    with tempfile.TemporaryDirectory(prefix="cnnzoo-bench-onnx-") as tmp:
        backend, model, _ = build_model(cfg, Path(tmp), exp)
        native_ms = {}
        for b in batches:
            x = images[:b]
            stats = Stats.of([s * 1e3 for s in latencies(
                lambda x=x: backend.predict(model, x), reps, min_rep_s)])
            native_ms[b] = stats.median
            rows += _pair(NATIVE[name], stats, b, common, "")
        path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        backend.export_onnx(model, path, images[:2], 18)
        export_s = time.perf_counter() - t0
        sessions = [(f"onnxruntime ({LEVELS[lv]}, intra {threads}, inter 1, sequential)",
                     session(path, threads, lv)) for lv in args.get("ort_levels", ["all"])]
        sessions.append(("onnxruntime, the product's verify session (defaults)",
                         product_session(path)))
        for label, sess in sessions:
            input_name = sess.get_inputs()[0].name
            for b in batches:
                feed = {input_name: to_layout(images[:b], backend.onnx_layout)}
                diff = float(np.abs(sess.run(None, feed)[0]
                                    - backend.predict(model, images[:b])).max())
                stats = Stats.of([s * 1e3 for s in latencies(
                    lambda sess=sess, feed=feed: sess.run(None, feed), reps, min_rep_s)])
                rows += _pair(label, stats, b, common,
                              f"export {export_s:.1f} s; max abs diff vs native {diff:.1e}",
                              baseline=NATIVE[name], ratio=native_ms[b] / stats.median)
    return rows


def _pair(label: str, latency_ms: Stats, batch: int, common: dict, note: str,
          baseline: str = "", ratio: float | str = "") -> list[Row]:
    """A latency row (with the speed-up over the native path) and a throughput row."""
    per_s = Stats(batch * 1e3 / latency_ms.median, batch * 1e3 / latency_ms.max,
                  batch * 1e3 / latency_ms.min, latency_ms.reps)
    return [Row("inference", label, "latency", "ms", latency_ms, batch=batch, **common,
                baseline=baseline, ratio=ratio, note=note),
            Row("inference", label, "throughput", "images/s", per_s, batch=batch, **common,
                note=note)]
