"""MXNet Gluon: the declaration (no framework is imported here)."""
from cnnzoo.core.backend import BackendInfo
from cnnzoo.core.rules import BOOLEAN

INFO = BackendInfo(
    name="mxnet",
    implementation="runners.mxnet.backend:MXNetBackend",
    install="pip install 'cnnzoo[mxnet]' (Python 3.11, numpy<2)",
    modules=("mxnet",),
    packages=("mxnet",),
    options={"hybridize": BOOLEAN, "static_alloc": BOOLEAN, "static_shape": BOOLEAN},
    limits={"hardware.precision": ("32-true",), "hardware.num_nodes": (1,),
            "backend.kvstore": ("device", "local")},
    conf="runners.mxnet.conf",
)
