"""The backend plugin contract and its discovery.

A backend is a class implementing ``Backend``, registered under the ``cnnzoo.backends`` entry-point
group (see pyproject.toml). The built-in backends register the same way a third-party package
would, and only the chosen backend's module is imported, so its framework loads only when used.
A third-party package also ships ``conf/backend/<name>.yaml`` and adds it to Hydra's search path
(``hydra.searchpath=[pkg://its_package.conf]``).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # kept out of the import path: --help and task=summary stay instant
    import numpy as np
    from omegaconf import DictConfig

    from architectures import Spec
    from cnnzoo.checkpoints import Checkpoint
    from cnnzoo.data import Split

ENTRY_POINT_GROUP = "cnnzoo.backends"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; backends raise it at the end of the epoch it happened."""


@dataclass
class TrainReport:
    history: list[dict]            # one row per epoch, the columns of metrics.csv
    train_time_s: float            # time inside training epochs (data loading included)
    images_per_s: float            # training images processed per second of train_time_s
    checkpoint: Path | None        # the last checkpoint written
    extra: dict = field(default_factory=dict)


class Backend(abc.ABC):
    """Turns a Spec into a native model and trains, evaluates, saves and exports it.

    Arrays crossing this interface are numpy: images float32 (N, C, H, W) as the data layer
    produces them, labels int64, logits float32 (N, num_classes)."""

    name: ClassVar[str]
    onnx_layout: ClassVar[str] = "NCHW"  # layout of the exported model's input

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)

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
    def input_pipeline(self, split: Split, shuffle: bool) -> Any:
        """The native iterable of (images, labels) batches this backend trains (shuffle=True)
        or validates on. Batches follow ``cnnzoo.data.epoch_order`` and hold exactly the data
        layer's pixels, so every backend sees the same inputs for the same seed."""

    @abc.abstractmethod
    def train(self, model, train: Split, val: Split, resume: Checkpoint | None = None
              ) -> TrainReport:
        """Train with the config's optimizer, trainer and hardware settings.

        Exact resume is part of the contract (``cnnzoo.checkpoints``):
        - after every epoch whose loss is finite, write the full training state (weights,
          optimizer and schedule state, counters) with ``CheckpointDir(run_dir).save(epoch,
          write, {"backend": name})``; after a non-finite loss raise ``TrainingDiverged``
          naming the step and metric, before anything is saved;
        - at the start of 0-based epoch e, seed Python, NumPy and the framework's generators
          with ``seed_python_numpy(cfg.seed, e)``;
        - with ``resume`` (a checkpoint of this run), restore that state and continue with
          epoch ``resume.epoch``: the final weights equal an uninterrupted run's, bitwise on
          the CPU. ``history`` holds the epochs this call trained. Loading never runs code
          from a file: a file that would need it raises ``CheckpointError``."""

    def evaluate(self, model, split: Split, batch_size: int | None = None) -> dict:
        """Cross-entropy ``loss``, ``acc``, ``per_class_acc`` and ``confusion_matrix`` on
        ``split``, computed in numpy from ``predict`` so every backend is scored the same way."""
        import numpy as np

        from cnnzoo.scores import scores
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

    @abc.abstractmethod
    def save_checkpoint(self, model, path: Path) -> None:
        """Write the model's weights to ``path``."""

    @abc.abstractmethod
    def load_checkpoint(self, model, path: Path) -> None:
        """Read weights written by ``save_checkpoint`` (or the backend's trainer) into ``model``."""

    @abc.abstractmethod
    def export_onnx(self, model, path: Path, example: np.ndarray, opset: int) -> None:
        """Write ``model`` as ONNX with input "input" (dynamic batch) and output "logits"."""

    # Weight transfer between backends, in the canonical layout of ``runners.weight_layouts``
    # (keys "<spec node name>/<param>", PyTorch's layouts). Not abstract, so that a backend
    # written before them still loads; task=verify needs both.
    def get_weights(self, model) -> dict[str, np.ndarray]:
        """Every parameter and batch-norm statistic of a model built by ``build``, as float32
        arrays in the canonical layout (copies: changing them leaves the model alone)."""
        raise NotImplementedError(f"backend '{self.name}' does not implement get_weights")

    def set_weights(self, model, weights: dict[str, np.ndarray]) -> None:
        """Load canonical ``weights`` into a model built by ``build``. Raises
        ``runners.weight_layouts.WeightsError`` naming every missing, unexpected or
        mis-shaped key before anything is changed."""
        raise NotImplementedError(f"backend '{self.name}' does not implement set_weights")


def available_backends() -> list[str]:
    """Names of the installed backends; nothing is imported."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_backend(name: str) -> type[Backend]:
    """Import and return the backend class registered as ``name``."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Backend)):
                raise TypeError(f"entry point '{name}' ({ep.value}) is not a runners.Backend")
            return cls
    raise KeyError(f"backend '{name}' is not installed; installed backends: "
                   f"{', '.join(available_backends()) or 'none (pip install -e . first)'}")
