"""JAX/Flax backend for cnnzoo, an outside plugin: the declaration (JAX is not imported here).

cnnzoo finds it through the ``cnnzoo.backends`` entry point in this package's pyproject.toml
and its config through ``conf`` (conf/backend/flax.yaml), so ``python run.py backend=flax``
works once the package is installed; the options below are checked before JAX loads."""
from cnnzoo.core.backend import BackendInfo
from cnnzoo.core.rules import BOOLEAN, one_of

INFO = BackendInfo(
    name="flax",
    implementation="cnnzoo_flax.backend:FlaxBackend",
    install='pip install -c constraints.txt -e "plugins/cnnzoo-flax[jax]"',
    modules=("jax", "flax", "optax"),
    packages=("cnnzoo-flax", "jax", "jaxlib", "flax", "optax"),
    options={"matmul_precision": one_of("default", "high", "highest"),
             "preallocate": BOOLEAN},
    weight_neutral=("preallocate",),  # where the GPU memory comes from, not what is computed
    # one process drives every device of one machine; float16 would need loss scaling
    limits={"hardware.num_nodes": (1,), "hardware.precision": ("32-true", "bf16-mixed")},
    # known only once JAX runs (refused with one line when the backend starts)
    startup_checks={"hardware.devices": "no more devices than JAX sees; several CPU devices "
                                        "only where JAX has not started yet (a fresh process)"},
    conf="cnnzoo_flax.conf",
)
