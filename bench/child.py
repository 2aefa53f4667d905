"""Entry point of the benchmark's child processes: ``python -m bench.child JOBS_JSON OUT_JSON``.

JOBS_JSON holds ``{"env": {...}, "jobs": [{"task": ..., "args": {...}}, ...]}``; the jobs run one
after another in this process (one framework, one set of thread settings) and OUT_JSON receives
``[{"rows": [...]} or {"error": "..."} per job]``. A failing job does not stop the others."""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from bench.common import ROOT  # noqa: F401  (puts the repository on sys.path)


def _tasks() -> dict:
    from bench import inference, peak, pipeline, training
    return {"peak": peak.measure, "train_product": training.product,
            "train_hand": training.handwritten, "inference": inference.measure,
            "pipeline": pipeline.backend_pipeline, "formats": pipeline.formats}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    tasks = _tasks()
    results = []
    for job in spec["jobs"]:
        try:
            rows = tasks[job["task"]](job["args"])
            results.append({"rows": [r.to_json() for r in rows]})
        except Exception as err:  # noqa: BLE001  reported as an error row, the others go on
            traceback.print_exc()
            results.append({"error": f"{type(err).__name__}: {err}".strip()[:500]})
        Path(argv[1]).write_text(json.dumps(results))  # what is done survives a later crash
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
