"""VGG (Simonyan & Zisserman 2014, "Very Deep Convolutional Networks for Large-Scale Image
Recognition"), laid out exactly as torchvision's ``vgg16``/``vgg19``: 3x3 convolutions with
padding 1 and ReLU, 2x2 max-pooling, an adaptive 7x7 average pool (so smaller inputs keep the
25,088-wide classifier input) and the 4096-4096 classifier with dropout."""
from .registry import register
from .spec import INPUT, AdaptiveAvgPool, GraphBuilder

# configuration "D" (16 weight layers) and "E" (19) of the paper; "M" is a max-pool
_LAYOUTS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


def _vgg(name: str, num_classes: int, in_channels: int, input_size: int, dropout: float):
    g = GraphBuilder(name, in_channels, num_classes, input_size)
    x, block, i = INPUT, 1, 1
    for item in _LAYOUTS[name]:
        if item == "M":
            x = g.max_pool(x, 2, 2, name=f"pool{block}")
            block, i = block + 1, 1
        else:
            x = g.act(g.conv(x, item, 3, padding=1, name=f"conv{block}_{i}"),
                      name=f"relu{block}_{i}")
            i += 1
    x = g.flatten(g.add(AdaptiveAvgPool(7), x, name="avgpool"), name="flatten")
    for j in (1, 2):
        x = g.act(g.dense(x, 4096, name=f"fc{j}"), name=f"fc{j}_relu")
        x = g.dropout(x, dropout, name=f"fc{j}_dropout")
    g.dense(x, num_classes, name="fc3")
    return g.build(init="kaiming_fan_out")  # torchvision's: 13-16 ReLU convs, no batch norm


@register("vgg16", input_size=224, aliases=("vgg",), reference="torchvision vgg16")
def vgg16(num_classes: int, in_channels: int, input_size: int, dropout: float = 0.5):
    return _vgg("vgg16", num_classes, in_channels, input_size, dropout)


@register("vgg19", input_size=224, reference="torchvision vgg19")
def vgg19(num_classes: int, in_channels: int, input_size: int, dropout: float = 0.5):
    return _vgg("vgg19", num_classes, in_channels, input_size, dropout)
