"""Check the composed config before anything heavy is imported: one line per mistake, naming the
key, the bad value and what is allowed. Only architectures (pure Python) is imported here.

``python -m cnnzoo.validate`` prints every rule as the Markdown table of docs/validation.md."""
from __future__ import annotations

from numbers import Real

from omegaconf import DictConfig, OmegaConf

import architectures
from architectures import ShapeError

TASKS = ("train", "summary", "eval", "predict", "verify")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("none", "cosine")
ACCELERATORS = ("auto", "cpu", "gpu")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
STRATEGIES = ("auto", "ddp", "ddp_spawn")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
DATASETS = ("digits", "synthetic", "image_folder", "mnist", "cifar10", "npz")
FILE_DATASETS = ("image_folder", "mnist", "cifar10", "npz")  # read from data.path
RESUME_MODES = ("auto", "never")
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc")


BOOLEAN = (lambda v: isinstance(v, bool), lambda v: True, "true or false")
TEXT = (lambda v: isinstance(v, str), lambda v: v.strip() != "", "a non-empty string")
# the built-in backends' own keys (conf/backend/*.yaml), checked before their framework loads
BACKEND_OPTIONS = {
    "torch": {"channels_last": BOOLEAN,
              "num_workers": (lambda v: isinstance(v, int) and not isinstance(v, bool),
                              lambda v: v >= 0, "an integer >= 0")},
    "keras": {"jit_compile": (lambda v: v in ("auto", True, False), lambda v: True,
                              "auto, true or false"),
              "steps_per_execution": (lambda v: v == "auto" or isinstance(v, int)
                                      and not isinstance(v, bool),
                                      lambda v: v == "auto" or v > 0, "auto or a positive integer"),
              "onnx_lift_min_size": (lambda v: v is None or isinstance(v, int)
                                     and not isinstance(v, bool), lambda v: v is None or v > 0,
                                     "a positive integer or null")},
    "mxnet": {"hybridize": BOOLEAN, "static_alloc": BOOLEAN, "static_shape": BOOLEAN},
}


