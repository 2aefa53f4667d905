"""Every compatibility patch the product needs, in one place, each applied only where needed.

- ``tensorboard_without_tensorflow``: TensorBoard's writer imports TensorFlow when it is
  installed (``tensorboard.compat.tf``), which would load TF into every torch run. TensorBoard
  checks for a ``tensorboard.compat.notf`` module first and then uses its own stub; we provide it.
"""
from __future__ import annotations

import sys
import types


def tensorboard_without_tensorflow() -> None:
    """Make TensorBoard's writers use their TensorFlow-free stub (call before they are imported)."""
    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
