"""Every registered architecture against its reference: parameter counts, well-known intermediate
shapes, input-size handling, the torch module built from the spec, and the conf/arch yaml files."""
import pytest
import torch
from conftest import ROOT, compose_cfg

from architectures import ShapeError, arch_info, build_spec, list_archs
from cnnzoo.app.validate import validate
from runners.torch.model import SpecModule

CONF = ROOT / "conf"

# learnable parameters of the reference implementations (canonical classes and channels)
PARAMS = {
    "lenet5": 61_706,
    "alexnet": 61_100_840,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "inception_v1": 6_624_904,
    "inception_v3": 23_834_568,
    "inception_v4": 42_679_816,
    "inception_resnet_v2": 55_843_464,
    "resnet50": 25_557_032,
    "resnext50": 25_028_904,
    "xception": 22_855_952,
}
AUX_PARAMS = {"inception_v1": 13_004_888, "inception_v3": 27_161_264}

# (node, output shape at the canonical input) from the references' own shape comments / papers
SHAPES = {
    "lenet5": [("c1", (6, 28, 28)), ("s4", (16, 5, 5)), ("c5", (120, 1, 1)), ("f6", (84,))],
    "alexnet": [("conv1", (64, 55, 55)), ("pool1", (64, 27, 27)), ("pool2", (192, 13, 13)),
                ("conv5", (256, 13, 13)), ("pool5", (256, 6, 6)), ("flatten", (9216,))],
    "vgg16": [("conv1_1", (64, 224, 224)), ("conv3_3", (256, 56, 56)), ("pool5", (512, 7, 7)),
              ("flatten", (25088,))],
    "vgg19": [("conv3_4", (256, 56, 56)), ("conv5_4", (512, 14, 14)), ("pool5", (512, 7, 7)),
              ("fc2", (4096,))],
    "inception_v1": [("conv1.relu", (64, 112, 112)), ("maxpool1", (64, 56, 56)),
                     ("maxpool2", (192, 28, 28)), ("inception3a", (256, 28, 28)),
                     ("inception3b", (480, 28, 28)), ("inception4a", (512, 14, 14)),
                     ("inception4d", (528, 14, 14)), ("inception4e", (832, 14, 14)),
                     ("maxpool4", (832, 7, 7)), ("inception5b", (1024, 7, 7))],
    "inception_v3": [("Conv2d_1a_3x3.relu", (32, 149, 149)), ("maxpool1", (64, 73, 73)),
                     ("maxpool2", (192, 35, 35)), ("Mixed_5b", (256, 35, 35)),
                     ("Mixed_5d", (288, 35, 35)), ("Mixed_6a", (768, 17, 17)),
                     ("Mixed_6e", (768, 17, 17)), ("Mixed_7a", (1280, 8, 8)),
                     ("Mixed_7b.branch3x3", (768, 8, 8)), ("Mixed_7c", (2048, 8, 8))],
    "inception_v4": [("Conv2d_2b_3x3.relu", (64, 147, 147)), ("Mixed_3a", (160, 73, 73)),
                     ("Mixed_4a", (192, 71, 71)), ("Mixed_5a", (384, 35, 35)),
                     ("Mixed_5e", (384, 35, 35)), ("Mixed_6a", (1024, 17, 17)),
                     ("Mixed_6h", (1024, 17, 17)), ("Mixed_7a", (1536, 8, 8)),
                     ("Mixed_7d", (1536, 8, 8))],
    "inception_resnet_v2": [("conv2d_4a.relu", (192, 71, 71)), ("mixed_5b", (320, 35, 35)),
                            ("repeat.9", (320, 35, 35)), ("mixed_6a", (1088, 17, 17)),
                            ("repeat_1.19", (1088, 17, 17)), ("mixed_7a", (2080, 8, 8)),
                            ("block8", (2080, 8, 8)), ("conv2d_7b.relu", (1536, 8, 8))],
    "resnet50": [("maxpool", (64, 56, 56)), ("layer1.0.conv2", (64, 56, 56)),
                 ("layer1.2", (256, 56, 56)), ("layer2.3", (512, 28, 28)),
                 ("layer3.5", (1024, 14, 14)), ("layer4.2", (2048, 7, 7)), ("flatten", (2048,))],
    "resnext50": [("maxpool", (64, 56, 56)), ("layer1.0.conv2", (128, 56, 56)),
                  ("layer1.2", (256, 56, 56)), ("layer2.3", (512, 28, 28)),
                  ("layer3.5", (1024, 14, 14)), ("layer4.0.conv2", (1024, 7, 7)),
                  ("layer4.2", (2048, 7, 7)), ("flatten", (2048,))],
    "xception": [("relu2", (64, 147, 147)), ("block1", (128, 74, 74)), ("block2", (256, 37, 37)),
                 ("block3", (728, 19, 19)), ("block11", (728, 19, 19)),
                 ("block12", (1024, 10, 10)), ("relu4", (2048, 10, 10))],
}

# (name, options, in_channels) for the torch check; in_channels None: the canonical one
TORCH_CASES = [pytest.param(name, {}, None, id=name) for name in sorted(PARAMS)] + [
    pytest.param(name, {}, 1, id=f"{name}-1ch")
    for name in ("alexnet", "inception_v4", "resnet50", "xception")] + [
    pytest.param(name, {"aux_logits": True}, None, id=f"{name}-aux") for name in sorted(AUX_PARAMS)]


