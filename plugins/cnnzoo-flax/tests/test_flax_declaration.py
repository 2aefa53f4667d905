"""The plugin's declaration: registered through its entry point, its config file found by
cnnzoo's search path, its options and limits checked before JAX is imported, and a missing JAX
named in one line with the extra that installs it."""
import pytest

# cnnzoo's own `pytest` collects these too; without JAX there is nothing to test
pytest.importorskip("jax", reason="the flax plugin's framework is not installed")
from flax_helpers import run_cli

from cnnzoo.app.experiment import compose
from cnnzoo.core.backend import available_backends, backend_info


def test_registered_through_its_entry_point_with_its_config_file():
    assert "flax" in available_backends()
    info = backend_info("flax")
    assert info.name == "flax" and info.conf == "cnnzoo_flax.conf"
    cfg = compose("backend=flax")  # found through cnnzoo's Hydra search-path plugin
    assert cfg.backend.name == "flax"
    for key, rule in info.options.items():
        assert key in cfg.backend and rule.accepts(cfg.backend[key]), key


@pytest.mark.parametrize("override, line", [
    ("backend.matmul_precision=fast", "error: backend.matmul_precision='fast' is invalid: "
                                      "expected one of default, high, highest"),
    ("backend.preallocate=maybe", "error: backend.preallocate='maybe' is invalid: expected "
                                  "true or false"),
    ("hardware.precision=16-mixed", "error: hardware.precision=16-mixed is not supported by "
                                    "backend=flax: use hardware.precision=32-true or "
                                    "hardware.precision=bf16-mixed"),
])
def test_bad_input_is_one_line_before_jax_loads(tmp_path, override, line):
    r = run_cli(tmp_path / "run", "backend=flax", override)
    assert r.returncode == 2 and r.error_lines == [line], r.stderr[-2000:]
    assert r.frameworks == set()


def test_without_jax_the_run_names_the_extra_to_install(tmp_path):
    r = run_cli(tmp_path / "run", "backend=flax", block=("jax",))
    assert r.returncode == 2 and r.frameworks == set(), r.stderr[-2000:]
    assert r.error_lines == ['error: backend=flax needs jax, which is not installed: pip install '
                             '-c constraints.txt -e "plugins/cnnzoo-flax[jax]"']
    assert not (tmp_path / "run" / "results.json").exists()
