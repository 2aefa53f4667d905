"""The zoos' models cnnzoo reads: each zoo's own name, the architecture it is, its published
file and the checksum the zoo itself publishes for it (torchvision's file names carry the
SHA-256 prefix torch.hub checks; keras.applications passes an MD5 to ``get_file``; the Gluon
model store keeps each file's SHA-1, its files lying zipped on Apache's mirror).

Each zoo's name for a model is the one its users type (``torchvision.models.resnet50``,
``timm.create_model("inception_v4")``, ``keras.applications.Xception``,
``gluon.model_zoo.vision.get_model("vgg16")``); a model is named ``<zoo>:<name>``.
"""
from __future__ import annotations

from ..errors import WeightsError
from .model import ZooModel

_TORCHVISION = "https://download.pytorch.org/models/"
_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/"
_GLUON = "https://apache-mxnet.s3-accelerate.dualstack.amazonaws.com/gluon/models/"
_HF = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"


# The inputs each zoo's weights expect (pixels scaled to [0, 1] first, so Keras' "caffe" means
# on 0-255 are divided by 255 and its std of 1 becomes 1/255):
# torchvision, Gluon and timm's torchvision-trained weights: ImageNet's mean/std, RGB, the
# shorter side resized to size / 0.875 and the centre crop (torchvision's eval transform);
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channel_order": "RGB",
            "crop_fraction": 0.875, "interpolation": "bilinear"}
# timm's TF-ported inception weights: [-1, 1] inputs, bicubic, its per-model crop fraction;
_TF_INCEPTION = {"mean": [0.5] * 3, "std": [0.5] * 3, "channel_order": "RGB",
                 "interpolation": "bicubic"}
# Keras "caffe" mode (VGG, ResNet50): BGR, the Caffe means subtracted on 0-255, no scaling;
KERAS_CAFFE = {"mean": [103.939 / 255, 116.779 / 255, 123.68 / 255], "std": [1 / 255] * 3,
               "channel_order": "BGR", "crop_fraction": None, "interpolation": "bilinear"}
# Keras "tf" mode (Inception, Xception): [-1, 1]; keras.applications resizes the whole image.
KERAS_TF = {"mean": [0.5] * 3, "std": [0.5] * 3, "channel_order": "RGB", "crop_fraction": None,
            "interpolation": "bilinear"}


def _tv(name: str, arch: str, file: str, size: int = 224) -> ZooModel:
    return ZooModel("torchvision", name, arch, "torch", size, _TORCHVISION + file,
                    "sha256:" + file.rsplit("-", 1)[1].split(".")[0], preprocess=IMAGENET)


def _keras(name: str, arch: str, folder: str, md5: str, size: int, preprocess: dict,
           **options) -> ZooModel:
    file = f"{folder}/{folder}_weights_tf_dim_ordering_tf_kernels.h5"
    return ZooModel("keras", name, arch, "keras", size, _KERAS + file, "md5:" + md5,
                    options=options, preprocess=preprocess)


def _gluon(name: str, arch: str, sha1: str, size: int = 224) -> ZooModel:
    return ZooModel("gluon", name, arch, "gluon", size, f"{_GLUON}{name}-{sha1[:8]}.zip",
                    "sha1:" + sha1, preprocess=IMAGENET)


def _timm_hub(name: str, arch: str, hub: str, size: int, preprocess: dict) -> ZooModel:
    # timm's hub files: its code names no checksum, so a download cannot be checked and is
    # refused; a file the user downloaded is read like any other
    return ZooModel("timm", name, arch, "torch", size, _HF.format(hub), None,
                    preprocess=preprocess)


