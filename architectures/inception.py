"""The Inception family, each laid out exactly as its reference implementation:

- ``inception_v1`` (GoogLeNet; Szegedy et al. 2014, "Going Deeper with Convolutions") as
  torchvision's ``googlenet``: batch norm (eps 1e-3) after every convolution as in the
  TensorFlow port torchvision's weights come from, ceil-mode max-pools, and a 3x3 convolution in
  the "5x5" branch (torchvision issue #906; the paper has 5x5);
- ``inception_v3`` (Szegedy et al. 2015, "Rethinking the Inception Architecture for Computer
  Vision") as torchvision's ``inception_v3`` (``count_include_pad=False``: Keras' InceptionV3,
  whose average pools leave the padding out);
- ``inception_v4`` and ``inception_resnet_v2`` (Szegedy, Ioffe, Vanhoucke, Alemi 2016,
  "Inception-v4, Inception-ResNet and the Impact of Residual Connections on Learning") as timm's
  ``inception_v4`` and ``inception_resnet_v2``.

All four build on the same unit: a convolution without bias, batch norm with eps 1e-3 and ReLU
(``BasicConv2d``), whose nodes are ``<name>.conv``, ``<name>.bn`` and ``<name>.relu``. Names follow
the reference's parameter names (``inception3a.branch2.1.conv``, ``Mixed_5b.branch1x1.conv``,
``repeat.0.branch1.1.conv``); a block's output is the node named after the block
(``inception3a``, ``Mixed_6e``, ``repeat.9``). timm's ``inception_v4`` keeps its blocks in one
``features`` sequence; here they carry their TF-slim names instead: features.0-2 are
Conv2d_1a_3x3, Conv2d_2a_3x3, Conv2d_2b_3x3; 3-5 Mixed_3a, Mixed_4a, Mixed_5a; 6-9 Mixed_5b-5e;
10 Mixed_6a; 11-17 Mixed_6b-6h; 18 Mixed_7a; 19-21 Mixed_7b-7d.

Auxiliary classifiers (``aux_logits=True``, GoogLeNet and Inception-v3) are extra nodes branching
off the trunk, declared as the Spec's ``aux_outputs``: backends add their losses in training,
weighted as in the papers (GoogLeNet 0.3; Inception-v3 0.4, TF-slim's weight), and leave them out
of inference and export."""
from .registry import register
from .spec import INPUT, AdaptiveAvgPool, GlobalAvgPool, GraphBuilder, Scale


def basic_conv(g: GraphBuilder, x: str, out: int, kernel, name: str, stride=1, padding=0) -> str:
    """Conv (no bias) + BatchNorm(eps=1e-3) + ReLU, the unit of every Inception network."""
    x = g.conv(x, out, kernel, stride, padding, bias=False, name=f"{name}.conv")
    return g.act(g.bn(x, eps=1e-3, name=f"{name}.bn"), name=f"{name}.relu")


def _chain(g: GraphBuilder, x: str, name: str, convs) -> str:
    """A branch of BasicConv2d layers ``(out, kernel, stride, padding)`` named name.0, name.1..."""
    for i, (out, kernel, stride, padding) in enumerate(convs):
        x = basic_conv(g, x, out, kernel, f"{name}.{i}", stride, padding)
    return x


def _classifier(g: GraphBuilder, x: str, dropout: float, fc: str, pool: str = "avgpool",
                dropout_before_flatten: bool = False) -> str:
    x = g.add(GlobalAvgPool(), x, name=pool)
    if dropout_before_flatten:  # torchvision's inception_v3 order (equivalent, kept for fidelity)
        x = g.flatten(g.dropout(x, dropout, name="dropout"), name="flatten")
    else:
        x = g.dropout(g.flatten(x, name="flatten"), dropout, name="dropout")
    return g.dense(x, g.num_classes, name=fc)


# --------------------------------------------------------------------------- GoogLeNet
# (1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection) per Inception block
_V1_BLOCKS = {
    "inception3a": (64, 96, 128, 16, 32, 32), "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64), "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64), "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128), "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


