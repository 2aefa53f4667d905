"""What every task that runs a model shares: the architecture's spec, the dataset and its
splits, and the chosen backend with its native model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

import architectures

from ..core.backend import load_backend
from ..core.errors import RunFailed

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # run.py's config (the checkout's)


def compose(*overrides: str) -> DictConfig:
    """The config ``python run.py <overrides>`` would run, composed with Hydra's compose API
    outside a Hydra app (tests, benchmarks, the conformance suite) and validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .validate import validate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    validate(cfg)
    return cfg


def spec_of(cfg: DictConfig, num_classes: int | None = None):
    """The spec of ``cfg.arch`` (``num_classes`` None: the configured count)."""
    return architectures.build_spec(cfg.arch.name, num_classes or cfg.arch.num_classes,
                                    cfg.arch.in_channels, **cfg.arch.get("options", {}))


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config as {"a.b.c": value}; an empty mapping stays, as {"a.b": {}}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def make_backend(cfg: DictConfig, run_dir: Path):
    """The configured backend (its framework is imported now)."""
    return load_backend(cfg.backend.name)(cfg, run_dir)


@dataclass
class Experiment:
    """What train and eval share: the dataset, its splits and the model's spec."""
    dataset: object
    spec: object
    analysis: object
    preprocess: object
    train_split: object
    val_split: object

    def export_metadata(self, backend: str, versions: dict) -> dict:
        """What an exported model carries about itself (ONNX metadata_props, deploy.json)."""
        return {"arch": self.spec.name, "backend": backend,
                "input_shape": ["N", *self.analysis.input_shape],
                "num_classes": self.spec.num_classes, "class_names": self.dataset.classes,
                "preprocess": self.preprocess.metadata(), "params": self.analysis.params,
                "versions": versions}


def prepare(cfg: DictConfig) -> Experiment:
    from ..core.data import Augment, DataError, Preprocess, load_dataset
    from .pretrained import PREPROCESS_KEYS, weights_preprocessing

    dataset = load_dataset(cfg.data, cfg.seed)
    num_classes = cfg.arch.num_classes or dataset.num_classes
    if num_classes < dataset.num_classes:
        raise DataError(f"arch.num_classes={num_classes} but data '{dataset.name}' has "
                        f"{dataset.num_classes} classes: set arch.num_classes=null")
    if num_classes < 2:  # the rule of arch.num_classes, here reached through the data
        raise DataError(f"{dataset.source}: only one class ({dataset.classes[0]!r}): a classifier "
                        "needs at least 2; add images of another class")
    spec = spec_of(cfg, num_classes)
    channels = cfg.arch.in_channels
    pre = {**{k: cfg.data.get(k) for k in PREPROCESS_KEYS}, **weights_preprocessing(cfg)}
    preprocess = Preprocess(cfg.arch.input_size, channels,
                            per_channel(pre["mean"], channels), per_channel(pre["std"], channels),
                            pre["interpolation"], Augment(**cfg.data.get("augment", {})),
                            pre["channel_order"] or "RGB", pre["crop_fraction"])
    train_split, val_split = dataset.split(preprocess, cfg.data.val_fraction, cfg.seed,
                                           cfg.data.limit)
    budget = cfg.data.get("in_memory_mb", 0) << 20
    for split in (train_split, val_split):  # training first: it is read every epoch
        budget -= split.keep_in_memory(budget)
    return Experiment(dataset, spec, spec.analyze(cfg.arch.input_size), preprocess, train_split,
                      val_split)


def build_model(cfg: DictConfig, run_dir: Path, exp: Experiment):
    """The chosen backend (its framework is imported now) and its native model."""
    backend = make_backend(cfg, run_dir)
    model = backend.build(exp.spec, cfg.arch.input_size)
    native_params = backend.count_params(model)
    if native_params != exp.analysis.params:
        raise RunFailed(f"{cfg.backend.name} built {native_params:,} trainable parameters for "
                        f"{exp.spec.name}, the spec has {exp.analysis.params:,}: backend bug")
    return backend, model, native_params


def per_channel(values, channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    return values * channels if len(values) == 1 else values
