"""cnnzoo's backend conformance suite (cnnzoo/conformance.py), run for this plugin: the same
checks the built-in backends pass."""
import pytest

# cnnzoo's own `pytest` collects these too; without JAX there is nothing to test
pytest.importorskip("jax", reason="the flax plugin's framework is not installed")

from cnnzoo.conformance import *  # noqa: F401,F403  (the suite's tests)


@pytest.fixture(params=["flax"])
def backend_name(request):
    return request.param