def _v1_block(g: GraphBuilder, x: str, name: str) -> str:
    c1, c3r, c3, c5r, c5, pool_proj = _V1_BLOCKS[name]
    b1 = basic_conv(g, x, c1, 1, f"{name}.branch1")
    b2 = _chain(g, x, f"{name}.branch2", [(c3r, 1, 1, 0), (c3, 3, 1, 1)])
    b3 = _chain(g, x, f"{name}.branch3", [(c5r, 1, 1, 0), (c5, 3, 1, 1)])  # 5x5 in the paper
    b4 = g.max_pool(x, 3, 1, 1, ceil_mode=True, name=f"{name}.branch4.0")
    b4 = basic_conv(g, b4, pool_proj, 1, f"{name}.branch4.1")
    return g.concat(b1, b2, b3, b4, name=name)


def _v1_aux(g: GraphBuilder, x: str, name: str, dropout: float) -> str:
    x = g.add(AdaptiveAvgPool(4), x, name=f"{name}.avgpool")
    x = g.flatten(basic_conv(g, x, 128, 1, f"{name}.conv"), name=f"{name}.flatten")
    x = g.act(g.dense(x, 1024, name=f"{name}.fc1"), name=f"{name}.fc1_relu")
    return g.dense(g.dropout(x, dropout, name=f"{name}.dropout"), g.num_classes,
                   name=f"{name}.fc2")


@register("inception_v1", input_size=224, aliases=("googlenet",),
          reference="torchvision googlenet")
def inception_v1(num_classes: int, in_channels: int, input_size: int, dropout: float = 0.2,
                 aux_logits: bool = False, aux_dropout: float = 0.7):
    g = GraphBuilder("inception_v1", in_channels, num_classes, input_size)
    x = basic_conv(g, INPUT, 64, 7, "conv1", stride=2, padding=3)
    x = g.max_pool(x, 3, 2, ceil_mode=True, name="maxpool1")
    x = basic_conv(g, x, 64, 1, "conv2")
    x = basic_conv(g, x, 192, 3, "conv3", padding=1)
    x = g.max_pool(x, 3, 2, ceil_mode=True, name="maxpool2")
    aux = []
    for name in _V1_BLOCKS:
        x = _v1_block(g, x, name)
        if name == "inception3b":
            x = g.max_pool(x, 3, 2, ceil_mode=True, name="maxpool3")
        elif name == "inception4e":
            x = g.max_pool(x, 2, 2, ceil_mode=True, name="maxpool4")
        elif aux_logits and name in ("inception4a", "inception4d"):
            aux.append(_v1_aux(g, x, "aux1" if name == "inception4a" else "aux2", aux_dropout))
    _classifier(g, x, dropout, "fc")
    return g.build(aux_outputs=tuple(aux), aux_weight=0.3)


# --------------------------------------------------------------------------- Inception-v3
def _v3_a(g, x, name, pool_features, include_pad):  # 35x35
    b1 = basic_conv(g, x, 64, 1, f"{name}.branch1x1")
    b5 = basic_conv(g, x, 48, 1, f"{name}.branch5x5_1")
    b5 = basic_conv(g, b5, 64, 5, f"{name}.branch5x5_2", padding=2)
    b3 = basic_conv(g, x, 64, 1, f"{name}.branch3x3dbl_1")
    b3 = basic_conv(g, b3, 96, 3, f"{name}.branch3x3dbl_2", padding=1)
    b3 = basic_conv(g, b3, 96, 3, f"{name}.branch3x3dbl_3", padding=1)
    bp = g.avg_pool(x, 3, 1, 1, count_include_pad=include_pad, name=f"{name}.avgpool")
    bp = basic_conv(g, bp, pool_features, 1, f"{name}.branch_pool")
    return g.concat(b1, b5, b3, bp, name=name)


def _v3_b(g, x, name):  # 35x35 -> 17x17
    b3 = basic_conv(g, x, 384, 3, f"{name}.branch3x3", stride=2)
    bd = basic_conv(g, x, 64, 1, f"{name}.branch3x3dbl_1")
    bd = basic_conv(g, bd, 96, 3, f"{name}.branch3x3dbl_2", padding=1)
    bd = basic_conv(g, bd, 96, 3, f"{name}.branch3x3dbl_3", stride=2)
    bp = g.max_pool(x, 3, 2, name=f"{name}.maxpool")
    return g.concat(b3, bd, bp, name=name)


