"""The backend plugin contract and its discovery.

A backend is two things, registered under the ``cnnzoo.backends`` entry-point group:

- a ``BackendInfo`` (the entry point's target), which declares without importing the framework
  its config options with their rules, what it cannot do (``limits``), the modules it needs and
  the command that installs them, the distributions results.json records, and the package
  holding its ``conf/backend/<name>.yaml``. The application validates a config against it and
  Hydra's search path finds its config file before any framework loads;
- a ``Backend`` subclass (``BackendInfo.implementation``), imported only when that backend runs.

The built-in backends (``runners/<name>/``) register exactly as an outside package would.
Adding a backend is one package, one entry point, its conf file and a green conformance suite
(``cnnzoo.conformance``), with no edit to this repository.
"""
from __future__ import annotations

import abc
import importlib
import importlib.util
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ConfigError
from .rules import Rule

if TYPE_CHECKING:  # kept out of the import path: --help and task=summary stay instant
    from collections.abc import Callable, Sequence

    import numpy as np
    from omegaconf import DictConfig

    from architectures import Spec

    from .checkpoints import Checkpoint
    from .data import Split
    from .training import EpochEndHook, TrainReport

ENTRY_POINT_GROUP = "cnnzoo.backends"


@dataclass(frozen=True)
class BackendInfo:
    """What a backend declares about itself; reading it imports no framework."""
    name: str                        # backend=<name>, backend.name
    implementation: str              # "module:Class" of its Backend subclass
    install: str                     # the command that installs what it needs
    modules: tuple[str, ...] = ()    # top-level modules it imports (checked, not imported)
    packages: tuple[str, ...] = ()   # distributions whose versions results.json records
    options: dict[str, Rule] = field(default_factory=dict)    # backend.<key> -> its rule
    # options that never change the trained weights (a resumed run may set them otherwise)
    weight_neutral: tuple[str, ...] = ()
    # config key -> the values this backend supports (e.g. "hardware.num_nodes": (1,));
    # anything else is refused before the data or the framework loads
    limits: dict[str, tuple] = field(default_factory=dict)
    conf: str | None = None          # package holding conf/backend/<name>.yaml
    # what it can check only once its framework runs: option -> what is allowed (documented
    # in docs/validation.md; refused with a ConfigError when the backend starts)
    startup_checks: dict[str, str] = field(default_factory=dict)

    def unsupported(self, cfg) -> list[str]:
        """One line for each config value outside what this backend declares it supports
        (``limits``), naming what to use instead."""
        from omegaconf import OmegaConf

        return [f"{key}={OmegaConf.select(cfg, key)} is not supported by backend={self.name}: use "
                + " or ".join(f"{key}={v}" for v in allowed)
                for key, allowed in self.limits.items() if OmegaConf.select(cfg, key) not in allowed]

    def missing_modules(self) -> list[str]:
        return [m for m in self.modules if importlib.util.find_spec(m) is None]

    def check_installed(self) -> None:
        """ConfigError (one line, naming the install command) if a needed module is missing."""
        missing = self.missing_modules()
        if missing:
            raise ConfigError(f"backend={self.name} needs {', '.join(missing)}, which is not "
                              f"installed: {self.install}")

    def load(self) -> type[Backend]:
        """Import and return the Backend subclass (its framework loads now)."""
        self.check_installed()
        module, _, attr = self.implementation.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise TypeError(f"backend '{self.name}': {self.implementation} is not a "
                            "cnnzoo.core.backend.Backend")
        return cls


