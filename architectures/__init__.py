"""Framework-neutral CNN architectures: ``build_spec(name)`` returns a ``Spec`` graph.

Importing this package registers every family module below; it imports no framework."""
from . import lenet, vgg  # noqa: F401  (registers the architectures)
from .registry import arch_info, build_spec, list_archs
from .spec import ShapeError, Spec

__all__ = ["arch_info", "build_spec", "list_archs", "ShapeError", "Spec"]
