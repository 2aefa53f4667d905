"""Backend plugins. Importing this package imports no framework."""
from .base import Backend, TrainReport, available_backends, load_backend

__all__ = ["Backend", "TrainReport", "available_backends", "load_backend"]
