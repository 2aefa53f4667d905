"""cnnzoo: one experiment definition, classic CNNs trained in several frameworks.

``cnnzoo.core`` is what every backend builds on (errors, data, checkpoints, run directory,
the training protocol, the backend contract); ``cnnzoo.app`` is what run.py runs (tasks,
validation, cross-framework verification, eval, predict, compare, sweeps). Importing this
package imports nothing."""
