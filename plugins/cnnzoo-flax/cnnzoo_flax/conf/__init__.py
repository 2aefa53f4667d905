"""conf/backend/flax.yaml: found by cnnzoo's Hydra search-path plugin."""
