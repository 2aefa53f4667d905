"""Check the composed config before anything heavy is imported: one line per mistake, naming the
key, the bad value and what is allowed. Only architectures (pure Python) is imported here.

``python -m cnnzoo.app.validate`` prints every rule as the Markdown table of docs/validation.md."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import architectures
from architectures import ShapeError
from export.quantize import METHODS as CALIBRATION_METHODS

from ..core.backend import available_backends, backend_info, usable_backends
from ..core.errors import ConfigError
from ..core.optim import OPTIMIZERS, SCALINGS, SCHEDULERS
from ..core.rules import (
    BOOLEAN,
    NON_NEGATIVE_INT,
    NON_NEGATIVE_NUMBER,
    PATH,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    PROBABILITY,
    TEXT,
    Rule,
    is_int,
    is_num,
    optional,
    problems,
)
from ..core.zoo.files import FORMATS as WEIGHT_FORMATS

TASKS = ("train", "summary", "eval", "predict", "verify", "lr_find", "export_weights")
ACCELERATORS = ("auto", "cpu", "gpu")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
STRATEGIES = ("auto", "ddp", "ddp_spawn")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
DATASETS = ("digits", "synthetic", "image_folder", "mnist", "cifar10", "npz")
FILE_DATASETS = ("image_folder", "mnist", "cifar10", "npz")  # read from data.path
RESUME_MODES = ("auto", "never")
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc")


# task=predict's options; the standalone ``python -m cnnzoo.app.predict`` applies the same rules
PREDICT_RULES = {
    "predict.model": PATH._replace(allowed="the path of an exported model.onnx or deploy.prototxt"),
    "predict.inputs": Rule(lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
                           lambda v: len(v) > 0, "a non-empty list of image files or folders"),
    "predict.top_k": POSITIVE_INT,
}

# tasks that load the backend's framework (summary does only with an explicit backend=)
FRAMEWORK_TASKS = ("train", "eval", "verify", "lr_find", "export_weights")


def _rules(cfg: DictConfig):
    """key -> (type check, range check, what is allowed) for every core option."""
    pos_int, nonneg_int, pos_num, nonneg_num = (POSITIVE_INT, NON_NEGATIVE_INT, POSITIVE_NUMBER,
                                                NON_NEGATIVE_NUMBER)
    fraction = Rule(is_num, lambda v: 0 < v < 1, "a number strictly between 0 and 1")
    one_of = lambda choices: Rule(lambda v: isinstance(v, str),  # noqa: E731
                                  lambda v: v in choices, "one of " + ", ".join(choices))
    limit = Rule(is_num, lambda v: v > 0 and (v <= 1 or float(v).is_integer()),
                 "a fraction in (0, 1] or a whole number of batches")
    table = {
        "task": one_of(TASKS),
        "trainer.deterministic": BOOLEAN,
        "trainer.progress_bar": BOOLEAN,
        "export.enabled": BOOLEAN,
        "export.verify": BOOLEAN,
        "export.caffe": BOOLEAN,
        "export.int8.enabled": BOOLEAN,
        "export.int8.calibration_images": POSITIVE_INT,
        "export.int8.method": one_of(CALIBRATION_METHODS),
        "export.int8.max_acc_drop": NON_NEGATIVE_NUMBER,
        "tracking.mlflow": BOOLEAN,
        "tracking.mlflow_uri": TEXT,
        "tracking.experiment": TEXT,
        "seed": nonneg_int,
        "resume": one_of(RESUME_MODES),
        "optimized_metric": one_of(METRICS),
        "sweep.max_failure_rate": PROBABILITY,
        "eval.batch_size": optional(pos_int),
        "predict.top_k": PREDICT_RULES["predict.top_k"],
        "arch.input_size": pos_int,
        "arch.in_channels": pos_int,
        "arch.num_classes": optional(Rule(is_int, lambda v: v >= 2, "an integer >= 2")),
        "data.name": one_of(DATASETS),
        "data.batch_size": pos_int,
        "data.val_fraction": fraction,
        "data.limit": optional(pos_int),
        "data.in_memory_mb": nonneg_int,
        "data.interpolation": one_of(INTERPOLATIONS),
        "optim.name": one_of(OPTIMIZERS),
        "optim.lr": pos_num,
        "optim.weight_decay": nonneg_num,
        "optim.scheduler": one_of(SCHEDULERS),
        "trainer.max_epochs": pos_int,
        "trainer.limit_train_batches": limit,
        "trainer.limit_val_batches": limit,
        "hardware.accelerator": one_of(ACCELERATORS),
        "hardware.strategy": one_of(STRATEGIES),
        "hardware.devices": Rule(is_int, lambda v: v > 0 or v == -1, "a positive integer or -1 (all)"),
        "hardware.num_nodes": pos_int,
        "hardware.precision": one_of(PRECISIONS),
        "hardware.threads": optional(pos_int),
        "export.opset": Rule(is_int, lambda v: 13 <= v <= 23, "an integer from 13 to 23"),
        "export.atol": nonneg_num,
        "export.rtol": nonneg_num,
        "export.min_top1_agreement": PROBABILITY,
        "export.num_images": pos_int,
        "verify.reference": Rule(lambda v: isinstance(v, str), lambda v: v != "", "a backend name"),
        "verify.weights": optional(Rule(lambda v: isinstance(v, str), lambda v: v.strip() != "",
                                    "a zoo model, a weights file or a Caffe .prototxt")),
        "finetune.weights": optional(Rule(lambda v: isinstance(v, str), lambda v: v.strip() != "",
                                      "a zoo model (torchvision:resnet50) or a weights file")),
        "finetune.format": optional(one_of(WEIGHT_FORMATS)),
        "finetune.preprocess": one_of(("weights", "data")),
        "finetune.freeze": Rule(lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
                                lambda v: all(i.strip() for i in v),
                                "a list of node-name prefixes"),
        "finetune.freeze_backbone": BOOLEAN,
        "finetune.backbone_lr": Rule(is_num, lambda v: v > 0, "a positive number"),
        "export_weights.format": one_of(WEIGHT_FORMATS),
        "data.channel_order": optional(one_of(("RGB", "BGR"))),
        "data.crop_fraction": optional(Rule(is_num, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        "verify.input_size": optional(pos_int),
        "verify.num_images": pos_int,
        "verify.atol": nonneg_num,
        "verify.rtol": nonneg_num,
        "verify.min_top1_agreement": PROBABILITY,
        "verify.keep_onnx": BOOLEAN,
        "verify.layers": BOOLEAN,
        **_lr_find_rules(cfg),
    }
    for key in ("momentum", "alpha"):  # optimizer-specific keys, checked where present
        if cfg.optim.get(key) is not None:
            table[f"optim.{key}"] = Rule(is_num, lambda v: 0 <= v < 1, "a number in [0, 1)")
    if cfg.optim.get("eps") is not None:
        table["optim.eps"] = pos_num
    if cfg.optim.get("nesterov") is not None:
        table["optim.nesterov"] = BOOLEAN
    recipe = {"optim.reference_batch": optional(pos_int), "optim.scaling": one_of(SCALINGS),
              "optim.warmup_epochs": nonneg_num, "optim.step_epochs": pos_num,
              "optim.gamma": Rule(is_num, lambda v: 0 < v <= 1, "a number in (0, 1]"),
              "optim.label_smoothing": Rule(is_num, lambda v: 0 <= v < 1, "a number in [0, 1)"),
              "optim.clip_grad_norm": optional(pos_num)}
    table.update({k: rule for k, rule in recipe.items() if k.split(".")[1] in cfg.optim})
    if cfg.get("task") == "predict":
        table.update(PREDICT_RULES)
    info = _installed_info(cfg.backend.get("name"))
    if info is not None:  # the backend's own options, as it declares them
        table.update({f"backend.{k}": rule for k, rule in info.options.items()})
    if cfg.data.get("name") == "synthetic":
        table.update({"data.num_samples": Rule(is_int, lambda v: v >= 4, "an integer >= 4"),
                      "data.num_classes": Rule(is_int, lambda v: v >= 2, "an integer >= 2"),
                      "data.image_size": pos_int, "data.channels": pos_int})
    table.update(_data_file_rules(cfg))
    return table


def _lr_find_rules(cfg: DictConfig):
    """task=lr_find's rates and stop rule (checked always: the defaults are sound)."""
    min_lr = cfg.lr_find.get("min_lr")
    return {
        "lr_find.min_lr": POSITIVE_NUMBER,
        "lr_find.max_lr": Rule(is_num, lambda v: v > (min_lr if is_num(min_lr) else 0),
                               "a number above lr_find.min_lr"),
        # the suggestion leaves out the first 10 steps and the last one
        "lr_find.num_steps": Rule(is_int, lambda v: v >= 20,
                                  "an integer >= 20 (fewer leave too few steps for a suggestion)"),
        "lr_find.early_stop_threshold": optional(Rule(is_num, lambda v: v > 1,
                                                      "a number above 1")),
    }


