"""What a zoo model is: the zoo's name for it, the architecture it is, its published file."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ZooModel:
    zoo: str                  # torchvision, timm, keras, gluon
    name: str                 # the zoo's own name: resnet50, InceptionV3, vgg16
    arch: str                 # cnnzoo's architecture (architectures.list_archs())
    layout: str               # how its names map to the spec: torch, keras, gluon
    input_size: int           # the size the zoo's model was trained at
    url: str | None = None    # the published file (None: no file published)
    checksum: str | None = None  # "sha256:<hex or prefix>", "md5:<hex>", "sha1:<hex>"
    options: dict = field(default_factory=dict)  # arch.options of a variant ({}: exact)
    num_classes: int = 1000
    # the inputs its weights were trained on, as data.* keys: mean, std (of pixels in [0, 1]),
    # channel_order, crop_fraction, interpolation
    preprocess: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.zoo}:{self.name}"
