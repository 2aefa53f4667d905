"""LeNet-5 (LeCun, Bottou, Bengio, Haffner 1998, "Gradient-based learning applied to document
recognition"), in its classic textbook form: 32x32 input, tanh, 2x2 average-pool subsampling,
C1-S2-C3-S4-C5-F6-output with 6-16-120-84-10 units. The paper's trainable subsampling coefficients
and RBF output are left out, as in every common re-implementation (61,706 parameters)."""
from .registry import register
from .spec import INPUT, GraphBuilder


@register("lenet5", input_size=32, in_channels=1, num_classes=10,
          reference="LeCun et al. 1998, classic layout")
def lenet5(num_classes: int, in_channels: int, input_size: int, activation: str = "tanh",
           dropout: float = 0.0):
    g = GraphBuilder("lenet5", in_channels, num_classes, input_size)
    x = g.act(g.conv(INPUT, 6, 5, name="c1"), activation, name="c1_act")
    x = g.avg_pool(x, 2, name="s2")
    x = g.act(g.conv(x, 16, 5, name="c3"), activation, name="c3_act")
    x = g.avg_pool(x, 2, name="s4")
    x = g.act(g.conv(x, 120, 5, name="c5"), activation, name="c5_act")
    x = g.flatten(x, name="flatten")
    x = g.act(g.dense(x, 84, name="f6"), activation, name="f6_act")
    if dropout:  # not in the paper (0 adds no node); a regularizer for students to try
        x = g.dropout(x, dropout, name="f6_drop")
    g.dense(x, num_classes, name="output")
    return g.build()
