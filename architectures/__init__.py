"""Framework-neutral CNN architectures: ``build_spec(name)`` returns a ``Spec`` graph.

Importing this package imports every module of it, so each family module registers its
architectures (``@register``) and a new family is one new file; no framework is imported."""
import importlib
import pkgutil

from .registry import arch_info, build_spec, list_archs
from .spec import ShapeError, Spec

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["arch_info", "build_spec", "list_archs", "ShapeError", "Spec"]
