"""The built-in backends, one package each with the same module names. Each package's
``__init__`` declares the backend (``cnnzoo.core.backend.BackendInfo``) without importing its
framework; the entry points in pyproject.toml register them exactly as an outside plugin would."""
