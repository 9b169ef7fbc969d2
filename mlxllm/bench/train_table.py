"""The table `mlxllm bench train` prints: one per config, a row per implementation and dtype, and the
figures each column is computed from underneath."""

from __future__ import annotations

import math
import sys
from typing import Any

from mlxllm.bench.precision_rows import footnotes, mfu_text

COLUMNS = (
    "implementation",
    "dtype",
    "tokens/s",
    "vs torch eager",
    "ms/step",
    "MFU",
    "MFU (executed)",
    "peak MB",
    "max RSS MB",
    "traces",
    "recompiles",
    "first step s",
    "CPU/wall",
)


def _name(r: dict[str, Any]) -> str:
    return r["impl"] if r["dtype"] == "float32" else f"{r['impl']} {r['dtype']}"


def _cells(r: dict[str, Any]) -> list[str]:
    return [
        r["impl"],
        r["dtype_label"],
        f"{r['tokens_per_s']:,.0f}",
        "-" if r["vs_torch_eager"] is None else f"{r['vs_torch_eager']:.2f}x",
        f"{r['step_ms']:.0f}",
        mfu_text(r, "mfu"),
        mfu_text(r, "exec_mfu"),
        "-" if math.isnan(r["peak_mem_mb"]) else f"{r['peak_mem_mb']:.0f}",
        f"{r['max_rss_mb']:.0f}",
        *(("-", "-") if r["recompiles"] is None else (str(r["traces"]), str(r["recompiles"]))),  # compiled rows only
        f"{r['first_step_s']:.1f}",
        f"{r['cpu_per_wall']:.2f}",
    ]


def print_table(results: list[dict[str, Any]], notes: list[str] = ()) -> None:
    """Print `results` (train.run_benchmark's rows) as a table per config, then `notes`."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    for cfg_name in dict.fromkeys(r["config"] for r in results):
        rows = [r for r in results if r["config"] == cfg_name]
        m = rows[0]["model"]
        title = (
            f"{cfg_name}: {m['n_layers']} layers x d_model {m['d_model']}, {m['n_heads']} heads, "
            f"context {m['seq_len']}, batch {m['batch_size']}, vocab {m['vocab_size']}, fp32 AdamW"
        )
        t = Table(title=title)
        for c in COLUMNS:
            t.add_column(c, justify="left" if c in ("implementation", "dtype") else "right")
        for r in rows:
            t.add_row(*_cells(r))
        console.print(t)
        r0 = next((r for r in rows if r["dtype"] == "float32"), rows[0])
        console.print(
            f"  peak for MFU: {r0['peak_flops'] / 1e9:.0f} GFLOP/s (the larger of the fp32 1024^2 matmul measured in "
            f"this run, {r0['peak_measured'] / 1e9:.0f}, and the CPU's theoretical peak); "
            f"model FLOPs/token {r0['model_flops_per_token'] / 1e6:.2f}M (ModelConfig.flops_per_token, as training "
            f"reports MFU), executed matmul FLOPs/token {r0['exec_flops_per_token'] / 1e6:.2f}M "
            "(mlxllm's attention path, "
            f"applied to every row); "
            f"tokens/s is the median of {len(r0['tokens_per_s_windows'])} interleaved windows of "
            f"{r0['windows'][0]['steps']} steps after a discarded warm-up window, the order rotated every round; "
            "vs torch eager: against PyTorch eager in the same dtype"
        )
        for line in footnotes(rows):
            console.print("  " + escape(line), highlight=False)
        used = [f"{r['impl']} {r['optimizer']}" for r in rows if r["optimizer"] and r["dtype"] == "float32"]
        used += [f"{_name(r)} {r['attention']}" for r in rows if r["attention"]]
        if used:
            console.print("  PyTorch AdamW / MLX attention: " + ", ".join(used), highlight=False)
    from mlxllm.cpu import blas
    from mlxllm.device import describe_cpu

    console.print(f"  CPU: {describe_cpu()}; BLAS: {blas.describe()}", highlight=False)
    for n in notes:
        console.print(f"[yellow]{n}[/yellow]")