def _one_device(cfg: DictConfig) -> list[str]:
    """task=lr_find steps one model on one device: several devices or nodes are refused."""
    if cfg.get("task") != "lr_find":
        return []
    return [f"{key}={value}: task=lr_find runs on one device: use {key}=1"
            for key in ("hardware.devices", "hardware.num_nodes")
            if (value := OmegaConf.select(cfg, key)) != 1]


def _data_file_rules(cfg: DictConfig):
    """Rules of the file formats (data.path, image_folder's switches) and of augmentation."""
    boolean = BOOLEAN
    table = {}
    if cfg.data.get("name") in FILE_DATASETS:
        table["data.path"] = Rule(lambda v: isinstance(v, str), lambda v: v.strip() != "",
                              f"the path of the {cfg.data.name} dataset")
    if cfg.data.get("name") == "image_folder":
        table.update({"data.cache": boolean, "data.verify": boolean,
                      "data.skip_bad_files": boolean})
    if cfg.data.get("augment") is not None:
        size = cfg.arch.get("input_size")
        table["data.augment.random_crop_padding"] = Rule(
            is_int, lambda v: 0 <= v <= (size if is_int(size) else v),
            "an integer from 0 (off) to arch.input_size")
        table["data.augment.horizontal_flip"] = boolean
    return table


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every mistake in ``cfg``; return quietly when it is sound."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:  # e.g. optim.lr=${nope}
        raise ConfigError(f"{err.full_key}: {str(err).splitlines()[0]}: an ${{...}} "
                          "interpolation that cannot be resolved; fix the value") from None
    errors = problems(_rules(cfg), lambda key: _plain(OmegaConf.select(cfg, key)))
    for key in ("data.mean", "data.std"):
        values = OmegaConf.select(cfg, key)
        if not values or any(not is_num(v) for v in values) or (
                key == "data.std" and any(v <= 0 for v in values)):
            errors.append(f"{key}={values!r} is invalid: expected a list of numbers "
                          f"(std > 0), one per channel or one for all")
        elif len(values) not in (1, cfg.arch.in_channels):
            allowed = sorted({1, cfg.arch.in_channels})
            errors.append(f"{key} has {len(values)} values but arch.in_channels is "
                          f"{cfg.arch.in_channels}: give {' or '.join(map(str, allowed))}")
    errors += _backend_errors(cfg)
    errors += _warmup_errors(cfg)
    errors += _one_device(cfg)
    errors += _verify_lists(cfg)
    errors += _export_runtimes(cfg)
    sizes = cfg.export.batch_sizes
    if not sizes or any(not is_int(b) or b < 1 for b in sizes):
        errors.append(f"export.batch_sizes={list(sizes) if sizes else sizes!r} is invalid: "
                      "expected a non-empty list of positive integers")
    if not errors:
        errors += _check_arch(cfg)
    if errors:
        raise ConfigError("\n".join(errors))


