"""Xception (Chollet 2016, "Xception: Deep Learning with Depthwise Separable Convolutions"),
laid out exactly as timm's ``legacy_xception`` (the port of ``keras.applications.Xception``):
entry flow (two plain 3x3 convolutions, then three residual blocks that downsample with a
3x3/2 max-pool and a strided 1x1 projection shortcut), a middle flow of eight 728-channel
residual blocks, and the exit flow (one downsampling block, two separable convolutions).

A separable convolution is a depthwise 3x3 Conv2d (groups == channels) followed by a pointwise
1x1 Conv2d, both without bias; batch norm follows the pointwise convolution only. Batch norm
uses PyTorch's default eps 1e-5 as timm's port does (Keras uses 1e-3: option ``bn_eps``), and
the max-pools have symmetric padding 1 where Keras pads "same" (same output sizes; for even
inputs Keras pads on the right only, so its windows sit one pixel further right). The
reference has no dropout (timm's ``drop_rate`` defaults to 0); the paper used 0.5 before the
classifier on ImageNet.
Parameters: 22,855,952, equal to Keras' trainable count.
Names follow timm (``block1.skip``, ``conv3.pointwise``, ``bn4``); the separable convolutions
inside a block are ``block1.sepconv1.conv1`` / ``block1.sepconv1.pointwise`` and the output of
block ``block1`` is the node named ``block1``."""
from .registry import register
from .spec import INPUT, GlobalAvgPool, GraphBuilder

# (out_filters, separable convs, stride, relu before the first conv, widen at the first conv)
_BLOCKS = ([(128, 2, 2, False, True), (256, 2, 2, True, True), (728, 2, 2, True, True)]
           + [(728, 3, 1, True, True)] * 8
           + [(1024, 2, 2, True, False)])


def _separable(g: GraphBuilder, x: str, in_ch: int, out_ch: int, name: str) -> str:
    x = g.conv(x, in_ch, 3, 1, 1, groups=in_ch, bias=False, name=f"{name}.conv1")
    return g.conv(x, out_ch, 1, bias=False, name=f"{name}.pointwise")


def _block(g: GraphBuilder, x: str, in_ch: int, out_ch: int, reps: int, stride: int,
           start_with_relu: bool, grow_first: bool, name: str, eps: float) -> str:
    # grow_first widens at the first separable conv (entry/middle flow), else at the last (exit)
    widths = [out_ch] * reps if grow_first else [in_ch] * (reps - 1) + [out_ch]
    y, ch = x, in_ch
    for i, width in enumerate(widths, start=1):
        if i > 1 or start_with_relu:
            y = g.act(y, name=f"{name}.relu{i}")
        y = g.bn(_separable(g, y, ch, width, f"{name}.sepconv{i}"), eps, name=f"{name}.bn{i}")
        ch = width
    if stride != 1:
        y = g.max_pool(y, 3, stride, 1, name=f"{name}.pool")
    skip = x
    if stride != 1 or in_ch != out_ch:
        skip = g.bn(g.conv(x, out_ch, 1, stride, bias=False, name=f"{name}.skip"), eps,
                    name=f"{name}.skipbn")
    return g.sum(y, skip, name=name)


@register("xception", input_size=299, reference="timm legacy_xception (= keras.applications "
                                                "Xception)")
def xception(num_classes: int, in_channels: int, input_size: int, dropout: float = 0.0,
             bn_eps: float = 1e-5):
    # bn_eps=1e-3: keras.applications' Xception (its weights' own batch-norm epsilon)
    g = GraphBuilder("xception", in_channels, num_classes, input_size)
    x = g.act(g.bn(g.conv(INPUT, 32, 3, 2, bias=False, name="conv1"), bn_eps, name="bn1"),
              name="relu1")
    x = g.act(g.bn(g.conv(x, 64, 3, bias=False, name="conv2"), bn_eps, name="bn2"), name="relu2")
    ch = 64
    for i, (out_ch, reps, stride, start_relu, grow_first) in enumerate(_BLOCKS, start=1):
        x = _block(g, x, ch, out_ch, reps, stride, start_relu, grow_first, f"block{i}", bn_eps)
        ch = out_ch
    x = g.act(g.bn(_separable(g, x, 1024, 1536, "conv3"), bn_eps, name="bn3"), name="relu3")
    x = g.act(g.bn(_separable(g, x, 1536, 2048, "conv4"), bn_eps, name="bn4"), name="relu4")
    x = g.flatten(g.add(GlobalAvgPool(), x, name="global_pool"), name="flatten")
    x = g.dropout(x, dropout, name="dropout")
    g.dense(x, num_classes, name="fc")
    return g.build()