def _v3_c(g, x, name, c7, include_pad):  # 17x17, factorised 7x7
    b1 = basic_conv(g, x, 192, 1, f"{name}.branch1x1")
    b7 = basic_conv(g, x, c7, 1, f"{name}.branch7x7_1")
    b7 = basic_conv(g, b7, c7, (1, 7), f"{name}.branch7x7_2", padding=(0, 3))
    b7 = basic_conv(g, b7, 192, (7, 1), f"{name}.branch7x7_3", padding=(3, 0))
    bd = basic_conv(g, x, c7, 1, f"{name}.branch7x7dbl_1")
    for i, (out, kernel, pad) in enumerate([(c7, (7, 1), (3, 0)), (c7, (1, 7), (0, 3)),
                                            (c7, (7, 1), (3, 0)), (192, (1, 7), (0, 3))], start=2):
        bd = basic_conv(g, bd, out, kernel, f"{name}.branch7x7dbl_{i}", padding=pad)
    bp = g.avg_pool(x, 3, 1, 1, count_include_pad=include_pad, name=f"{name}.avgpool")
    bp = basic_conv(g, bp, 192, 1, f"{name}.branch_pool")
    return g.concat(b1, b7, bd, bp, name=name)


def _v3_d(g, x, name):  # 17x17 -> 8x8
    b3 = basic_conv(g, x, 192, 1, f"{name}.branch3x3_1")
    b3 = basic_conv(g, b3, 320, 3, f"{name}.branch3x3_2", stride=2)
    b7 = basic_conv(g, x, 192, 1, f"{name}.branch7x7x3_1")
    b7 = basic_conv(g, b7, 192, (1, 7), f"{name}.branch7x7x3_2", padding=(0, 3))
    b7 = basic_conv(g, b7, 192, (7, 1), f"{name}.branch7x7x3_3", padding=(3, 0))
    b7 = basic_conv(g, b7, 192, 3, f"{name}.branch7x7x3_4", stride=2)
    bp = g.max_pool(x, 3, 2, name=f"{name}.maxpool")
    return g.concat(b3, b7, bp, name=name)


def _split_1x3_3x1(g, x, out, name, a, b):
    """The expanded-filter-bank pair of v3's 8x8 blocks: 1x3 and 3x1 side by side."""
    return g.concat(basic_conv(g, x, out, (1, 3), f"{name}_{a}", padding=(0, 1)),
                    basic_conv(g, x, out, (3, 1), f"{name}_{b}", padding=(1, 0)), name=name)


def _v3_e(g, x, name, include_pad):  # 8x8
    b1 = basic_conv(g, x, 320, 1, f"{name}.branch1x1")
    b3 = basic_conv(g, x, 384, 1, f"{name}.branch3x3_1")
    b3 = _split_1x3_3x1(g, b3, 384, f"{name}.branch3x3", "2a", "2b")
    bd = basic_conv(g, x, 448, 1, f"{name}.branch3x3dbl_1")
    bd = basic_conv(g, bd, 384, 3, f"{name}.branch3x3dbl_2", padding=1)
    bd = _split_1x3_3x1(g, bd, 384, f"{name}.branch3x3dbl", "3a", "3b")
    bp = g.avg_pool(x, 3, 1, 1, count_include_pad=include_pad, name=f"{name}.avgpool")
    bp = basic_conv(g, bp, 192, 1, f"{name}.branch_pool")
    return g.concat(b1, b3, bd, bp, name=name)


def _v3_aux(g, x):
    x = g.avg_pool(x, 5, 3, name="AuxLogits.avgpool")
    x = basic_conv(g, x, 128, 1, "AuxLogits.conv0")
    x = basic_conv(g, x, 768, 5, "AuxLogits.conv1")
    x = g.flatten(g.add(GlobalAvgPool(), x, name="AuxLogits.global_pool"),
                  name="AuxLogits.flatten")
    return g.dense(x, g.num_classes, name="AuxLogits.fc")


