"""Registry of architecture builders: one name (plus aliases) -> a function returning a Spec."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .spec import Spec


@dataclass(frozen=True)
class ArchInfo:
    name: str
    fn: Callable[..., Spec]
    input_size: int  # canonical square input
    in_channels: int
    num_classes: int
    reference: str


_ARCHS: dict[str, ArchInfo] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *, input_size: int, reference: str, in_channels: int = 3,
             num_classes: int = 1000, aliases: tuple[str, ...] = ()):
    """Decorator for ``fn(num_classes, in_channels, input_size, **options) -> Spec``."""
    def wrap(fn):
        _ARCHS[name] = ArchInfo(name, fn, input_size, in_channels, num_classes, reference)
        for alias in aliases:
            _ALIASES[alias] = name
        return fn
    return wrap


def arch_info(name: str) -> ArchInfo:
    key = _ALIASES.get(name, name)
    if key not in _ARCHS:
        raise KeyError(f"unknown architecture '{name}'; choose one of {', '.join(list_archs())}")
    return _ARCHS[key]


def list_archs() -> list[str]:
    return sorted(_ARCHS)


def build_spec(name: str, num_classes: int | None = None, in_channels: int | None = None,
               **options) -> Spec:
    """Build architecture ``name``; None means the canonical class/channel count."""
    info = arch_info(name)
    return info.fn(num_classes=num_classes or info.num_classes,
                   in_channels=in_channels or info.in_channels,
                   input_size=info.input_size, **options)
