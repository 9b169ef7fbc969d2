"""Time and peak memory of attention forward+backward for each implementation on this device.

`mlxllm bench attention [--record]`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mlxllm.attention import attention
from mlxllm.device import device_name
from mlxllm.kernels import gpu_backend
from mlxllm.kernels.fused import kernel_error
from mlxllm.kernels.select import IMPLS, KernelProbe, Shape, record_choice, say, unsupported

import mlx.core as mx

# "reference" is the unfused baseline, the full L x L score matrix in plain MLX ops, never recorded as
# the 'auto' choice; "halves" skips a quarter of it (query halves) from L = 128.


def available_impls(shape: Shape, groups: int = 1, probe: KernelProbe = kernel_error) -> list[str]:
    """The implementations to time for `shape`: 'flash' only on a GPU (on the CPU it is the tiled path again)
    and where its kernels support the shape and build (`probe`), so that it is never recorded for a shape it
    cannot run. groups: query heads per K/V head."""
    impls = ["reference", "halves", "fast", "tiled"]
    if gpu_backend() is not None:
        why = unsupported("flash", shape) or probe(shape.backend, shape.dtype, shape.head_dim, groups)
        if why:
            say(f"attention: 'flash' is left out for {shape.describe()}: {why}")
        else:
            impls.append("flash")
    return impls


def _attention_fn(impl: str) -> Callable[..., mx.array]:
    return lambda q, k, v, scale: attention(q, k, v, scale=scale, causal=True, impl=impl)


def _measure(impl: str, L: int, batch: int, heads: int, head_dim: int, dtype: mx.Dtype, repeats: int) -> dict[str, Any]:
    mx.random.seed(0)
    q, k, v, cot = (mx.random.normal((batch, heads, L, head_dim)).astype(dtype) for _ in range(4))
    mx.eval(q, k, v, cot)
    fn = _attention_fn(impl)
    scale = head_dim**-0.5
    step = mx.grad(lambda q, k, v: (fn(q, k, v, scale) * cot).astype(mx.float32).sum(), argnums=(0, 1, 2))
    mx.eval(step(q, k, v))  # warm-up: kernel JIT, allocator
    mx.synchronize()
    mx.reset_peak_memory()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(step(q, k, v))
        mx.synchronize()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "L": L, "ms": 1000 * min(times), "peak_mb": mx.get_peak_memory() / 2**20}


def bench_attention(
    lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096),
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    dtype: str = "float32",
    impls: list[str] | None = None,
    record: bool = False,
) -> list[dict[str, Any]]:
    """One row per (L, impl): {'impl', 'L', 'ms', 'peak_mb'} for forward+backward (grad wrt q, k, v of
    sum(out * cotangent)), causal. With record=True the implementation with the lowest total time over
    all lengths becomes the 'auto' choice for training this dtype and head dim on this device."""
    shape = Shape(device_name(), dtype, head_dim, training=True)
    impls = list(impls) if impls else available_impls(shape)
    dt = getattr(mx, dtype)
    rows = []
    for L in lengths:
        repeats = 3 if L <= 1024 else 2
        for impl in impls:
            rows.append(_measure(impl, L, batch, heads, head_dim, dt, repeats))
    if record:
        totals = {impl: sum(r["ms"] for r in rows if r["impl"] == impl) for impl in impls if impl in IMPLS}
        best = min(totals, key=totals.__getitem__)
        path = record_choice(best, shape)
        for r in rows:
            r["recorded"] = r["impl"] == best
        rows[0]["record_path"] = str(path)
        rows[0]["record_shape"] = shape.describe()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """Implementations side by side per sequence length: time (ms) and peak memory (MiB)."""
    from rich.console import Console
    from rich.table import Table

    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by = {(r["L"], r["impl"]): r for r in rows}
    table = Table(title=f"attention forward+backward on {device_name()} (causal)")
    table.add_column("L", justify="right")
    for impl in impls:
        table.add_column(f"{impl} ms", justify="right")
        table.add_column(f"{impl} MiB", justify="right")
    for L in dict.fromkeys(r["L"] for r in rows):
        cells = [str(L)]
        for impl in impls:
            r = by.get((L, impl))
            cells += [f"{r['ms']:.1f}", f"{r['peak_mb']:.0f}"] if r else ["-", "-"]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    recorded = [r["impl"] for r in rows if r.get("recorded")]
    if recorded:
        console.print(
            f"recorded '{recorded[0]}' as auto attention for {rows[0]['record_shape']} in {rows[0]['record_path']}"
        )