MODELS: tuple[ZooModel, ...] = (
    _tv("alexnet", "alexnet", "alexnet-owt-7be5be79.pth"),
    _tv("vgg16", "vgg16", "vgg16-397923af.pth"),
    _tv("vgg19", "vgg19", "vgg19-dcbb9e9d.pth"),
    _tv("googlenet", "inception_v1", "googlenet-1378be20.pth"),
    _tv("inception_v3", "inception_v3", "inception_v3_google-0cc3c7bd.pth", 299),
    _tv("resnet50", "resnet50", "resnet50-0676ba61.pth"),
    _tv("resnext50_32x4d", "resnext50", "resnext50_32x4d-7cdf4587.pth"),
    _timm_hub("inception_v4", "inception_v4", "inception_v4.tf_in1k", 299,
              {**_TF_INCEPTION, "crop_fraction": 0.875}),
    _timm_hub("inception_resnet_v2", "inception_resnet_v2", "inception_resnet_v2.tf_in1k", 299,
              {**_TF_INCEPTION, "crop_fraction": 0.8975}),
    _timm_hub("legacy_xception", "xception", "legacy_xception.tf_in1k", 299,
              {**_TF_INCEPTION, "crop_fraction": 0.8975}),
    _timm_hub("resnet50", "resnet50", "resnet50.tv_in1k", 224, IMAGENET),
    _timm_hub("resnext50_32x4d", "resnext50", "resnext50_32x4d.tv_in1k", 224, IMAGENET),
    _timm_hub("inception_v3", "inception_v3", "inception_v3.tv_in1k", 299, IMAGENET),
    _timm_hub("vgg16", "vgg16", "vgg16.tv_in1k", 224, IMAGENET),
    _timm_hub("vgg19", "vgg19", "vgg19.tv_in1k", 224, IMAGENET),
    _keras("VGG16", "vgg16", "vgg16", "64373286793e3c8b2b4e3219cbf3544b", 224, KERAS_CAFFE),
    _keras("VGG19", "vgg19", "vgg19", "cbe5617147190e668d6c5d5026f83318", 224, KERAS_CAFFE),
    _keras("InceptionV3", "inception_v3", "inception_v3", "9a0d58056eeedaa3f26cb7ebd46da564",
           299, KERAS_TF, count_include_pad=False),
    _keras("InceptionResNetV2", "inception_resnet_v2", "inception_resnet_v2",
           "e693bd0210a403b3192acc6073ad2e96", 299, KERAS_TF),
    _gluon("alexnet", "alexnet", "44335d1f0046b328243b32a26a4fbd62d9057b45"),
    _gluon("vgg16", "vgg16", "e660d4569ccb679ec68f1fd3cce07a387252a90a"),
    _gluon("vgg19", "vgg19", "ad2f660d101905472b83590b59708b71ea22b2e5"),
    _gluon("inceptionv3", "inception_v3", "ed47ec45a937b656fcc94dabde85495bbef5ba1f", 299),
)

# models a zoo has that are another network than cnnzoo's architecture: refused in one line
NOT_OFFERED: dict[str, str] = {
    "keras:ResNet50": "Keras' ResNet50 is ResNet v1 (stride in the first 1x1 convolution, "
                      "convolutions with bias); cnnzoo's resnet50 is torchvision's v1.5",
    "keras:Xception": "Keras' Xception pads its stride-2 max-pools 'same' (on the right only "
                      "where a map is even: at 299 px, block3's pool on 74x74), cnnzoo's "
                      "xception symmetrically as timm's legacy_xception; the two compute the "
                      "same only at sizes such as 71 (its file reads with "
                      "arch.options.bn_eps=0.001 there)",
    "gluon:resnet50_v1": "Gluon's resnet50_v1 puts the stride in the first 1x1 convolution "
                         "(ResNet v1); cnnzoo's resnet50 is torchvision's v1.5",
    "gluon:resnet50_v2": "Gluon's resnet50_v2 is the pre-activation ResNet (v2), another "
                         "network than cnnzoo's resnet50",
}


def find(model_id: str) -> ZooModel:
    """The zoo model named ``<zoo>:<name>`` (one line naming the choices otherwise)."""
    for m in MODELS:
        if m.id == model_id or m.id.lower() == model_id.lower():
            return m
    for refused, why in NOT_OFFERED.items():
        if refused.lower() == model_id.lower():
            raise WeightsError(f"{refused} is not offered: {why}")
    raise WeightsError(f"unknown zoo model '{model_id}': choose one of "
                       f"{', '.join(m.id for m in MODELS)}")


def is_zoo_name(source: str) -> bool:
    """``torchvision:resnet50`` names a zoo model; a path (even ``C:\\x``) does not."""
    zoo, sep, _ = source.partition(":")
    return bool(sep) and zoo.lower() in {m.zoo for m in MODELS}
