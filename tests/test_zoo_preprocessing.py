"""The preprocessing that comes with pretrained weights (``finetune.preprocess: weights``):
torchvision's eval transform (shorter side to size / 0.875, centre crop) and Keras' "caffe"
mode (BGR, Caffe's means on 0-255) as steps of the one preprocessing contract, so every backend,
the ONNX metadata and ``predict`` apply the same."""
import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from cnnzoo.app.experiment import compose, prepare
from cnnzoo.app.predict import load_model
from cnnzoo.core.data import Preprocess
from cnnzoo.core.zoo.catalog import IMAGENET, KERAS_CAFFE


@pytest.mark.parametrize("h, w", [(40, 64), (64, 40), (50, 50)])
def test_the_shorter_side_resize_and_centre_crop_is_pillows(h, w):
    rng = np.random.default_rng(0)
    image = rng.uniform(size=(h, w)).astype(np.float32)
    pre = Preprocess(24, 1, (0.0,), (1.0,), "bilinear", crop_fraction=0.875)
    got = pre.batch([image[:, :, None]])[0, 0]
    short = int(24 / 0.875)  # torchvision: Resize(int(size / crop_pct)), CenterCrop(size)
    rh, rw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    ref = np.asarray(Image.fromarray(image, "F").resize((rw, rh), Image.BILINEAR))
    top, left = int(round((rh - 24) / 2)), int(round((rw - 24) / 2))
    np.testing.assert_allclose(got, ref[top:top + 24, left:left + 24], atol=1e-6)


def test_bgr_reverses_the_planes_before_normalising():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 128, 0
    pre = Preprocess(4, 3, tuple(KERAS_CAFFE["mean"]), tuple(KERAS_CAFFE["std"]),
                     channel_order="BGR")
    out = pre(rgb)  # Keras' "caffe" mode: pixel (0-255) minus the Caffe mean, blue first
    np.testing.assert_allclose(out[:, 0, 0], [0 - 103.939, 128 - 116.779, 255 - 123.68],
                               rtol=1e-5)


def test_a_zoo_models_preprocessing_replaces_the_data_configs():
    cfg = compose("arch=vgg16", "arch.input_size=32", "data=synthetic", "data.limit=8",
                  "arch.in_channels=3", "finetune.weights=keras:VGG16")
    pre = prepare(cfg).preprocess
    assert (pre.channel_order, pre.crop_fraction) == ("BGR", None)
    assert pre.mean == pytest.approx(KERAS_CAFFE["mean"]) and pre.std[0] == pytest.approx(1 / 255)
    cfg = compose("arch=resnet50", "arch.input_size=32", "data=synthetic", "data.limit=8",
                  "arch.in_channels=3", "finetune.weights=torchvision:resnet50")
    pre = prepare(cfg).preprocess
    assert (pre.mean, pre.crop_fraction) == (tuple(IMAGENET["mean"]), 0.875)
    cfg = compose("arch=resnet50", "arch.input_size=32", "data=synthetic", "data.limit=8",
                  "arch.in_channels=3", "finetune.weights=torchvision:resnet50",
                  "finetune.preprocess=data")  # the user's own choice stays
    pre = prepare(cfg).preprocess
    assert (pre.mean, pre.crop_fraction, pre.channel_order) == ((0.5,) * 3, None, "RGB")


def test_the_onnx_model_carries_the_preprocessing_and_predict_applies_it(tmp_path):
    r = run_cli(tmp_path / "run", "trainer.max_epochs=1", "data.limit=200", "arch.in_channels=3",
                "data.channel_order=BGR", "data.crop_fraction=0.875", "data.mean=[0.4,0.5,0.6]",
                "trainer.progress_bar=false", "export.num_images=8", "export.batch_sizes=[8]")
    assert r.returncode == 0, r.stderr[-3000:]
    _, pre, _ = load_model(tmp_path / "run/model.onnx")
    assert (pre.channel_order, pre.crop_fraction, pre.mean) == ("BGR", 0.875, (0.4, 0.5, 0.6))