def _slim_stem(g: GraphBuilder, names) -> str:
    """The stem Inception-v3 and Inception-ResNet-v2 share (299 -> 35x35x192); ``names`` are
    each reference's own names for its five convolutions and two max-pools, in order."""
    c1a, c2a, c2b, pool1, c3b, c4a, pool2 = names
    x = basic_conv(g, INPUT, 32, 3, c1a, stride=2)
    x = basic_conv(g, x, 32, 3, c2a)
    x = basic_conv(g, x, 64, 3, c2b, padding=1)
    x = g.max_pool(x, 3, 2, name=pool1)
    x = basic_conv(g, x, 80, 1, c3b)
    x = basic_conv(g, x, 192, 3, c4a)
    return g.max_pool(x, 3, 2, name=pool2)


@register("inception_v3", input_size=299, reference="torchvision inception_v3")
def inception_v3(num_classes: int, in_channels: int, input_size: int, dropout: float = 0.5,
                 aux_logits: bool = False, count_include_pad: bool = True):
    # count_include_pad=False: the 3x3 average pools of the blocks leave the zero padding out of
    # the average, as keras.applications' InceptionV3 (TensorFlow's pooling) does
    g = GraphBuilder("inception_v3", in_channels, num_classes, input_size)
    x = _slim_stem(g, ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
                       "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2"))
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
        x = _v3_a(g, x, name, pool_features, count_include_pad)
    x = _v3_b(g, x, "Mixed_6a")
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        x = _v3_c(g, x, name, c7, count_include_pad)
    aux = (_v3_aux(g, x),) if aux_logits else ()
    x = _v3_d(g, x, "Mixed_7a")
    x = _v3_e(g, x, "Mixed_7b", count_include_pad)
    x = _v3_e(g, x, "Mixed_7c", count_include_pad)
    _classifier(g, x, dropout, "fc", dropout_before_flatten=True)
    return g.build(aux_outputs=aux, aux_weight=0.4)


# --------------------------------------------------------------------------- Inception-v4
def _avgpool_branch(g, x, out, name):
    # timm's v4 and Inception-ResNet-v2 exclude the zero padding from the average
    x = g.avg_pool(x, 3, 1, 1, count_include_pad=False, name=f"{name}.0")
    return basic_conv(g, x, out, 1, f"{name}.1")


def _v4_stem(g, x):  # 299 -> 35x35x384
    x = basic_conv(g, x, 32, 3, "Conv2d_1a_3x3", stride=2)
    x = basic_conv(g, x, 32, 3, "Conv2d_2a_3x3")
    x = basic_conv(g, x, 64, 3, "Conv2d_2b_3x3", padding=1)
    x = g.concat(g.max_pool(x, 3, 2, name="Mixed_3a.maxpool"),
                 basic_conv(g, x, 96, 3, "Mixed_3a.conv", stride=2), name="Mixed_3a")
    b0 = _chain(g, x, "Mixed_4a.branch0", [(64, 1, 1, 0), (96, 3, 1, 0)])
    b1 = _chain(g, x, "Mixed_4a.branch1", [(64, 1, 1, 0), (64, (1, 7), 1, (0, 3)),
                                           (64, (7, 1), 1, (3, 0)), (96, 3, 1, 0)])
    x = g.concat(b0, b1, name="Mixed_4a")
    return g.concat(basic_conv(g, x, 192, 3, "Mixed_5a.conv", stride=2),
                    g.max_pool(x, 3, 2, name="Mixed_5a.maxpool"), name="Mixed_5a")


def _v4_a(g, x, name):  # 35x35x384
    b0 = basic_conv(g, x, 96, 1, f"{name}.branch0")
    b1 = _chain(g, x, f"{name}.branch1", [(64, 1, 1, 0), (96, 3, 1, 1)])
    b2 = _chain(g, x, f"{name}.branch2", [(64, 1, 1, 0), (96, 3, 1, 1), (96, 3, 1, 1)])
    return g.concat(b0, b1, b2, _avgpool_branch(g, x, 96, f"{name}.branch3"), name=name)


