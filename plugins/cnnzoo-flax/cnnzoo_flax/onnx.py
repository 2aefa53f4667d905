"""ONNX export: the jaxpr of the model's inference function, translated primitive by
primitive into an ONNX graph.

Why this route: what JAX traces is exactly what ``predict`` runs, and a CNN of the spec
needs some twenty primitives (convolution, windowed max and sum, dot_general, elementwise
arithmetic, reshape, transpose, concatenate, broadcast). The ready-made routes do not fit
beside MXNet's numpy<2: jax2onnx needs jax>=0.8.1 (numpy 2) and flax>=0.12.1, plus equinox,
dm-pix, netron, huggingface-hub and orbax-export; jax2tf's TensorFlow lowering, the input
tf2onnx reads, has been deprecated since JAX 0.4.31 (its native serialization is an opaque
``XlaCallModule`` that tf2onnx cannot convert), and it would bring TensorFlow into this backend.

The graph takes "input" (batch, C, H, W) float32 with a dynamic batch and gives "logits".
The function is traced at an abstract batch of ``TRACE_BATCH`` images (nothing is computed):
every shape that holds that number holds the batch, and becomes -1 (reshape) or 1 (a
broadcast, which the elementwise op after it widens). The variables become initializers. An
unknown primitive raises ``ExportError`` naming it.
"""
from __future__ import annotations

import string
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax.extend.core import Literal
from onnx import TensorProto, helper, numpy_helper

from cnnzoo.core.errors import ExportError

TRACE_BATCH = 9973  # a prime no layer of a spec has as a dimension

_ELEMENTWISE = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max",
                "min": "Min", "tanh": "Tanh", "logistic": "Sigmoid", "exp": "Exp", "log": "Log",
                "neg": "Neg", "sqrt": "Sqrt", "abs": "Abs"}


