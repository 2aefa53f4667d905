"""PyTorch on Lightning Fabric: the declaration (no framework is imported here)."""
from cnnzoo.core.backend import BackendInfo
from cnnzoo.core.rules import BOOLEAN, NON_NEGATIVE_INT, or_auto

INFO = BackendInfo(
    name="torch",
    implementation="runners.torch.backend:TorchBackend",
    install="pip install 'cnnzoo[torch]'",
    modules=("torch", "lightning_fabric"),
    packages=("torch", "pytorch-lightning", "onnxscript"),
    options={"channels_last": BOOLEAN, "num_workers": or_auto(NON_NEGATIVE_INT),
             "compile": BOOLEAN},
    weight_neutral=("num_workers",),  # the same batches from any number of workers
    conf="runners.torch.conf",
)
