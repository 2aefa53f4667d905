"""The core every backend builds on: errors, data, checkpoints, run directory, progress, the
training protocol and the backend contract. Imports only the spec (``architectures``)."""
