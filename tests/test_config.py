"""Config composition and validation (no framework involved)."""
import pytest
from conftest import compose_cfg, config_options
from omegaconf import open_dict

from cnnzoo.app.validate import validate
from cnnzoo.core.errors import ConfigError

GROUPS = ("arch", "backend", "hardware", "data", "optim")


@pytest.mark.parametrize("group, option",
                         [(g, o) for g in GROUPS for o in config_options(g)])
def test_every_config_option_composes_and_validates(group, option):
    cfg = compose_cfg(f"{group}={option}")
    validate(cfg)
    assert cfg[group].name  # every option names what it selects


def test_defaults_are_the_documented_default_job():
    cfg = compose_cfg()
    assert (cfg.task, cfg.arch.name, cfg.backend.name, cfg.data.name) == (
        "train", "lenet5", "torch", "digits")
    assert cfg.hardware.accelerator == "auto"


@pytest.mark.parametrize("arch, optimizer, lr", [
    ("lenet5", "adam", 1e-3), ("vgg16", "sgd", 0.01), ("resnet50", "sgd", 0.1),
    ("inception_v3", "rmsprop", 0.045)])
def test_optim_paper_takes_the_architectures_recipe(arch, optimizer, lr):
    cfg = compose_cfg(f"arch={arch}")
    assert (cfg.optim.name, cfg.optim.lr) == (optimizer, lr)
    assert compose_cfg(f"arch={arch}", "optim.lr=0.5").optim.lr == 0.5
    assert compose_cfg(f"arch={arch}", "optim=adamw").optim.name == "adamw"


def test_vgg_is_an_alias_of_vgg16():
    assert compose_cfg("arch=vgg") == compose_cfg("arch=vgg16")


def test_summary_task_validates():
    cfg = compose_cfg("task=summary", "arch=vgg16")
    assert validate(cfg) is None  # sound: no error
    with open_dict(cfg):
        cfg.arch.input_size = 8
    with pytest.raises(ConfigError, match=r"^arch.input_size=8: "):
        validate(cfg)


def _errors(*overrides, edit=None):
    cfg = compose_cfg(*overrides)
    if edit:
        with open_dict(cfg):
            edit(cfg)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    return str(err.value).splitlines()


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=2.5", "data.batch_size"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("trainer.limit_train_batches=2.5", "trainer.limit_train_batches"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("hardware.precision=64", "hardware.precision"),
    ("hardware.accelerator=tpu", "hardware.accelerator"),
    ("optim.name=lbfgs", "optim.name"),
    ("task=dance", "task"),
    ("seed=-1", "seed"),
    ("export.opset=7", "export.opset"),
    ("export.atol=-1", "export.atol"),
    ("export.batch_sizes=[0]", "export.batch_sizes"),
    ("export.runtimes=[tensorrt]", "export.runtimes"),
    ("export.runtimes=[onnxruntime,onnxruntime]", "export.runtimes"),
    ("export.runtimes=[]", "export.runtimes"),
    ("export.int8.method=kl", "export.int8.method"),
    ("data.std=[0]", "data.std"),
    ("optimized_metric=speed", "optimized_metric"),
    ("optim=sgd optim.momentum=1.5", "optim.momentum"),
    ("optim=rmsprop optim.eps=0", "optim.eps"),
])
def test_bad_values_give_one_line_naming_the_key(override, key):
    lines = _errors(*override.split())
    assert len(lines) == 1
    assert lines[0].startswith(key) and "expected" in lines[0]


def test_every_mistake_is_reported_at_once():
    lines = _errors("optim.lr=-1", "data.batch_size=0", "trainer.max_epochs=0")
    assert [ln.split("=")[0] for ln in lines] == [
        "data.batch_size", "optim.lr", "trainer.max_epochs"]


def test_input_too_small_names_the_minimum():
    (line,) = _errors("arch=vgg16", "arch.input_size=16")
    assert line.startswith("arch.input_size=16") and "input_size >= 32" in line


def test_mean_std_must_match_channels():
    (line,) = _errors("arch=vgg16", "data.mean=[0.5,0.5]")
    assert "data.mean" in line and "give 1 or 3" in line


def test_unknown_arch_option_is_reported():
    (line,) = _errors(edit=lambda c: c.arch.options.update({"depth": 3}))
    assert line.startswith("arch.options for lenet5")


@pytest.mark.parametrize("overrides, key", [
    (["backend=mxnet", "hardware.precision=bf16-mixed"], "hardware.precision"),
    (["backend=mxnet", "hardware=multi_node", "hardware.precision=32-true",
      "hardware.num_nodes=2"], "hardware.num_nodes"),
    (["backend=keras", "hardware.num_nodes=2"], "hardware.num_nodes"),
])
def test_backend_limits_are_refused_before_anything_loads(overrides, key):
    lines = _errors(*overrides)
    (line,) = [ln for ln in lines if ln.startswith(key)]
    assert "is not supported by backend=" in line
    # beside it, only the missing framework of a partial install (pip install .[torch])
    assert all(ln == line or ", which is not installed: pip install 'cnnzoo[" in ln
               for ln in lines), lines
