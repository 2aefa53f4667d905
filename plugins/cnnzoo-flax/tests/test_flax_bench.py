"""cnnzoo's ``python -m bench`` measures this outside backend against the hand-written loop the
package names (entry point group ``cnnzoo.bench_loops``), as a real subprocess from cnnzoo's
checkout. Only the shape and sanity of the rows are asserted, never a timing."""
import pytest

# cnnzoo's own `pytest` collects these too; without JAX there is nothing to test
pytest.importorskip("jax", reason="the flax plugin's framework is not installed")
import json
import subprocess
import sys

from flax_helpers import CNNZOO_ROOT


@pytest.mark.slow
def test_quick_bench_judges_the_product_against_the_plugins_jit_loop(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--parts", "training",
                           "--backends", "flax", "--out", str(tmp_path)], cwd=CNNZOO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [r for r in json.loads((tmp_path / "results.json").read_text())["rows"]
            if r["part"] == "training"]
    assert rows and all(r["backend"] == "flax" and r["arch"] == "lenet5" for r in rows)
    assert not [r for r in rows if r.get("status") == "error"], rows
    hand = [r for r in rows if r["measurement"].startswith("hand-written: jax.jit step")]
    product = [r for r in rows if r["measurement"].startswith("product")]
    assert hand and len(product) == 1 and all(r["median"] > 0 for r in hand + product)
    # judged against the jit loop timed in the product's own process
    assert product[0]["baseline"].startswith("hand-written, in the product's process")
    assert product[0]["ratio"] == pytest.approx(
        product[0]["median"] / float(product[0]["baseline"].split("(")[1].split()[0]
                                     .replace(",", "")), rel=0.01)