class ConfigError(ValueError):
    """Raised with every problem found, one per line."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _rules(cfg: DictConfig):
    """key -> (type check, range check, what is allowed) for every core option."""
    pos_int = (_is_int, lambda v: v > 0, "a positive integer")
    nonneg_int = (_is_int, lambda v: v >= 0, "an integer >= 0")
    pos_num = (_is_num, lambda v: v > 0, "a positive number")
    nonneg_num = (_is_num, lambda v: v >= 0, "a number >= 0")
    fraction = (_is_num, lambda v: 0 < v < 1, "a number strictly between 0 and 1")
    one_of = lambda choices: (lambda v: isinstance(v, str), lambda v: v in choices,  # noqa: E731
                              "one of " + ", ".join(choices))
    optional = lambda rule: (lambda v: v is None or rule[0](v),  # noqa: E731
                             lambda v: v is None or rule[1](v), rule[2] + " or null")
    limit = (_is_num, lambda v: v > 0 and (v <= 1 or float(v).is_integer()),
             "a fraction in (0, 1] or a whole number of batches")
    table = {
        "task": one_of(TASKS),
        "trainer.deterministic": BOOLEAN,
        "trainer.progress_bar": BOOLEAN,
        "export.enabled": BOOLEAN,
        "export.verify": BOOLEAN,
        "tracking.mlflow": BOOLEAN,
        "tracking.mlflow_uri": TEXT,
        "tracking.experiment": TEXT,
        "seed": nonneg_int,
        "resume": one_of(RESUME_MODES),
        "optimized_metric": one_of(METRICS),
        "sweep.max_failure_rate": (_is_num, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "eval.batch_size": optional(pos_int),
        "predict.top_k": pos_int,
        "arch.input_size": pos_int,
        "arch.in_channels": pos_int,
        "arch.num_classes": optional((_is_int, lambda v: v >= 2, "an integer >= 2")),
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
        "hardware.devices": (_is_int, lambda v: v > 0 or v == -1, "a positive integer or -1 (all)"),
        "hardware.num_nodes": pos_int,
        "hardware.precision": one_of(PRECISIONS),
        "hardware.threads": optional(pos_int),
        "export.opset": (_is_int, lambda v: 13 <= v <= 23, "an integer from 13 to 23"),
        "export.atol": nonneg_num,
        "export.rtol": nonneg_num,
        "export.min_top1_agreement": (_is_num, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "export.num_images": pos_int,
        "verify.reference": (lambda v: isinstance(v, str), lambda v: v != "", "a backend name"),
        "verify.weights": optional((lambda v: isinstance(v, str), lambda v: v.strip() != "",
                                    "the path of a weights .npz")),
        "verify.input_size": optional(pos_int),
        "verify.num_images": pos_int,
        "verify.atol": nonneg_num,
        "verify.rtol": nonneg_num,
        "verify.min_top1_agreement": (_is_num, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "verify.keep_onnx": (lambda v: isinstance(v, bool), lambda v: True, "true or false"),
    }
    for key in ("momentum", "alpha"):  # optimizer-specific keys, checked where present
        if cfg.optim.get(key) is not None:
            table[f"optim.{key}"] = (_is_num, lambda v: 0 <= v < 1, "a number in [0, 1)")
    if cfg.optim.get("eps") is not None:
        table["optim.eps"] = pos_num
    if cfg.optim.get("nesterov") is not None:
        table["optim.nesterov"] = BOOLEAN
    table.update({f"backend.{k}": rule for k, rule in
                  BACKEND_OPTIONS.get(cfg.backend.get("name"), {}).items()})
    if cfg.data.get("name") == "synthetic":
        table.update({"data.num_samples": (_is_int, lambda v: v >= 4, "an integer >= 4"),
                      "data.num_classes": (_is_int, lambda v: v >= 2, "an integer >= 2"),
                      "data.image_size": pos_int, "data.channels": pos_int})
    table.update(_data_file_rules(cfg))
    return table


def _data_file_rules(cfg: DictConfig):
    """Rules of the file formats (data.path, image_folder's switches) and of augmentation."""
    boolean = BOOLEAN
    table = {}
    if cfg.data.get("name") in FILE_DATASETS:
        table["data.path"] = (lambda v: isinstance(v, str), lambda v: v.strip() != "",
                              f"the path of the {cfg.data.name} dataset")
    if cfg.data.get("name") == "image_folder":
        table.update({"data.cache": boolean, "data.verify": boolean,
                      "data.skip_bad_files": boolean})
    if cfg.data.get("augment") is not None:
        size = cfg.arch.get("input_size")
        table["data.augment.random_crop_padding"] = (
            _is_int, lambda v: 0 <= v <= (size if _is_int(size) else v),
            "an integer from 0 (off) to arch.input_size")
        table["data.augment.horizontal_flip"] = boolean
    return table


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every mistake in ``cfg``; return quietly when it is sound."""
    errors = []
    for key, (type_ok, range_ok, allowed) in _rules(cfg).items():
        value = OmegaConf.select(cfg, key)
        if not type_ok(value) or not range_ok(value):
            errors.append(f"{key}={value!r} is invalid: expected {allowed}")
    for key in ("data.mean", "data.std"):
        values = OmegaConf.select(cfg, key)
        if not values or any(not _is_num(v) for v in values) or (
                key == "data.std" and any(v <= 0 for v in values)):
            errors.append(f"{key}={values!r} is invalid: expected a list of numbers "
                          f"(std > 0), one per channel or one for all")
        elif len(values) not in (1, cfg.arch.in_channels):
            errors.append(f"{key} has {len(values)} values but arch.in_channels is "
                          f"{cfg.arch.in_channels}: give 1 or {cfg.arch.in_channels}")
    errors += _backend_limits(cfg)
    errors += _verify_lists(cfg)
    sizes = cfg.export.batch_sizes
    if not sizes or any(not _is_int(b) or b < 1 for b in sizes):
        errors.append(f"export.batch_sizes={list(sizes) if sizes else sizes!r} is invalid: "
                      "expected a non-empty list of positive integers")
    if not errors:
        errors += _check_arch(cfg)
    if errors:
        raise ConfigError("\n".join(errors))


def _verify_lists(cfg: DictConfig) -> list[str]:
    """``verify.backends`` and ``verify.archs`` (task=verify): known names, the reference among
    the backends, and a weights file only for a single architecture."""
    v = cfg.get("verify")
    if v is None:
        return []
    errors = []
    backends = v.get("backends")
    if not backends or any(not isinstance(b, str) for b in backends) or len(
            set(backends)) != len(backends):
        errors.append(f"verify.backends={_plain(backends)!r} is invalid: expected a non-empty "
                      "list of distinct backend names")
    elif cfg.task == "verify":
        from runners.base import available_backends  # entry points only: nothing is imported

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


# What a built-in backend cannot do, refused before any data or framework loads.
BACKEND_LIMITS = {
    "keras": {"hardware.num_nodes": (1,)},
    "mxnet": {"hardware.precision": ("32-true",), "hardware.num_nodes": (1,),
              "backend.kvstore": ("device", "local")},
}


def _backend_limits(cfg: DictConfig) -> list[str]:
    name = cfg.backend.get("name")
    return [f"{key}={OmegaConf.select(cfg, key)} is not supported by backend={name}: use "
            + " or ".join(f"{key}={v}" for v in allowed)
            for key, allowed in BACKEND_LIMITS.get(name, {}).items()
            if OmegaConf.select(cfg, key) not in allowed]


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
    ("arch.name", "a registered architecture", "always"),
    ("arch.options", "only the architecture's own options, with values it accepts", "always"),
    ("arch.input_size", "at least the architecture's minimum input size (task=summary prints it)",
     "always"),
    ("verify.backends, verify.reference", "distinct installed backends; the reference among them",
     "task=verify"),
    ("verify.archs, verify.weights", "null, all or architecture names; a weights file only with "
                                     "verify.archs=null", "always"),
    ("hardware.*, backend.kvstore", "what the chosen backend supports: "
     + "; ".join(f"{name}: " + ", ".join(f"{k} in {list(v)}" for k, v in limits.items())
                 for name, limits in BACKEND_LIMITS.items()), "always"),
    ("hardware.accelerator=gpu, hardware.devices", "no more GPUs than the framework sees",
     "when the backend starts"),
    ("backend.steps_per_execution", "auto or 1 when keras trains over several devices",
     "when the backend starts"),
    ("arch.num_classes", "at least the dataset's classes", "when the data loads"),
    ("data.path", "the format's files, readable and consistent (README, Bad data)",
     "when the data loads"),
    ("resume", "a checkpoint already in the run directory was written by the same backend and "
               "training config", "when training starts"),
)
# config groups whose options add or change rules
_GROUPS = {"data": DATASETS, "backend": ("torch", "keras", "mxnet"),
           "optim": ("paper", "sgd", "adam", "adamw", "rmsprop")}


def rule_rows(compose) -> list[tuple[str, str, str]]:
    """(key, allowed, when) for every per-key rule, over every option of ``_GROUPS``;
    ``compose(*overrides)`` returns a composed config."""
    seen: dict[str, dict[str, set[str]]] = {}  # key -> group -> options where the rule exists
    allowed: dict[str, str] = {}
    for group, options in _GROUPS.items():
        for option in options:
            for key, rule in _rules(compose(f"{group}={option}")).items():
                seen.setdefault(key, {}).setdefault(group, set()).add(option)
                allowed.setdefault(key, rule[2])
    rows = []
    for key in sorted(seen):
        # a group conditions a rule when some of its options have it and others do not
        when = [f"{g}=" + "/".join(o for o in opts if o in seen[key][g])
                for g, opts in _GROUPS.items() if 0 < len(seen[key].get(g, ())) < len(opts)]
        rows.append((key, allowed[key], ", ".join(when) or "always"))
    return rows


def markdown_table(compose) -> str:
    lines = ["| option | allowed | applies |", "|---|---|---|"]
    lines += [f"| `{k}` | {a} | {w} |" for k, a, w in rule_rows(compose) + list(OTHER_CHECKS)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from pathlib import Path

    from hydra import compose as _compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"),
                               version_base="1.3"):
        print(markdown_table(lambda *o: _compose("config", overrides=list(o))), end="")
