"""Run an exported model on image files: ``task=predict`` or, for deployment, standalone:

    python -m cnnzoo.app.predict model.onnx photo.png more_images/ [--top-k 5] [--json]
    python -m cnnzoo.app.predict deploy.prototxt photo.png          # Caffe, in OpenCV's DNN

Only onnxruntime (or OpenCV for Caffe files), numpy and Pillow are used. The preprocessing
(size, interpolation, channels, mean/std, input layout) and the class names come from the
model's own ONNX metadata or the deploy.json beside Caffe files, both written by the export
stage, so images are fed exactly as in training.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..core.data.image_folder import EXTENSIONS, decode, why_unreadable
from ..core.data.preprocess import Preprocess
from ..core.errors import BAD_INPUT, ConfigError, DataError, ExportError, exit_with
from ..core.rules import problems
from .validate import PREDICT_RULES


def image_files(inputs: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for images (sorted)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in EXTENSIONS)
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"predict: {item} does not exist: give image files or folders")
    if not files:
        raise DataError(f"predict: no images ({', '.join(sorted(EXTENSIONS))}) in {inputs}")
    return files


def load_model(path: Path):
    """The model as a function of NCHW images (onnxruntime for ONNX, OpenCV's DNN module for a
    Caffe deploy.prototxt or .caffemodel), the Preprocess recorded with it and its classes."""
    from export.runtimes import CAFFE, format_of
    from export.runtimes import load as load_runtime

    path = Path(path)
    if not path.is_file():
        raise DataError(f"predict: model {path} does not exist: give the model.onnx or "
                        "deploy.prototxt of a run")
    caffe = format_of(path) == CAFFE
    try:
        meta = _caffe_metadata(path) if caffe else _onnx_metadata(path)
        if "preprocess" not in meta:
            raise DataError(f"predict: {path} has no cnnzoo preprocessing metadata; export it "
                            "with run.py so that its inputs can be prepared")
        runner = load_runtime("opencv" if caffe else "onnxruntime", path,
                              layout=meta.get("layout", "NCHW"))
    except ExportError as err:
        raise DataError(f"predict: {err}") from None
    pre = meta["preprocess"]
    preprocess = Preprocess(pre["resize"][0], pre["channels"], tuple(pre["mean"]),
                            tuple(pre["std"]), pre["interpolation"],
                            channel_order=pre.get("channel_order", "RGB"),
                            crop_fraction=pre.get("crop_fraction"))
    return runner.run, preprocess, meta.get("class_names", [])


def _onnx_metadata(path: Path) -> dict:
    """The ONNX file's metadata (JSON values decoded)."""
    import onnxruntime as ort
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001  onnxruntime raises its own exception types
        raise DataError(f"predict: {path} is not a loadable ONNX model: "
                        f"{str(err).splitlines()[0]}") from None
    meta = sess.get_modelmeta().custom_metadata_map
    return {k: (v if k == "layout" else json.loads(v)) for k, v in meta.items()
            if k in ("preprocess", "class_names", "layout")}


def _caffe_metadata(path: Path) -> dict:
    """deploy.json, written beside the Caffe files; both files must be there."""
    from export.caffe.files import read_sidecar

    prototxt = path.with_suffix(".prototxt")
    for needed in (prototxt, prototxt.with_suffix(".caffemodel")):
        if not needed.is_file():
            raise DataError(f"predict: {needed} is missing: a Caffe model is its "
                            ".prototxt and .caffemodel side by side")
    return read_sidecar(prototxt)


def predict(model: Path, inputs: list[str], top_k: int = 5, batch_size: int = 32) -> list[dict]:
    """Top-k classes with probabilities for every image in ``inputs``."""
    run, preprocess, classes = load_model(model)
    results = []
    files = image_files(inputs)
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = []
        for f in chunk:
            try:
                images.append(decode(str(f)))
            except Exception as err:  # noqa: BLE001  Pillow's errors vary by format
                raise DataError(f"predict: cannot read {f}: {why_unreadable(err)}") from None
        try:
            logits = run(preprocess.batch(images))
        except ExportError as err:
            raise DataError(f"predict: {err}") from None
        probs = _softmax(logits.astype(np.float64))
        for f, p in zip(chunk, probs):
            best = np.argsort(-p)[:top_k]
            results.append({"file": str(f), "top": [
                {"class": classes[k] if k < len(classes) else str(k), "index": int(k),
                 "probability": float(p[k])} for k in best]})
    return results


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def format_results(results: list[dict]) -> str:
    return "\n".join(f"{r['file']}: " + ", ".join(f"{t['class']} ({t['probability']:.3f})"
                                                  for t in r["top"]) for r in results)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cnnzoo.app.predict", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="a model.onnx or deploy.prototxt exported by run.py")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)
    try:
        bad = problems({"--top-k": PREDICT_RULES["predict.top_k"]}, {"--top-k": args.top_k}.get)
        if bad:  # task=predict's rule, under this command's option name
            raise ConfigError("\n".join(bad))
        results = predict(args.model, args.inputs, args.top_k)
    except BAD_INPUT as err:
        exit_with(err)
    print(json.dumps(results, indent=2) if args.json else format_results(results))


if __name__ == "__main__":
    main()
