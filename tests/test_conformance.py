"""The backend conformance suite (cnnzoo/conformance.py) for every installed backend whose
framework is installed: the built-in backends pass the same checks an outside plugin runs."""
import pytest

from cnnzoo.conformance import *  # noqa: F401,F403  (the suite's tests)
from cnnzoo.core.backend import available_backends, load_backend, usable_backends
from cnnzoo.core.errors import ConfigError


@pytest.fixture(params=usable_backends())
def backend_name(request):
    return request.param


def test_every_built_in_backend_is_registered_and_an_unknown_one_lists_them():
    assert {"torch", "keras", "mxnet"} <= set(available_backends())
    with pytest.raises(ConfigError, match="installed backends: .*torch"):
        load_backend("caffe")