class _Graph:
    """The ONNX graph being written: nodes, initializers and a name for every jaxpr value."""

    def __init__(self):
        self.nodes, self.initializers, self.names, self._count = [], [], {}, 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.fresh(hint or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def name_of(self, atom) -> str:
        if isinstance(atom, Literal):
            return self.const(np.asarray(atom.val, atom.aval.dtype), "literal")
        return self.names[atom]


def _dynamic(shape) -> list[int]:
    """A traced shape for Reshape: the batch becomes -1."""
    return [-1 if d == TRACE_BATCH else int(d) for d in shape]


def _inverse(perm) -> list[int]:
    return [int(i) for i in np.argsort(perm)]


# --------------------------------------------------------------------------- primitives
def _conv(g: _Graph, eqn, x: str, w: str) -> str:
    p = eqn.params
    if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
        raise ExportError("ONNX export: transposed or batch-grouped convolutions are not "
                          "supported")
    lhs, rhs, out = p["dimension_numbers"]
    pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
    y = g.node("Conv", [g.node("Transpose", [x], perm=list(lhs)),
                        g.node("Transpose", [w], perm=list(rhs))], "conv",
               strides=list(p["window_strides"]), pads=pads, dilations=list(p["rhs_dilation"]),
               group=p["feature_group_count"])
    return g.node("Transpose", [y], perm=_inverse(out))


def _pool(g: _Graph, eqn, x: str, kind: str) -> str:
    """reduce_window over the spatial axes of NHWC: ONNX MaxPool, or for a sum AveragePool
    counting the padding, times the window's size (the export pads so that every window lies
    inside the padded input)."""
    p = eqn.params
    dims, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
    if (dims[0], dims[-1], strides[0], strides[-1]) != (1, 1, 1, 1) or padding[0] != (0, 0) \
            or padding[-1] != (0, 0) or any(d != 1 for d in p["base_dilation"]) \
            or any(d != 1 for d in p["window_dilation"]):
        raise ExportError(f"ONNX export: {eqn.primitive.name} over other than the spatial axes "
                          "of an NHWC batch is not supported")
    attrs = dict(kernel_shape=list(dims[1:3]), strides=list(strides[1:3]),
                 pads=[padding[1][0], padding[2][0], padding[1][1], padding[2][1]])
    nchw = g.node("Transpose", [x], perm=[0, 3, 1, 2])
    if kind == "max":
        y = g.node("MaxPool", [nchw], "maxpool", **attrs)
    else:
        y = g.node("Mul", [g.node("AveragePool", [nchw], "sumpool", count_include_pad=1, **attrs),
                           g.const(np.float32(dims[1] * dims[2]))])
    return g.node("Transpose", [y], perm=[0, 2, 3, 1])


def _dot_general(g: _Graph, eqn, a: str, b: str) -> str:
    (ca, cb), (ba, bb) = eqn.params["dimension_numbers"]
    ra, rb = (len(v.aval.shape) for v in eqn.invars)
    if not ba and not bb and list(ca) == [ra - 1] and list(cb) == [0] and rb == 2:
        return g.node("MatMul", [a, b])  # a dense layer
    letters = iter(string.ascii_lowercase)
    sa, sb = [next(letters) for _ in range(ra)], [None] * rb
    for i, j in [*zip(ba, bb), *zip(ca, cb)]:
        sb[j] = sa[i]
    sb = [s or next(letters) for s in sb]
    out = [sa[i] for i in ba] + [s for i, s in enumerate(sa) if i not in (*ba, *ca)] + \
        [s for j, s in enumerate(sb) if j not in (*bb, *cb)]
    return g.node("Einsum", [a, b], equation=f"{''.join(sa)},{''.join(sb)}->{''.join(out)}")


def _broadcast(g: _Graph, eqn, x: str) -> str:
    """broadcast_in_dim: the operand's axes placed among size-1 axes, expanded over every
    axis but the batch (the elementwise op it feeds widens that one)."""
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    in_shape = eqn.invars[0].aval.shape
    placed = [1] * len(shape)
    for axis, d in zip(dims, in_shape):
        placed[axis] = -1 if d == TRACE_BATCH else int(d)
    y = g.node("Reshape", [x, g.const(np.array(placed, np.int64))])
    target = [1 if d == TRACE_BATCH else int(d) for d in shape]
    if [abs(d) for d in placed] != target:
        y = g.node("Expand", [y, g.const(np.array(target, np.int64))])
    return y


def _translate(g: _Graph, jaxpr, consts, inputs: list[str]) -> list[str]:
    """Add the equations of ``jaxpr`` (its constants ``consts``, its inputs named ``inputs``)
    to ``g``; the names of its outputs. Nested jaxprs (jit, custom_jvp) are inlined."""
    for var, value in zip(jaxpr.constvars, consts):
        g.names[var] = g.const(np.asarray(value), "const")
    for var, name in zip(jaxpr.invars, inputs):
        g.names[var] = name
    for eqn in jaxpr.eqns:
        prim, p = eqn.primitive.name, eqn.params
        args = [g.name_of(v) for v in eqn.invars]
        sub = p.get("jaxpr") or p.get("call_jaxpr")
        if sub is not None:  # pjit, custom_jvp_call: the function itself
            closed = sub if hasattr(sub, "consts") else None
            outs = _translate(g, closed.jaxpr if closed else sub, closed.consts if closed else [],
                              args)
        elif prim in _ELEMENTWISE:
            outs = [g.node(_ELEMENTWISE[prim], args)]
        elif prim == "rsqrt":
            outs = [g.node("Reciprocal", [g.node("Sqrt", args)])]
        elif prim == "integer_pow":
            outs = [g.node("Pow", [args[0], g.const(np.float32(p["y"]))])]
        elif prim == "conv_general_dilated":
            outs = [_conv(g, eqn, *args)]
        elif prim in ("reduce_window_max", "reduce_window_sum"):
            outs = [_pool(g, eqn, args[0], "max" if prim.endswith("max") else "sum")]
        elif prim == "dot_general":
            outs = [_dot_general(g, eqn, *args)]
        elif prim == "reduce_sum":  # axes as an input: opset 13 and later
            outs = [g.node("ReduceSum", [args[0], g.const(np.array(p["axes"], np.int64))],
                           keepdims=0)]
        elif prim == "reshape":
            outs = [g.node("Reshape", [args[0], g.const(np.array(_dynamic(p["new_sizes"]),
                                                                  np.int64))])]
        elif prim == "squeeze":
            outs = [g.node("Reshape", [args[0], g.const(np.array(
                _dynamic(eqn.outvars[0].aval.shape), np.int64))])]
        elif prim == "transpose":
            outs = [g.node("Transpose", args, perm=list(p["permutation"]))]
        elif prim == "concatenate":
            outs = [g.node("Concat", args, axis=p["dimension"])]
        elif prim == "broadcast_in_dim":
            outs = [_broadcast(g, eqn, args[0])]
        elif prim in ("convert_element_type", "copy", "copy_p"):
            if eqn.outvars[0].aval.dtype != np.float32:
                raise ExportError(f"ONNX export: a cast to {eqn.outvars[0].aval.dtype}: export a "
                                  "float32 model")
            outs = [g.node("Identity", args)]
        else:
            raise ExportError(f"ONNX export: JAX primitive '{prim}' has no translation in "
                              "cnnzoo_flax/onnx.py")
        for var, name in zip(eqn.outvars, outs):
            g.names[var] = name
    return [g.name_of(v) for v in jaxpr.outvars]


def to_onnx(model, opset: int) -> onnx.ModelProto:
    """The float32 inference function of ``model`` (a FlaxModel) as an ONNX model."""
    module, spec, size = model.module, model.spec, model.input_size

    def logits(variables, x):
        return module.clone(dtype=jnp.float32).apply(variables, jnp.transpose(x, (0, 2, 3, 1)),
                                                     train=False)

    variables = jax.device_get(model.variables)
    x = jax.ShapeDtypeStruct((TRACE_BATCH, spec.in_channels, size, size), jnp.float32)
    closed = jax.make_jaxpr(logits)(variables, x)
    g = _Graph()
    leaves = jax.tree_util.tree_leaves(variables)
    names = [g.const(np.asarray(v, np.float32), "w") for v in leaves] + ["input"]
    out = _translate(g, closed.jaxpr, closed.consts, names)[0]
    g.nodes.append(helper.make_node("Identity", [out], ["logits"]))
    graph = helper.make_graph(
        g.nodes, spec.name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                       ["batch", spec.in_channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["batch", spec.num_classes])],
        g.initializers)
    opsets = [helper.make_opsetid("", opset)]
    # the oldest IR version the opset allows, not this onnx package's newest: onnxruntime
    # 1.30 refuses onnx 1.23's IR 14 ("Unsupported model IR version"), seen on a GPU machine
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="cnnzoo-flax",
                              ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model, path: Path, example: np.ndarray, opset: int) -> None:
    """Write ``model`` as ONNX (input "input", dynamic batch; output "logits"); ``example``
    fixes nothing (the batch is traced abstractly) but must fit the model."""
    if tuple(example.shape[1:]) != (model.spec.in_channels, model.input_size, model.input_size):
        raise ExportError(f"ONNX export: example images {example.shape[1:]} do not fit the "
                          f"model's input {(model.spec.in_channels, model.input_size)}")
    onnx.save_model(to_onnx(model, opset), str(path))
