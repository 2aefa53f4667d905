"""ResNet-50 (He, Zhang, Ren, Sun 2015, "Deep Residual Learning for Image Recognition") and
ResNeXt-50 32x4d (Xie, Girshick, Dollar, Tu, He 2016, "Aggregated Residual Transformations for
Deep Neural Networks"), laid out exactly as torchvision's ``resnet50`` and ``resnext50_32x4d``.

Both use the same bottleneck (1x1 reduce, 3x3, 1x1 expand by 4; batch norm after every
convolution; convolutions without bias). As in torchvision ("ResNet v1.5") the stride of a
downsampling block sits on the 3x3 convolution, not on the first 1x1 as in the paper; the
projection shortcut is a strided 1x1 convolution plus batch norm. ResNeXt only widens the 3x3 and
splits it into 32 groups. Layer names follow torchvision's parameter names (``layer1.0.conv1``,
``layer1.0.downsample.0``); the output of block ``layer1.0`` is the node named ``layer1.0``."""
from .registry import register
from .spec import INPUT, GlobalAvgPool, GraphBuilder

_STAGES = (3, 4, 6, 3)  # bottleneck blocks per stage of the 50-layer network
_EXPANSION = 4


def _conv_bn(g: GraphBuilder, x: str, out: int, kernel: int, stride: int, padding: int,
             name: str, bn: str, groups: int = 1) -> str:
    return g.bn(g.conv(x, out, kernel, stride, padding, groups, bias=False, name=name), name=bn)


def _bottleneck(g: GraphBuilder, x: str, in_ch: int, planes: int, stride: int, groups: int,
                base_width: int, name: str) -> str:
    width = planes * base_width // 64 * groups
    out_ch = planes * _EXPANSION
    y = g.act(_conv_bn(g, x, width, 1, 1, 0, f"{name}.conv1", f"{name}.bn1"), name=f"{name}.relu1")
    y = g.act(_conv_bn(g, y, width, 3, stride, 1, f"{name}.conv2", f"{name}.bn2", groups),
              name=f"{name}.relu2")
    y = _conv_bn(g, y, out_ch, 1, 1, 0, f"{name}.conv3", f"{name}.bn3")
    shortcut = x
    if stride != 1 or in_ch != out_ch:
        shortcut = _conv_bn(g, x, out_ch, 1, stride, 0, f"{name}.downsample.0",
                            f"{name}.downsample.1")
    return g.act(g.sum(y, shortcut, name=f"{name}.add"), name=name)


def _resnet(name: str, num_classes: int, in_channels: int, input_size: int, groups: int,
            base_width: int):
    g = GraphBuilder(name, in_channels, num_classes, input_size)
    x = g.act(_conv_bn(g, INPUT, 64, 7, 2, 3, "conv1", "bn1"), name="relu")
    x = g.max_pool(x, 3, 2, 1, name="maxpool")
    in_ch = 64
    for stage, blocks in enumerate(_STAGES, start=1):
        planes = 64 * 2 ** (stage - 1)
        for b in range(blocks):
            stride = 2 if stage > 1 and b == 0 else 1
            x = _bottleneck(g, x, in_ch, planes, stride, groups, base_width, f"layer{stage}.{b}")
            in_ch = planes * _EXPANSION
    x = g.flatten(g.add(GlobalAvgPool(), x, name="avgpool"), name="flatten")
    g.dense(x, num_classes, name="fc")
    return g.build()


@register("resnet50", input_size=224, reference="torchvision resnet50")
def resnet50(num_classes: int, in_channels: int, input_size: int):
    return _resnet("resnet50", num_classes, in_channels, input_size, groups=1, base_width=64)


@register("resnext50", input_size=224, aliases=("resnext50_32x4d",),
          reference="torchvision resnext50_32x4d")
def resnext50(num_classes: int, in_channels: int, input_size: int):
    return _resnet("resnext50", num_classes, in_channels, input_size, groups=32, base_width=4)