def _v4_reduction_a(g, x, name):  # 35x35 -> 17x17x1024
    b0 = basic_conv(g, x, 384, 3, f"{name}.branch0", stride=2)
    b1 = _chain(g, x, f"{name}.branch1", [(192, 1, 1, 0), (224, 3, 1, 1), (256, 3, 2, 0)])
    return g.concat(b0, b1, g.max_pool(x, 3, 2, name=f"{name}.branch2"), name=name)


def _v4_b(g, x, name):  # 17x17x1024
    b0 = basic_conv(g, x, 384, 1, f"{name}.branch0")
    b1 = _chain(g, x, f"{name}.branch1", [(192, 1, 1, 0), (224, (1, 7), 1, (0, 3)),
                                          (256, (7, 1), 1, (3, 0))])
    b2 = _chain(g, x, f"{name}.branch2", [(192, 1, 1, 0), (192, (7, 1), 1, (3, 0)),
                                          (224, (1, 7), 1, (0, 3)), (224, (7, 1), 1, (3, 0)),
                                          (256, (1, 7), 1, (0, 3))])
    return g.concat(b0, b1, b2, _avgpool_branch(g, x, 128, f"{name}.branch3"), name=name)


def _v4_reduction_b(g, x, name):  # 17x17 -> 8x8x1536
    b0 = _chain(g, x, f"{name}.branch0", [(192, 1, 1, 0), (192, 3, 2, 0)])
    b1 = _chain(g, x, f"{name}.branch1", [(256, 1, 1, 0), (256, (1, 7), 1, (0, 3)),
                                          (320, (7, 1), 1, (3, 0)), (320, 3, 2, 0)])
    return g.concat(b0, b1, g.max_pool(x, 3, 2, name=f"{name}.branch2"), name=name)


def _v4_c(g, x, name):  # 8x8x1536
    b0 = basic_conv(g, x, 256, 1, f"{name}.branch0")
    b1 = basic_conv(g, x, 384, 1, f"{name}.branch1_0")
    b1 = g.concat(basic_conv(g, b1, 256, (1, 3), f"{name}.branch1_1a", padding=(0, 1)),
                  basic_conv(g, b1, 256, (3, 1), f"{name}.branch1_1b", padding=(1, 0)),
                  name=f"{name}.branch1")
    b2 = basic_conv(g, x, 384, 1, f"{name}.branch2_0")
    b2 = basic_conv(g, b2, 448, (3, 1), f"{name}.branch2_1", padding=(1, 0))
    b2 = basic_conv(g, b2, 512, (1, 3), f"{name}.branch2_2", padding=(0, 1))
    b2 = g.concat(basic_conv(g, b2, 256, (1, 3), f"{name}.branch2_3a", padding=(0, 1)),
                  basic_conv(g, b2, 256, (3, 1), f"{name}.branch2_3b", padding=(1, 0)),
                  name=f"{name}.branch2")
    return g.concat(b0, b1, b2, _avgpool_branch(g, x, 256, f"{name}.branch3"), name=name)


@register("inception_v4", input_size=299, reference="timm inception_v4")
def inception_v4(num_classes: int, in_channels: int, input_size: int, dropout: float = 0.0):
    g = GraphBuilder("inception_v4", in_channels, num_classes, input_size)
    x = _v4_stem(g, INPUT)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_5e"):
        x = _v4_a(g, x, name)
    x = _v4_reduction_a(g, x, "Mixed_6a")
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_6f", "Mixed_6g",
                 "Mixed_6h"):
        x = _v4_b(g, x, name)
    x = _v4_reduction_b(g, x, "Mixed_7a")
    for name in ("Mixed_7b", "Mixed_7c", "Mixed_7d"):
        x = _v4_c(g, x, name)
    _classifier(g, x, dropout, "last_linear", pool="global_pool")
    return g.build()


