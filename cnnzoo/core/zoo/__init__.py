"""Weights from the model zoos people use, read from the zoos' own files without their
frameworks and turned into canonical weights (``cnnzoo.core.weights``).

- ``files``: what a file is (told from its first bytes) and its tensors, in the file's order;
  one reader per format in ``formats/`` (torch ``.pth`` through a restricted unpickler,
  ``.safetensors``, Keras ``.h5``, Gluon ``.params``, the neutral ``.npz``).
- ``catalog``: the zoos' models (``torchvision:resnet50``): which architecture each is, where its
  published file lies with its checksum, and the layout that maps its names to the spec's nodes.
- one module per layout (``torch_layout``, ``keras_layout``, ``gluon_layout``): zoo tensors ->
  canonical weights and back, derived from the spec's node names and order.
- ``download``: a published file into the cache, its checksum checked.
- ``load``: the one entry point the application calls (a path or a zoo name -> canonical
  weights that fit a spec, with the classifier left out when the class counts differ).
"""

# A layout module (torch_layout, keras_layout, gluon_layout) has two functions:
#   to_canonical(tensors, spec, input_size) -> canonical weights: the zoo file's tensors (in the
#       file's order) renamed to "<spec node>/<param>" and transposed to the canonical layout.
#       It leaves shape checks to ``load`` (which drops a classifier of another class count), and
#       raises WeightsError naming, once each, the tensors it cannot place.
#   from_canonical(weights, spec, input_size) -> the zoo's tensors, its names and layouts (what
#       ``task=export_weights`` writes in the zoo's format).
