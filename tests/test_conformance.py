"""The backend conformance suite (cnnzoo/conformance.py) for each built-in backend whose
framework is installed: they pass the same checks an outside plugin runs from its own tests."""
import pytest

from cnnzoo.conformance import *  # noqa: F401,F403  (the suite's tests)
from cnnzoo.core.backend import available_backends, backend_info, load_backend, usable_backends
from cnnzoo.core.errors import ConfigError


# this package's backends (runners/) whose frameworks are installed; an outside plugin runs
# the suite from its own tests (plugins/cnnzoo-flax/tests/test_flax_conformance.py)
@pytest.fixture(params=[n for n in usable_backends()
                        if backend_info(n).implementation.startswith("runners.")])
def backend_name(request):
    return request.param


def test_every_built_in_backend_is_registered_and_an_unknown_one_lists_them():
    assert {"torch", "keras", "mxnet"} <= set(available_backends())
    with pytest.raises(ConfigError, match="installed backends: .*torch"):
        load_backend("caffe")
