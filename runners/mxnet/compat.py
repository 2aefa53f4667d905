"""How MXNet 1.9.1 is loaded here: the shims it needs (each applied only where missing) and
its import with the configured OpenMP threads. Importing this module alone changes nothing."""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

# --------------------------------------------------------------------------- MXNet 1.9.1
# MXNet's last release predates numpy 1.24 and onnx 1.19. The MXNet backend calls patch_mxnet()
# before ``import mxnet``; nothing here runs for the other backends (importing this module alone
# changes nothing).

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
                              "(removed in onnx 1.19), built on onnx.helper; see "
                              "runners.mxnet.compat.")
    module.TENSOR_TYPE_TO_NP_TYPE = to_np
    # the inverse, as np_dtype_to_tensor_dtype answers it (should two types share a numpy type)
    module.NP_TYPE_TO_TENSOR_TYPE = {d: helper.np_dtype_to_tensor_dtype(d)
                                     for d in dict.fromkeys(to_np.values())}
    sys.modules["onnx.mapping"] = module
    onnx.mapping = module


# --------------------------------------------------------------------------- the import
def physical_cores() -> int:
    """The physical cores this process may run on: its CPUs (``os.sched_getaffinity``) counted
    once per core (Linux sysfs ``thread_siblings_list``); ``os.cpu_count()`` where either is
    unavailable."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
                      .read_text().strip())
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def import_mxnet(threads: int | None = None, deterministic: bool = False):
    """Import MXNet (once), the shims first. It reads its OpenMP thread counts only while it
    loads, so they are put in the environment for the import and taken out again (child
    processes and other libraries keep the user's settings); later calls return the module as
    it is. ``threads`` None: every physical core (``physical_cores``), unless
    ``OMP_NUM_THREADS`` is set."""
    if "mxnet" not in sys.modules:
        patch_mxnet()
        settings = {}
        if not threads and "OMP_NUM_THREADS" not in os.environ:
            threads = physical_cores()
        if threads:
            settings.update(OMP_NUM_THREADS=str(threads), MXNET_OMP_MAX_THREADS=str(threads))
        if deterministic:
            settings["MXNET_ENFORCE_DETERMINISM"] = "1"
        saved = {k: os.environ.get(k) for k in settings}
        os.environ.update(settings)
        try:
            import mxnet
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    import mxnet
    return mxnet
