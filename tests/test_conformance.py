"""The backend conformance suite (cnnzoo/conformance.py) for every installed backend whose
framework is installed: the built-in backends pass the same checks an outside plugin runs."""
import pytest

from cnnzoo.conformance import *  # noqa: F401,F403  (the suite's tests)
from cnnzoo.core.backend import usable_backends


@pytest.fixture(params=usable_backends())
def backend_name(request):
    return request.param
