"""The machine's fp32 matrix-multiply peak: square float32 GEMMs at a few sizes on all physical
cores, through every fast GEMM installed: oneDNN (torch's mkldnn ``Linear``: the library behind
the frameworks' CPU convolutions), torch.mm (torch's BLAS, MKL) and numpy (OpenBLAS). The best
median of any of them is the peak that compute efficiency divides by. (On AMD CPUs MKL does not
take its AVX-512 path, so torch.mm alone can sit at half of what oneDNN reaches: a "peak" that
convolutions then beat.)"""
from __future__ import annotations

from bench.common import Row, Stats, timed


def gemms(n: int):
    """(name, zero-argument callable computing an n x n x n fp32 GEMM) per library."""
    import numpy as np
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = [("torch.mm (BLAS)", lambda: torch.mm(a, b))]
    if torch.backends.mkldnn.is_available():
        from torch.utils import mkldnn as mkldnn_utils
        linear = torch.nn.Linear(n, n, bias=False)
        linear.weight.data = b.t().contiguous()  # x @ W.T == a @ b
        dnn, x = mkldnn_utils.to_mkldnn(linear), a.to_mkldnn()
        out.append(("oneDNN matmul (torch mkldnn Linear)", lambda: dnn(x)))
    an, bn = a.numpy(), b.numpy()
    out.append((f"numpy.matmul ({np.__version__})", lambda: an @ bn))
    return out


def measure(args: dict) -> list[Row]:
    import torch
    threads = args["threads"]
    torch.set_num_threads(threads)
    rows = []
    with torch.no_grad():
        for n in args["sizes"]:
            flop = 2.0 * n ** 3
            for name, fn in gemms(n):
                seconds = timed(fn, warmup=args["warmup"], reps=args["reps"])
                rows.append(Row("peak", f"{name} fp32 {n}x{n}", "matmul", "GFLOP/s",
                                Stats.of([flop / s / 1e9 for s in seconds]), threads=threads,
                                warmup=args["warmup"], variant=name))
    best = max(rows, key=lambda r: r.stats.median)
    rows.append(Row("peak", "fp32 matmul peak", "matmul", "GFLOP/s", best.stats,
                    threads=threads, warmup=args["warmup"], variant=best.measurement,
                    note=f"best of {len(rows)} GEMMs ({args.get('when', 'start')} of run)"))
    return rows
