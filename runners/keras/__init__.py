"""Keras 3 on TensorFlow: the declaration (no framework is imported here)."""
from cnnzoo.core.backend import BackendInfo
from cnnzoo.core.rules import Rule, is_int, one_of, optional

INFO = BackendInfo(
    name="keras",
    implementation="runners.keras.backend:KerasBackend",
    install="pip install 'cnnzoo[keras]'",
    modules=("tensorflow", "keras", "tf2onnx"),
    packages=("tensorflow-cpu", "tensorflow", "keras", "tf2onnx"),
    options={
        "jit_compile": one_of("auto", True, False),
        "steps_per_execution": Rule(lambda v: v == "auto" or is_int(v),
                                    lambda v: v == "auto" or v > 0, "auto or a positive integer"),
        "onnx_lift_min_size": optional(Rule(is_int, lambda v: v > 0, "a positive integer")),
        "malloc_top_pad_mb": optional(Rule(is_int, lambda v: v >= 0, "an integer >= 0")),
    },
    limits={"hardware.num_nodes": (1,)},
    startup_checks={"backend.steps_per_execution": "auto or 1 when training over several "
                                                   "devices (tf.distribute)"},
    conf="runners.keras.conf",
)
