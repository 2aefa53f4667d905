"""cnnzoo's benchmark harness: ``python -m bench`` (see ``bench/__main__.py`` and
docs/benchmarks.md). One module per measurement: ``training`` (product vs hand-written loops),
``peak`` (fp32 matmul peak; efficiency is derived in ``report``), ``inference`` (native vs
onnxruntime), ``startup`` (run.py subprocesses), ``pipeline`` (data pipeline); ``common``
(statistics, rows, fingerprint, child processes), ``child`` (the child processes' entry point),
``report`` (targets and the CSV/JSON/Markdown files). ``accuracy`` (``python -m
bench.accuracy``: the README's accuracy table), ``sweep_parallel.py`` and ``data_pipeline.py``
are stand-alone."""