def test_every_architecture_is_covered():
    assert sorted(PARAMS) == list_archs()
    assert set(SHAPES) == set(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_params_match_reference(name):
    spec = build_spec(name)
    assert spec.analyze().params == PARAMS[name]
    assert spec.input_size == arch_info(name).input_size
    assert spec.num_classes == arch_info(name).num_classes


AUX_OUTPUTS = {"inception_v1": ("aux1.fc2", "aux2.fc2"), "inception_v3": ("AuxLogits.fc",)}
AUX_WEIGHTS = {"inception_v1": 0.3, "inception_v3": 0.4}  # GoogLeNet paper; TF-slim for v3


@pytest.mark.parametrize("name", sorted(AUX_PARAMS))
def test_aux_heads(name):
    plain, aux = build_spec(name), build_spec(name, aux_logits=True)
    analysis = aux.analyze()
    assert analysis.params == AUX_PARAMS[name]
    # the main logits stay the spec's output; the aux logits are extra nodes
    assert aux.output == plain.output == "fc"
    assert plain.aux_outputs == () and aux.aux_weight == AUX_WEIGHTS[name]
    assert aux.aux_outputs == AUX_OUTPUTS[name]
    names = {n.name for n in plain.nodes}
    for out in aux.aux_outputs:
        assert out not in names
        assert analysis[out].out_shape == (1000,)


def test_aux_head_shapes():
    v1 = build_spec("inception_v1", aux_logits=True).analyze()
    assert v1["aux1.conv.relu"].out_shape == (128, 4, 4)
    assert v1["aux2.fc1"].in_shape == (2048,)
    assert v1["aux2.avgpool"].in_shape == (528, 14, 14)
    v3 = build_spec("inception_v3", aux_logits=True).analyze()
    assert v3["AuxLogits.avgpool"].out_shape == (768, 5, 5)
    assert v3["AuxLogits.conv1.relu"].out_shape == (768, 1, 1)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_intermediate_shapes(name):
    analysis = build_spec(name).analyze()
    for node, shape in SHAPES[name]:
        assert analysis[node].out_shape == shape, node
    assert analysis.layers[-1].out_shape == (arch_info(name).num_classes,)


def test_googlenet_follows_torchvision_not_the_paper():
    # torchvision's "5x5" branch is a 3x3 convolution (its issue #906)
    layer = build_spec("googlenet").analyze()["inception3a.branch3.1.conv"].node.layer
    assert layer.kernel == 3 and layer.padding == 1


def test_inception_resnet_v2_residual_scales():
    scales = {n.name: n.layer.factor for n in build_spec("inception_resnet_v2").nodes
              if type(n.layer).__name__ == "Scale"}
    assert scales["repeat.0.scale"] == 0.17
    assert scales["repeat_1.0.scale"] == 0.10
    assert scales["repeat_2.8.scale"] == 0.20
    assert len(scales) == 10 + 20 + 9  # the final block8 has scale 1.0 (no node)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_input_sizes_from_minimum_up(name):
    for options in [{}] + ([{"aux_logits": True}] if name in AUX_PARAMS else []):
        spec = build_spec(name, num_classes=7, **options)
        low = spec.min_input_size()
        # min_input_size bisects, which assumes no size above the minimum fails: check it
        for size in range(low, spec.input_size + 33):
            assert spec.analyze(size).layers[-1].out_shape == (7,), size
        if low > 1:
            with pytest.raises(ShapeError):
                spec.analyze(low - 1)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_torch_names_are_unique(name):
    nodes = build_spec(name).nodes
    assert len({SpecModule.key(n.name) for n in nodes}) == len(nodes)


@pytest.fixture
def one_thread():
    # tiny tensors: with a busy CPU, intra-op threads spend seconds waiting for each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name,options,in_channels", TORCH_CASES)
def test_torch_module_matches_spec(name, options, in_channels, one_thread):
    spec = build_spec(name, num_classes=7, in_channels=in_channels, **options)
    size = spec.min_input_size()
    torch.manual_seed(0)
    model = SpecModule(spec, size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == spec.analyze(size).params
    x = torch.randn(2, spec.in_channels, size, size)
    model.train()  # batch norm needs 2 values per channel: a batch of 2 gives them at 1x1
    with torch.no_grad():
        outs = model(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert len(outs) == 1 + len(spec.aux_outputs)  # training adds the auxiliary logits
    for out in outs:
        assert out.shape == (2, 7) and torch.isfinite(out).all()
    model.eval()  # inference and export: the main logits alone
    with torch.no_grad():
        assert model(x).shape == (2, 7)


# --------------------------------------------------------------------------- conf/arch
ARCH_YAMLS = sorted(p.stem for p in (CONF / "arch").glob("*.yaml"))
ALLOWED_KEYS = {"name", "input_size", "in_channels", "num_classes", "options", "train"}


def test_every_architecture_has_a_yaml():
    assert set(list_archs()) <= set(ARCH_YAMLS)
    assert {"googlenet", "vgg"} <= set(ARCH_YAMLS)


@pytest.mark.parametrize("stem", ARCH_YAMLS)
def test_arch_yaml_composes(stem):
    cfg = compose_cfg(f"arch={stem}")
    validate(cfg)  # includes the optimizer recipe optim=paper takes from arch.train
    arch = cfg.arch
    assert set(arch) == ALLOWED_KEYS
    info = arch_info(arch.name)
    assert info.name == arch.name  # the yaml names the registered name, not an alias
    assert arch_info(stem).name == arch.name  # the file's own name resolves to the same arch
    assert arch.input_size == info.input_size
    assert arch.in_channels == info.in_channels
    assert arch.num_classes is None
    # the yaml's options are the reference's: the canonical parameter count
    spec = build_spec(arch.name, **arch.get("options", {}))
    assert spec.analyze(arch.input_size).params == PARAMS[arch.name]