def _warmup_errors(cfg: DictConfig) -> list[str]:
    """A warm-up set explicitly must end before the run does (the rate would never reach
    optim.lr); a recipe's (optim=paper's, an interpolation) is cut to fit (Optimizer.warmup)."""
    if "warmup_epochs" not in cfg.optim or OmegaConf.is_interpolation(cfg.optim, "warmup_epochs"):
        return []
    warmup, epochs = cfg.optim.warmup_epochs or 0, cfg.trainer.max_epochs
    if not warmup or not (is_num(warmup) and is_int(epochs) and epochs > 0) or warmup < epochs:
        return []  # no warm-up, or a rule reports the value
    return [f"optim.warmup_epochs={warmup} is not shorter than the run (trainer.max_epochs="
            f"{epochs}): lower optim.warmup_epochs or raise trainer.max_epochs"]


def _export_runtimes(cfg: DictConfig) -> list[str]:
    """``export.runtimes``: known, distinct, installed; ``export.caffe`` needs OpenCV to be
    verified. Checked before training, so a missing runtime never costs a run."""
    from importlib.util import find_spec

    from export.runtimes import FORMATS, MODULES

    names = _plain(cfg.export.get("runtimes"))
    if (not isinstance(names, list) or not names or len(set(map(str, names))) != len(names)
            or any(n not in FORMATS for n in names)):
        return [f"export.runtimes={names!r} is invalid: expected a non-empty list of distinct "
                f"runtimes from {', '.join(FORMATS)}"]
    if not (cfg.export.verify and cfg.get("task") in ("train", "verify")):
        return []
    wanted = dict.fromkeys(names + (["opencv"] if cfg.export.caffe else []))
    return [f"export.runtimes: {name} is not installed: pip install -c constraints.txt -e "
            f"\".[deploy]\" (or export.runtimes without it"
            + (", export.caffe=false" if name == "opencv" and cfg.export.caffe else "") + ")"
            for name in wanted if find_spec(MODULES[name]) is None]


