"""AlexNet (Krizhevsky, Sutskever, Hinton 2012, "ImageNet Classification with Deep Convolutional
Neural Networks"), laid out exactly as torchvision's ``alexnet``, the single-tower variant it
cites from Krizhevsky 2014 ("One weird trick for parallelizing convolutional neural networks"):
64-192-384-256-256 filters instead of the paper's 96-256-384-384-256, no local response
normalisation, and an adaptive 6x6 average pool before the 4096-4096 classifier so that inputs
other than 224 keep the 9,216-wide classifier input (61,100,840 parameters)."""
from .registry import register
from .spec import INPUT, AdaptiveAvgPool, GraphBuilder

# (filters, kernel, stride, padding, max-pool after it)
_FEATURES = [(64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False),
             (256, 3, 1, 1, False), (256, 3, 1, 1, True)]


@register("alexnet", input_size=224, reference="torchvision alexnet")
def alexnet(num_classes: int, in_channels: int, input_size: int, dropout: float = 0.5):
    g = GraphBuilder("alexnet", in_channels, num_classes, input_size)
    x = INPUT
    for i, (filters, kernel, stride, padding, pool) in enumerate(_FEATURES, start=1):
        x = g.act(g.conv(x, filters, kernel, stride, padding, name=f"conv{i}"), name=f"relu{i}")
        if pool:
            x = g.max_pool(x, 3, 2, name=f"pool{i}")
    x = g.flatten(g.add(AdaptiveAvgPool(6), x, name="avgpool"), name="flatten")
    # torchvision puts dropout *before* each hidden dense layer, not after it as VGG does
    for j in (1, 2):
        x = g.dropout(x, dropout, name=f"fc{j}_dropout")
        x = g.act(g.dense(x, 4096, name=f"fc{j}"), name=f"fc{j}_relu")
    g.dense(x, num_classes, name="fc3")
    return g.build()
