"""Every validated option (docs/validation.md) rejects a bad value with one line naming it."""
from __future__ import annotations

import re

import pytest
from conftest import ROOT, compose_cfg
from omegaconf import OmegaConf, open_dict

from cnnzoo.app.validate import OTHER_CHECKS, markdown_table, rule_rows, validate
from cnnzoo.core.errors import ConfigError

ROWS = rule_rows(compose_cfg)
# values tried in turn: the first one a rule rejects is its bad example
CANDIDATES = ("not-a-choice", -1, 0, 1.5, "", None, True, 10**9)


# what a condition needs besides its defaults to be valid (task=predict has no default model)
_COMPLETES = {"task=predict": ["predict.model=model.onnx", "predict.inputs=[photo.png]"]}


def _applies(when: str) -> list[str]:
    """Overrides that make a rule apply, e.g. "backend=keras, optim=sgd/rmsprop"."""
    conditions = [] if when == "always" else [c.split("/")[0] for c in when.split(", ")]
    return [o for c in conditions for o in [c, *_COMPLETES.get(c, [])]]


def _bad_value(key: str, cfg):
    from cnnzoo.app.validate import _rules
    type_ok, range_ok, _ = _rules(cfg)[key]
    return next(v for v in CANDIDATES if not (type_ok(v) and range_ok(v)))


@pytest.mark.parametrize("key, allowed, when", ROWS, ids=[r[0] for r in ROWS])
def test_every_rule_rejects_a_bad_value_in_one_line(key, allowed, when):
    cfg = compose_cfg(*_applies(when))
    validate(cfg)  # the defaults pass
    bad = _bad_value(key, cfg)
    with open_dict(cfg):
        OmegaConf.update(cfg, key, bad, force_add=True)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    lines = [ln for ln in str(err.value).splitlines() if ln.startswith(f"{key}=")]
    assert lines == [f"{key}={bad!r} is invalid: expected {allowed}"]


def test_docs_list_every_rule():
    doc = (ROOT / "docs" / "validation.md").read_text()
    assert markdown_table(compose_cfg) in doc, "regenerate: python -m cnnzoo.app.validate"


# where each check beyond the per-key rules is tested
OTHER_TESTS = {
    "data.mean, data.std": "tests/test_config.py::test_mean_std_must_match_channels",
    "export.batch_sizes": "tests/test_config.py::test_bad_values_give_one_line_naming_the_key",
    "export.runtimes": "tests/test_config.py::test_bad_values_give_one_line_naming_the_key",
    "export.runtimes, export.caffe":
        "tests/test_cli.py::test_a_runtime_not_installed_is_refused_before_training",
    "arch.name": "tests/test_validation.py::test_unknown_architecture",
    "optim.warmup_epochs, trainer.max_epochs":
        "tests/test_recipes.py::test_a_warmup_as_long_as_the_run_is_refused_before_training",
    "arch.options": "tests/test_config.py::test_unknown_arch_option_is_reported",
    "arch.input_size": "tests/test_config.py::test_input_too_small_names_the_minimum",
    "verify.backends, verify.reference":
        "tests/test_verify_matrix.py::test_verify_settings_are_validated",
    "verify.archs, verify.weights":
        "tests/test_verify_matrix.py::test_weights_file_is_checked_against_the_architecture",
    "hardware.devices, hardware.num_nodes":
        "tests/test_lr_find.py::test_bad_lr_find_settings_are_refused_in_one_line",
    "hardware.*, backend.*":
        "tests/test_config.py::test_backend_limits_are_refused_before_anything_loads",
    "backend.name":
        "tests/test_cli.py::test_a_backend_whose_framework_is_missing_names_its_install_command",
    "hardware.accelerator=gpu, hardware.devices":
        "tests/test_keras_backend.py::test_missing_gpu_is_one_clear_error",
    "arch.num_classes": "tests/test_datasets.py::test_bad_data_is_one_line_and_exit_code_2",
    "data.path": "tests/test_datasets.py::test_bad_data_is_one_line_and_exit_code_2",
    "resume": "tests/test_resume.py::test_changed_training_config_is_refused_naming_each_key",
}


@pytest.mark.parametrize("check", [c[0] for c in OTHER_CHECKS])
def test_every_other_check_has_a_test(check):
    path, name = OTHER_TESTS[check].split("::")
    assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), OTHER_TESTS[check]


def test_unknown_architecture():
    with pytest.raises(ConfigError, match=r"^arch.name: unknown architecture 'lenet6'"):
        validate(compose_cfg("arch.name=lenet6"))
