"""Translate a Spec into a PyTorch ``nn.Module`` (NCHW), one torch layer per spec node."""
from __future__ import annotations

import torch
from torch import nn

from architectures import spec as S


class _Concat(nn.Module):
    def forward(self, *xs):
        return torch.cat(xs, dim=1)


class _Add(nn.Module):
    def forward(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
_MODULE_DICT = nn.ModuleDict()  # the attributes a layer key must not shadow (SpecModule.key)


def torch_layer(layer: S.Layer, in_shape: tuple[int, ...]) -> nn.Module:
    if isinstance(layer, S.Conv2d):
        return nn.Conv2d(in_shape[0], layer.out_channels, S.pair(layer.kernel),
                         S.pair(layer.stride), S.pair(layer.padding), S.pair(layer.dilation),
                         layer.groups, layer.bias)
    if isinstance(layer, S.BatchNorm):
        bn = nn.BatchNorm2d if len(in_shape) == 3 else nn.BatchNorm1d
        return bn(in_shape[0], eps=layer.eps, momentum=layer.momentum)
    if isinstance(layer, S.Activation):
        return _ACTIVATIONS[layer.kind]()
    if isinstance(layer, S.MaxPool):
        return nn.MaxPool2d(layer.kernel, layer.stride, layer.padding, ceil_mode=layer.ceil_mode)
    if isinstance(layer, S.AvgPool):
        return nn.AvgPool2d(layer.kernel, layer.stride, layer.padding, ceil_mode=layer.ceil_mode,
                            count_include_pad=layer.count_include_pad)
    if isinstance(layer, S.AdaptiveAvgPool):
        return nn.AdaptiveAvgPool2d(S.pair(layer.output_size))
    if isinstance(layer, S.GlobalAvgPool):
        return nn.AdaptiveAvgPool2d(1)
    if isinstance(layer, S.Flatten):
        return nn.Flatten()
    if isinstance(layer, S.Dense):
        return nn.Linear(in_shape[0], layer.out_features, layer.bias)
    if isinstance(layer, S.Dropout):
        return nn.Dropout(layer.p)
    if isinstance(layer, S.Concat):
        return _Concat()
    if isinstance(layer, S.Add):
        return _Add()
    if isinstance(layer, S.Scale):
        return _Scale(layer.factor)
    raise TypeError(f"torch backend cannot build {type(layer).__name__}")


def kaiming_fan_out(layers) -> None:
    """Spec.init "kaiming_fan_out" (torchvision's VGG): conv weights N(0, 2/fan_out), dense
    weights N(0, 0.01^2), zero biases; the layers were built with PyTorch's default."""
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, 0.01)
        else:
            continue
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


class SpecModule(nn.Module):
    """Runs the spec's nodes in order; each output is dropped after its last use.

    In training, a spec with auxiliary classifiers returns ``(logits, *aux_logits)``; in eval
    mode (inference, export) it returns the logits alone and skips the auxiliary heads."""

    def __init__(self, spec: S.Spec, input_size: int):
        super().__init__()
        self.spec, self.input_size = spec, input_size  # get_weights/set_weights read them
        analysis = spec.analyze(input_size)
        # ModuleDict keys cannot contain dots; spec names map 1:1 to these keys
        self.layers = nn.ModuleDict({self.key(r.node.name): torch_layer(r.node.layer, r.in_shape)
                                     for r in analysis.layers})
        self.output, self.aux_outputs, self.aux_weight = spec.output, spec.aux_outputs, spec.aux_weight
        if spec.init == "kaiming_fan_out":
            kaiming_fan_out(self.layers.values())
        self._train_plan = self._plan(spec.nodes, (spec.output, *spec.aux_outputs))
        self._eval_plan = self._plan(spec.nodes, (spec.output,))

    @classmethod
    def _plan(cls, nodes, outputs):
        """The nodes ``outputs`` need, each with the inputs that are used for the last time."""
        needed = set(outputs)
        for node in reversed(nodes):
            if node.name in needed:
                needed.update(node.inputs)
        nodes = [n for n in nodes if n.name in needed]
        last_use = {name: i for i, n in enumerate(nodes) for name in n.inputs}
        return [(cls.key(n.name), n.name, n.inputs,
                 tuple(x for x in dict.fromkeys(n.inputs)
                       if last_use[x] == i and x not in outputs))
                for i, n in enumerate(nodes)]

    @staticmethod
    def key(name: str) -> str:
        """The node's key in ``layers``: no dots (a ModuleDict key cannot have one), and not an
        attribute of the ModuleDict itself (``half``, ``train``, ``training``...), which
        ``add_module`` refuses; every other name stays as it is, so checkpoints keep their keys."""
        key = name.replace(".", "_")
        return f"node_{key}" if hasattr(_MODULE_DICT, key) else key

    def forward(self, x):
        with_aux = self.training and bool(self.aux_outputs)
        values = self._run(self._train_plan if with_aux else self._eval_plan, x)
        if with_aux:
            return (values[self.output], *(values[a] for a in self.aux_outputs))
        return values[self.output]

    def node_outputs(self, x) -> dict:
        """Every node's output of the inference graph (the layer report), input excluded."""
        values = self._run(self._eval_plan, x, keep_all=True)
        del values[S.INPUT]
        return values

    def _run(self, plan, x, keep_all: bool = False) -> dict:
        """The nodes of ``plan`` on ``x``: their outputs, each dropped after its last use
        unless ``keep_all``."""
        values = {S.INPUT: x}
        for key, name, inputs, done in plan:
            values[name] = self.layers[key](*[values[i] for i in inputs])
            for used in () if keep_all else done:
                del values[used]
        return values