def _verify_lists(cfg: DictConfig) -> list[str]:
    """``verify.backends`` and ``verify.archs`` (task=verify): known names, the reference among
    the backends, and a weights file only for a single architecture."""
    v = cfg.get("verify")
    if v is None:
        return []
    errors = []
    backends = v.get("backends")
    if backends is None:  # every installed backend whose framework is installed
        if cfg.task == "verify" and v.get("reference") not in usable_backends():
            errors.append(f"verify.reference={v.get('reference')!r} is not an installed backend: "
                          f"use one of {', '.join(usable_backends())}")
    elif not backends or any(not isinstance(b, str) for b in backends) or len(
            set(backends)) != len(backends):
        errors.append(f"verify.backends={_plain(backends)!r} is invalid: expected a non-empty "
                      "list of distinct backend names")
    elif cfg.task == "verify":
        installed = available_backends()
        errors += [f"verify.backends: backend '{b}' is not installed; installed backends: "
                   f"{', '.join(installed)}" for b in backends if b not in installed]
        if v.get("reference") not in backends:
            errors.append(f"verify.reference={v.get('reference')!r} is not one of verify.backends "
                          f"{list(backends)}")
    archs = v.get("archs")
    if archs is not None and archs != "all":
        if not archs or not isinstance(archs, str) and not OmegaConf.is_list(archs):
            errors.append(f"verify.archs={_plain(archs)!r} is invalid: expected null (arch), all, "
                          "or architecture names")
        else:
            for name in [archs] if isinstance(archs, str) else archs:
                try:
                    architectures.arch_info(str(name))
                except KeyError as err:
                    errors.append(f"verify.archs: {err.args[0]}")
    if archs is not None and v.get("weights") is not None:
        errors.append("verify.weights is set but verify.archs is not null: a weights file holds "
                      "one architecture (arch)")
    return errors


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _installed_info(name):
    """The declaration of backend ``name`` (its package imported, not its framework), or None."""
    if not isinstance(name, str) or name not in available_backends():
        return None
    return backend_info(name)


def _backend_errors(cfg: DictConfig) -> list[str]:
    """An unknown or uninstalled backend, and what the chosen backend declares it cannot do
    (``BackendInfo.limits``), refused before any data or framework loads."""
    name = cfg.backend.get("name")
    info = _installed_info(name)
    if info is None:
        return [f"backend.name={name!r}: no such backend is installed; installed backends: "
                f"{', '.join(available_backends()) or 'none'}"]
    errors = info.unsupported(cfg)
    needs_framework = cfg.get("task") in FRAMEWORK_TASKS
    missing = info.missing_modules() if needs_framework else []
    if missing:
        errors.append(f"backend={name} needs {', '.join(missing)}, which is not installed: "
                      f"{info.install}")
    return errors


def _check_arch(cfg: DictConfig) -> list[str]:
    try:
        spec = architectures.build_spec(cfg.arch.name, cfg.arch.num_classes, cfg.arch.in_channels,
                                        **cfg.arch.get("options", {}))
    except KeyError as err:
        return [f"arch.name: {err.args[0]}"]
    except (TypeError, ValueError) as err:
        return [f"arch.options for {cfg.arch.name}: {err}"]
    try:
        spec.check_input_size(cfg.arch.input_size)
    except ShapeError as err:
        return [f"arch.input_size={cfg.arch.input_size}: {err}"]
    return []


