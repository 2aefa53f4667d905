"""PyTorch via PyTorch Lightning: the declaration (no framework is imported here)."""
from cnnzoo.core.backend import BackendInfo
from cnnzoo.core.rules import BOOLEAN, NON_NEGATIVE_INT

INFO = BackendInfo(
    name="torch",
    implementation="runners.torch.backend:TorchBackend",
    install="pip install 'cnnzoo[torch]'",
    modules=("torch", "pytorch_lightning"),
    packages=("torch", "pytorch-lightning", "onnxscript"),
    options={"channels_last": BOOLEAN, "num_workers": NON_NEGATIVE_INT},
    conf="runners.torch.conf",
)