class Backend(abc.ABC):
    """Turns a Spec into a native model and trains, evaluates, saves and exports it.

    Arrays crossing this interface are numpy: images float32 (N, C, H, W) as the data layer
    produces them, labels int64, logits float32 (N, num_classes)."""

    name: ClassVar[str]
    onnx_layout: ClassVar[str] = "NCHW"  # layout of the exported model's input

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        # called after each epoch with its row (the application adds them, e.g. a sweep's
        # pruning); ``train`` hands them to its TrainingProtocol (``hooks``)
        self.epoch_end_hooks: list[EpochEndHook] = []

    @property
    def is_main_process(self) -> bool:
        """False in the extra worker processes of multi-process training (they export nothing)."""
        return True

    @abc.abstractmethod
    def build(self, spec: Spec, input_size: int) -> Any:
        """The native model for ``spec`` at a square ``input_size``."""

    @abc.abstractmethod
    def count_params(self, model) -> int:
        """Trainable parameters of the native model (must equal the spec's count)."""

    @abc.abstractmethod
    def train(self, model, train: Split, val: Split, resume: Checkpoint | None = None
              ) -> TrainReport:
        """Train with the config's optimizer, trainer and hardware settings, epoch by epoch
        through ``cnnzoo.core.training.TrainingProtocol``, which writes metrics.csv,
        TensorBoard, the progress display and the checkpoint folders, and stops a diverged run.

        The backend supplies what only its framework can do:
        - batches in ``cnnzoo.core.data.epoch_order`` (``epoch_chunks``), so every backend sees
          the same inputs for the same seed;
        - at the start of 0-based epoch e, its own generators seeded from the seed that
          ``TrainingProtocol.start_epoch(e)`` returns; before every 0-based step s of the run,
          the rate ``protocol.schedule.rate(s)``, and the protocol told the global batch;
        - the loss with ``optim.label_smoothing`` and the gradient clipped at
          ``optim.clip_grad_norm``, as ``cnnzoo.core.optim`` states them;
        - at the end of an epoch, the means and the first non-finite training step, and a
          function that writes its full training state (weights, optimizer and schedule
          state, counters) into a folder;
        - ``self.epoch_end_hooks`` given to the protocol, and training ended after an epoch
          whose hooks set ``protocol.stop_reason`` (a single-process run; ``hardware`` with
          several processes is refused before a hook is added);
        - with ``resume`` (a checkpoint of this run), that state restored, continuing with
          epoch ``resume.epoch``: the final weights equal an uninterrupted run's, bitwise on
          the CPU. Loading never runs code from a file: a file that would need it raises
          ``CheckpointError``."""

    @abc.abstractmethod
    def lr_range_test(self, model, train: Split, rates: Sequence[float],
                      stop: Callable[[list[float]], bool]) -> list[float]:
        """A learning-rate range test (task=lr_find): one training step per rate, on one device
        (``hardware`` asking for more is refused before a backend starts), and the loss of
        each step as a host float, read right after it.

        Step i trains on the i-th batch of this backend's own training input pipeline, the
        batches ``train`` gets (``epoch_order`` with the config's seed: epoch 0's batches,
        then epoch 1's when the split runs out, ...), with the config's optimizer (its momentum,
        weight decay, eps, clipping... as configured) whose learning rate is set to
        ``rates[i]`` just before the step. The loss is the one training optimizes and
        metrics.csv reports: cross-entropy (label-smoothed where the recipe asks) plus the
        weighted auxiliary losses (no weight-decay penalty). After each
        step ``stop(losses so far)`` is asked; True ends the test. ``model`` is trained in
        place (the caller throws it away); nothing is written. ``cnnzoo.core.lr_range``
        holds the loop: a backend supplies its batches and its step."""

    def evaluate(self, model, split: Split, batch_size: int | None = None) -> dict:
        """Cross-entropy ``loss``, ``acc``, ``per_class_acc`` and ``confusion_matrix`` on
        ``split``, computed in numpy from ``predict`` so every backend is scored the same way."""
        import numpy as np

        from .scores import scores
        step = batch_size or self.cfg.data.batch_size
        logits, labels = [], []
        for start in range(0, len(split), step):
            x, y = split.batch(start, start + step)
            logits.append(self.predict(model, x))
            labels.append(y)
        logits = np.concatenate(logits).astype(np.float64)
        return scores(logits, np.concatenate(labels), logits.shape[1])

    @abc.abstractmethod
    def predict(self, model, images: np.ndarray) -> np.ndarray:
        """Logits for a batch, in inference mode on the CPU in float32."""

    def node_outputs(self, model, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every spec node's output for ``images`` in inference mode on the CPU, float32,
        channels first ((N, C, H, W) or (N, features)), keyed by node name: what the layer
        report of ``task=verify`` (``verify.layers``) compares. Optional: a backend that
        cannot give them leaves this as it is and the report says so."""
        raise NotImplementedError(f"backend {self.name} gives no per-layer outputs")

    @abc.abstractmethod
    def load_checkpoint(self, model, path: Path) -> None:
        """Read the weights of a checkpoint file that ``train`` wrote into ``model``
        (``CheckpointError`` for a file that is damaged, does not fit, or would run code)."""

    @abc.abstractmethod
    def export_onnx(self, model, path: Path, example: np.ndarray, opset: int) -> None:
        """Write ``model`` as ONNX with input "input" (dynamic batch) and output "logits"."""

    # Weight transfer between backends, in the canonical layout of ``cnnzoo.core.weights``
    # (keys "<spec node name>/<param>", PyTorch's layouts): results.json's weights_sha256 and
    # task=verify use them.
    @abc.abstractmethod
    def get_weights(self, model) -> dict[str, np.ndarray]:
        """Every parameter and batch-norm statistic of a model built by ``build``, as float32
        arrays in the canonical layout (copies: changing them leaves the model alone)."""

    @abc.abstractmethod
    def set_weights(self, model, weights: dict[str, np.ndarray]) -> None:
        """Load canonical ``weights`` into a model built by ``build``. Raises ``WeightsError``
        naming every missing, unexpected or mis-shaped key before anything is changed."""


def available_backends() -> list[str]:
    """Names of the installed backends; nothing is imported."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def usable_backends() -> list[str]:
    """The installed backends whose frameworks are installed too (nothing is imported)."""
    return [n for n in available_backends() if not backend_info(n).missing_modules()]


def backend_info(name: str) -> BackendInfo:
    """The declaration registered as ``name`` (imports the plugin's package, not its framework).
    ConfigError when no backend of that name is installed."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            info = ep.load()
            if not isinstance(info, BackendInfo) or info.name != name:
                raise ConfigError(f"backend '{name}': its entry point {ep.value} must name the "
                                  f"BackendInfo of backend '{name}' (README, Adding a backend)")
            return info
    raise ConfigError(f"backend '{name}' is not installed; installed backends: "
                      f"{', '.join(available_backends()) or 'none (pip install -e . first)'}")


def load_backend(name: str) -> type[Backend]:
    """Import and return the Backend subclass registered as ``name``."""
    return backend_info(name).load()
