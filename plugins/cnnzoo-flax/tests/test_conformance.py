"""cnnzoo's backend conformance suite (cnnzoo/conformance.py), run for this plugin: the same
checks the built-in backends pass."""
import pytest

from cnnzoo.conformance import *  # noqa: F401,F403  (the suite's tests)


@pytest.fixture(params=["flax"])
def backend_name(request):
    return request.param
