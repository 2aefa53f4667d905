"""Keras 3 on TensorFlow: the declaration (no framework is imported here)."""
from cnnzoo.core.backend import BackendInfo
from cnnzoo.core.rules import NON_NEGATIVE_INT, POSITIVE_INT, one_of, optional, or_auto

INFO = BackendInfo(
    name="keras",
    implementation="runners.keras.backend:KerasBackend",
    install="pip install 'cnnzoo[keras]'",
    modules=("tensorflow", "keras", "tf2onnx"),
    packages=("tensorflow-cpu", "tensorflow", "keras", "tf2onnx"),
    options={
        "jit_compile": one_of("auto", True, False),
        "steps_per_execution": or_auto(POSITIVE_INT),
        "onnx_lift_min_size": optional(POSITIVE_INT),
        "malloc_top_pad_mb": optional(NON_NEGATIVE_INT),
    },
    # a learning rate per layer: Keras' optimizers have one rate for all variables
    limits={"hardware.num_nodes": (1,), "finetune.backbone_lr": (1.0,)},
    startup_checks={"backend.steps_per_execution": "auto or 1 when training over several "
                                                   "devices (tf.distribute)"},
    conf="runners.keras.conf",
)