# ------------------------------------------------------------------ the rules as documentation
# Checks beyond the per-key rules: (options, rule, when it applies); docs/validation.md lists them
# and each has a test.
OTHER_CHECKS = (
    ("data.mean, data.std", "lists of numbers (std > 0): one value, or one per arch.in_channels",
     "always"),
    ("export.batch_sizes", "a non-empty list of positive integers", "always"),
    ("export.runtimes", "distinct runtimes from onnxruntime, opencv, openvino", "always"),
    ("export.runtimes, export.caffe", "the runtimes installed (Caffe files are verified in "
     "opencv)", "task=train/verify with export.verify"),
    ("optim.warmup_epochs, trainer.max_epochs", "a warm-up shorter than the run (a recipe's own "
     "is cut to half the run instead)", "always"),
    ("arch.name", "a registered architecture", "always"),
    ("arch.options", "only the architecture's own options, with values it accepts", "always"),
    ("arch.input_size", "at least the architecture's minimum input size (task=summary prints it)",
     "always"),
    ("verify.backends, verify.reference", "distinct installed backends (null: every backend whose "
     "framework is installed); the reference among them", "task=verify"),
    ("verify.archs, verify.weights", "null, all or architecture names; a weights file only with "
                                     "verify.archs=null", "always"),
    ("hardware.devices, hardware.num_nodes", "1 (one device)", "task=lr_find"),
    ("hardware.*, backend.*", "what the chosen backend supports (its declared limits, listed "
     "below)", "always"),
    ("backend.name", "an installed backend; for task=train/eval/verify/lr_find its framework "
     "installed (the error names the install command)", "always"),
    ("hardware.accelerator=gpu, hardware.devices", "no more GPUs than the framework sees",
     "when the backend starts"),
    ("arch.num_classes", "at least the dataset's classes", "when the data loads"),
    ("data.path", "the format's files, readable and consistent (README, Bad data)",
     "when the data loads"),
    ("resume", "a checkpoint already in the run directory was written by the same backend and "
               "training config", "when training starts"),
)
# config groups whose options add or change rules
def _groups() -> dict[str, tuple[str, ...]]:
    return {"data": DATASETS, "backend": tuple(available_backends()),
            "optim": ("paper", "sgd", "adam", "adamw", "rmsprop"), "task": TASKS}


def rule_rows(compose) -> list[tuple[str, str, str]]:
    """(key, allowed, when) for every per-key rule, over every option of ``_GROUPS``;
    ``compose(*overrides)`` returns a composed config."""
    seen: dict[str, dict[str, set[str]]] = {}  # key -> group -> options where the rule exists
    allowed: dict[str, str] = {}
    groups = _groups()
    for group, options in groups.items():
        for option in options:
            for key, rule in _rules(compose(f"{group}={option}")).items():
                seen.setdefault(key, {}).setdefault(group, set()).add(option)
                allowed.setdefault(key, rule[2])
    rows = []
    for key in sorted(seen):
        # a group conditions a rule when some of its options have it and others do not
        when = [f"{g}=" + "/".join(o for o in opts if o in seen[key][g])
                for g, opts in groups.items() if 0 < len(seen[key].get(g, ())) < len(opts)]
        rows.append((key, allowed[key], ", ".join(when) or "always"))
    return rows


def markdown_table(compose) -> str:
    lines = ["| option | allowed | applies |", "|---|---|---|"]
    lines += [f"| `{k}` | {a} | {w} |" for k, a, w in rule_rows(compose) + list(OTHER_CHECKS)]
    lines += ["", "What each installed backend supports (`BackendInfo.limits`, checked with the "
              "rest; `BackendInfo.startup_checks`, checked when the backend starts):", "",
              "| backend | option | supported | applies |", "|---|---|---|---|"]
    for name in available_backends():
        info = backend_info(name)
        lines += [f"| {name} | `{k}` | {', '.join(map(str, v))} | always |"
                  for k, v in info.limits.items()]
        lines += [f"| {name} | `{k}` | {allowed} | when the backend starts |"
                  for k, allowed in info.startup_checks.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    from .experiment import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        print(markdown_table(lambda *o: _compose("config", overrides=list(o))), end="")
