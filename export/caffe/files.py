"""Caffe's two files and cnnzoo's note beside them: ``deploy.prototxt`` (the network, text),
``deploy.caffemodel`` (the network with its weights, binary) and ``deploy.json`` (class names,
preprocessing, input and output blob names: what Caffe's format has no place for)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from cnnzoo.core.errors import ExportError, WeightsError
from cnnzoo.core.rundir import atomic_write_bytes

from . import cnnzoo_caffe_pb2 as pb
from .writer import CaffeLayer

PROTOTXT, CAFFEMODEL, SIDECAR = "deploy.prototxt", "deploy.caffemodel", "deploy.json"

HEADER = """\
# {arch}: a Caffe deploy network written by cnnzoo from the {backend} model's weights.
# Weights: deploy.caffemodel beside this file. Class names and preprocessing: deploy.json.
# Input blob "data": N x {shape} float32 images, preprocessed as deploy.json says (NCHW).
# Output blob "{output}": the logits (no softmax).
# Runs in OpenCV's DNN module (cv2.dnn.readNetFromCaffe(prototxt, caffemodel); OpenCV 4.x, which
# cnnzoo verifies against the native model). Pooling layers that must round their output size
# down say `ceil_mode: false` (OpenCV's field; Caffe's default rounds up). BVLC Caffe (2017 or
# later) spells that `round_mode: FLOOR`: replace the line to run this file there.
"""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_header(number: int, length: int) -> bytes:
    """The tag and length that start a length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(length)


def _field(number: int, payload: bytes) -> bytes:
    return field_header(number, len(payload)) + payload


def _blob_bytes(array: np.ndarray) -> bytes:
    """A BlobProto: its shape through protobuf, its data as one packed field straight from
    numpy (protobuf's Python lists would take minutes for VGG's 138 million floats)."""
    shape = pb.BlobProto(shape=pb.BlobShape(dim=list(array.shape))).SerializeToString()
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return shape + _field(pb.BlobProto.DESCRIPTOR.fields_by_name["data"].number, data)


def caffemodel_bytes(net: pb.NetParameter, layers: list[CaffeLayer]) -> bytes:
    """The binary NetParameter with every layer's blobs, as Caffe's own Net::ToProto writes it."""
    head = pb.NetParameter(name=net.name).SerializeToString()
    layer_field = pb.NetParameter.DESCRIPTOR.fields_by_name["layer"].number
    blobs_field = pb.LayerParameter.DESCRIPTOR.fields_by_name["blobs"].number
    parts = [head]
    for layer in layers:
        body = layer.proto.SerializeToString() + b"".join(
            _field(blobs_field, _blob_bytes(b)) for b in layer.blobs)
        parts.append(_field(layer_field, body))
    return b"".join(parts)


def write(folder: Path, net: pb.NetParameter, layers: list[CaffeLayer], sidecar: dict,
          backend: str) -> dict[str, Path]:
    """Write the three files (each atomically) and return their paths."""
    shape = "x".join(str(d) for d in net.layer[0].input_param.shape[0].dim[1:])
    header = HEADER.format(arch=net.name, backend=backend, shape=shape, output=sidecar["output"])
    paths = {"prototxt": folder / PROTOTXT, "caffemodel": folder / CAFFEMODEL,
             "sidecar": folder / SIDECAR}
    atomic_write_bytes(paths["prototxt"], (header + text_format.MessageToString(net)).encode())
    atomic_write_bytes(paths["caffemodel"], caffemodel_bytes(net, layers))
    atomic_write_bytes(paths["sidecar"], (json.dumps(sidecar, indent=2) + "\n").encode())
    return paths


# --------------------------------------------------------------------------- reading
def read_prototxt(path: Path) -> pb.NetParameter:
    """A deploy network; fields cnnzoo does not use (fillers, learning rates) are skipped, and
    BVLC's ``round_mode`` is read as OpenCV's ``ceil_mode`` (see cnnzoo_caffe.proto)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise WeightsError(f"cannot read the Caffe network {path}: {err}") from None
    except UnicodeDecodeError:
        raise WeightsError(f"cannot read the Caffe network {path}: it is not text (a "
                           ".caffemodel?); give its deploy .prototxt") from None
    text = re.sub(r"\bround_mode\s*:\s*FLOOR\b", "ceil_mode: false", text)
    text = re.sub(r"\bround_mode\s*:\s*CEIL\b", "ceil_mode: true", text)
    try:
        net = text_format.Parse(text, pb.NetParameter(), allow_unknown_field=True)
    except text_format.ParseError as err:
        raise WeightsError(f"cannot read the Caffe network {path}: "
                           f"{str(err).splitlines()[0]}; give a deploy .prototxt") from None
    if not (net.layer or net.layers):
        raise WeightsError(f"{path} holds no layers: it is not a Caffe network (give a deploy "
                           ".prototxt)")
    return net


def input_shape(net: pb.NetParameter) -> list[int] | None:
    """The network's input shape, from its Input layer or its old-style ``input_shape`` /
    ``input_dim`` fields (None: it declares none)."""
    for layer in net.layer:
        if layer.type == "Input" and layer.input_param.shape:
            return list(layer.input_param.shape[0].dim)
    if net.input_shape:
        return list(net.input_shape[0].dim)
    if len(net.input_dim) >= 4:
        return list(net.input_dim[:4])
    return None


def read_caffemodel(path: Path) -> pb.NetParameter:
    try:
        net = pb.NetParameter.FromString(Path(path).read_bytes())
    except (OSError, DecodeError) as err:
        raise WeightsError(f"cannot read the Caffe weights {path}: {err} (a truncated or "
                           "damaged .caffemodel?); export or download it again") from None
    if not (net.layer or net.layers):
        raise WeightsError(f"{path} holds no layers: it is not a .caffemodel")
    return net


def blob_array(blob: pb.BlobProto) -> np.ndarray:
    """A BlobProto as a float32 array in its declared shape (legacy 4-D headers too)."""
    dims = (list(blob.shape.dim) if blob.HasField("shape")
            else [blob.num, blob.channels, blob.height, blob.width])
    data = np.asarray(blob.data if len(blob.data) else blob.double_data, dtype=np.float32)
    if int(np.prod(dims)) != data.size:
        if data.size == int(np.prod([d for d in dims if d])):  # legacy 1 x 1 x out x in
            return data.reshape([d for d in dims if d])
        raise WeightsError(f"a Caffe blob declares shape {dims} but holds {data.size} values")
    return data.reshape(dims)


def read_sidecar(prototxt: Path) -> dict:
    path = Path(prototxt).with_name(SIDECAR)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read {path}, the class names and preprocessing of "
                          f"{prototxt}: {err}") from None