# --------------------------------------------------------------------------- Inception-ResNet-v2
def _residual(g, x, branches, channels, scale, name, relu=True):
    """Concat the branches, project back with a biased 1x1 conv, scale, add, (ReLU)."""
    up = g.conv(g.concat(*branches, name=f"{name}.concat"), channels, 1, name=f"{name}.conv2d")
    if scale != 1.0:  # the last Block8 has scale 1: no Scale node for a no-op
        up = g.add(Scale(scale), up, name=f"{name}.scale")
    if not relu:
        return g.sum(up, x, name=name)
    return g.act(g.sum(up, x, name=f"{name}.add"), name=name)


def _block35(g, x, name, scale=0.17):  # 35x35x320
    b0 = basic_conv(g, x, 32, 1, f"{name}.branch0")
    b1 = _chain(g, x, f"{name}.branch1", [(32, 1, 1, 0), (32, 3, 1, 1)])
    b2 = _chain(g, x, f"{name}.branch2", [(32, 1, 1, 0), (48, 3, 1, 1), (64, 3, 1, 1)])
    return _residual(g, x, (b0, b1, b2), 320, scale, name)


def _block17(g, x, name, scale=0.10):  # 17x17x1088
    b0 = basic_conv(g, x, 192, 1, f"{name}.branch0")
    b1 = _chain(g, x, f"{name}.branch1", [(128, 1, 1, 0), (160, (1, 7), 1, (0, 3)),
                                          (192, (7, 1), 1, (3, 0))])
    return _residual(g, x, (b0, b1), 1088, scale, name)


def _block8(g, x, name, scale=0.20, relu=True):  # 8x8x2080
    b0 = basic_conv(g, x, 192, 1, f"{name}.branch0")
    b1 = _chain(g, x, f"{name}.branch1", [(192, 1, 1, 0), (224, (1, 3), 1, (0, 1)),
                                          (256, (3, 1), 1, (1, 0))])
    return _residual(g, x, (b0, b1), 2080, scale, name, relu)


@register("inception_resnet_v2", input_size=299, reference="timm inception_resnet_v2")
def inception_resnet_v2(num_classes: int, in_channels: int, input_size: int,
                        dropout: float = 0.0):
    g = GraphBuilder("inception_resnet_v2", in_channels, num_classes, input_size)
    x = _slim_stem(g, ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b",
                       "conv2d_4a", "maxpool_5a"))
    b0 = basic_conv(g, x, 96, 1, "mixed_5b.branch0")
    b1 = _chain(g, x, "mixed_5b.branch1", [(48, 1, 1, 0), (64, 5, 1, 2)])
    b2 = _chain(g, x, "mixed_5b.branch2", [(64, 1, 1, 0), (96, 3, 1, 1), (96, 3, 1, 1)])
    x = g.concat(b0, b1, b2, _avgpool_branch(g, x, 64, "mixed_5b.branch3"), name="mixed_5b")
    for i in range(10):
        x = _block35(g, x, f"repeat.{i}")
    b0 = basic_conv(g, x, 384, 3, "mixed_6a.branch0", stride=2)
    b1 = _chain(g, x, "mixed_6a.branch1", [(256, 1, 1, 0), (256, 3, 1, 1), (384, 3, 2, 0)])
    x = g.concat(b0, b1, g.max_pool(x, 3, 2, name="mixed_6a.branch2"), name="mixed_6a")
    for i in range(20):
        x = _block17(g, x, f"repeat_1.{i}")
    b0 = _chain(g, x, "mixed_7a.branch0", [(256, 1, 1, 0), (384, 3, 2, 0)])
    b1 = _chain(g, x, "mixed_7a.branch1", [(256, 1, 1, 0), (288, 3, 2, 0)])
    b2 = _chain(g, x, "mixed_7a.branch2", [(256, 1, 1, 0), (288, 3, 1, 1), (320, 3, 2, 0)])
    x = g.concat(b0, b1, b2, g.max_pool(x, 3, 2, name="mixed_7a.branch3"), name="mixed_7a")
    for i in range(9):
        x = _block8(g, x, f"repeat_2.{i}")
    x = _block8(g, x, "block8", scale=1.0, relu=False)
    x = basic_conv(g, x, 1536, 1, "conv2d_7b")
    _classifier(g, x, dropout, "classif", pool="global_pool")
    return g.build()
