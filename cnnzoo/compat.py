"""Every compatibility patch the product needs, in one place, each applied only where needed.

- ``tensorboard_without_tensorflow``: TensorBoard's writer imports TensorFlow when it is
  installed (``tensorboard.compat.tf``), which would load TF into every torch run. TensorBoard
  checks for a ``tensorboard.compat.notf`` module first and then uses its own stub; we provide it.
"""
from __future__ import annotations

import sys
import types


def tensorboard_without_tensorflow() -> None:
    """Make TensorBoard's writers use their TensorFlow-free stub (call before they are imported)."""
    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


# --------------------------------------------------------------------------- MXNet 1.9.1
# MXNet's last release predates numpy 1.24 and onnx 1.19. The MXNet backend calls patch_mxnet()
# before ``import mxnet``; nothing here runs for the other backends (``import cnnzoo.compat``
# alone changes nothing).

def patch_mxnet() -> None:
    """Apply both MXNet shims below; idempotent, and each one only where it is missing."""
    numpy_bool_alias()
    onnx_mapping_module()


def numpy_bool_alias() -> None:
    """``import mxnet`` reads ``numpy.bool`` (mxnet/numpy/utils.py: ``bool = onp.bool``), an
    alias of the builtin ``bool`` that numpy 1.24 removed. Upstream: apache/mxnet#21165, fixed
    by PR apache/mxnet#21223/#21224, never released. We restore the alias, to ``bool`` as numpy
    itself defined it, only if it is missing."""
    import numpy

    if "bool" not in numpy.__dict__:
        numpy.bool = bool


def onnx_mapping_module() -> None:
    """MXNet's ONNX exporter (``mx.onnx.export_model``) does ``from onnx import mapping`` and
    reads exactly two tables, ``NP_TYPE_TO_TENSOR_TYPE[np.dtype]`` and
    ``TENSOR_TYPE_TO_NP_TYPE[int]``. onnx 1.19 removed ``onnx.mapping`` (onnx/onnx#6914, tracked
    in onnx/onnx#4554; reported as onnx/onnx#7257) in favour of
    ``onnx.helper.np_dtype_to_tensor_dtype`` / ``tensor_dtype_to_np_dtype``. We provide a module
    with those two tables, built with the helpers, only if onnx lacks one."""
    import onnx

    if getattr(onnx, "mapping", None) is not None or "onnx.mapping" in sys.modules:
        return
    from onnx import helper

    to_np = {}
    for tensor_type in helper.get_all_tensor_dtypes():
        try:
            to_np[int(tensor_type)] = helper.tensor_dtype_to_np_dtype(tensor_type)
        except (KeyError, TypeError, ValueError):  # a type numpy cannot hold
            continue
    module = types.ModuleType("onnx.mapping", "Compatibility stand-in for onnx.mapping "
                              "(removed in onnx 1.19), built on onnx.helper; see cnnzoo.compat.")
    module.TENSOR_TYPE_TO_NP_TYPE = to_np
    # the inverse, as np_dtype_to_tensor_dtype answers it (should two types share a numpy type)
    module.NP_TYPE_TO_TENSOR_TYPE = {d: helper.np_dtype_to_tensor_dtype(d)
                                     for d in dict.fromkeys(to_np.values())}
    sys.modules["onnx.mapping"] = module
    onnx.mapping = module
