"""Framework-neutral CNN architectures: ``build_spec(name)`` returns a ``Spec`` graph.

Importing this package registers every family module below; it imports no framework."""
from . import alexnet, inception, lenet, resnet, vgg, xception  # noqa: F401  (registers them)
from .registry import arch_info, build_spec, list_archs
from .spec import ShapeError, Spec

__all__ = ["arch_info", "build_spec", "list_archs", "ShapeError", "Spec"]
