"""``task=summary``: the spec's per-layer table (name, type, output shape, params, FLOPs)."""
from __future__ import annotations

from architectures.spec import Analysis, describe


def layer_rows(analysis: Analysis) -> list[dict]:
    return [{"name": r.node.name, "type": describe(r.node.layer), "inputs": list(r.node.inputs),
             "output_shape": list(r.out_shape), "params": r.params, "flops": r.flops}
            for r in analysis.layers]


def print_table(analysis: Analysis, min_input_size: int) -> None:
    from rich.console import Console
    from rich.table import Table

    spec = analysis.spec
    table = Table(title=f"{spec.name}: input {'x'.join(map(str, analysis.input_shape))}, "
                        f"{spec.num_classes} classes", title_justify="left")
    for col, justify in (("layer", "left"), ("type", "left"), ("output", "right"),
                         ("params", "right"), ("FLOPs", "right")):
        table.add_column(col, justify=justify)
    for row in layer_rows(analysis):
        table.add_row(row["name"], row["type"], "x".join(map(str, row["output_shape"])),
                      f"{row['params']:,}" if row["params"] else "", _flops(row["flops"]))
    Console().print(table)
    print(f"total parameters: {analysis.params:,}")
    print(f"total FLOPs per image: {analysis.flops:,} ({_flops(analysis.flops)}; "
          "2 x multiply-adds of conv and dense layers)")
    print(f"minimum input size: {min_input_size}")


def _flops(n: int) -> str:
    if not n:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
