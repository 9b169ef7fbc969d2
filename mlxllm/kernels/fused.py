"""The fused kernels as MLX ops: Metal (`mx.fast.metal_kernel`) or CUDA (`mx.fast.cuda_kernel`) from one source.

forward -> (O, lse); backward: delta = rowsum(dO * O) in MLX ops, then the dQ kernel and the dK/dV kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from mlxllm.errors import MlxllmError
from mlxllm.kernels.source import INPUTS, OUTPUTS, kernel_source
from mlxllm.kernels.tiled import _check, attention_delta

import mlx.core as mx

HEAD_DIMS = (32, 64, 128)
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
PROBE_LEN = 8  # query and key rows of the input a shape's kernels are first built and run on
ROWS_PER_GROUP = 4  # SIMD groups (warps) per threadgroup: 128 threads


def inner_tile(head_dim: int) -> int:
    """Keys (queries for dK/dV) per shared-memory tile: 32, or 16 at D = 128 to stay under 32 KiB on Metal."""
    return 32 if head_dim <= 64 else 16


@functools.cache
def build_kernel(kind: str, backend: str) -> Any:
    """One MLX kernel object per (kind, backend); dtype, D, tiles, causal and G are template arguments,
    which MLX compiles and caches once per combination."""
    header, body = kernel_source(kind, backend)
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    return make(
        name=f"mlxllm_fa_{kind}",
        input_names=INPUTS[kind],
        output_names=OUTPUTS[kind],
        source=body,
        header=header,
        ensure_row_contiguous=True,
    )


def template_args(
    dtype: mx.Dtype, head_dim: int, causal: bool, groups: int, rows: int = ROWS_PER_GROUP, tile: int | None = None
) -> list[tuple[str, Any]]:
    tile = inner_tile(head_dim) if tile is None else tile
    return [("T", dtype), ("D", head_dim), ("NW", rows), ("BK", tile), ("CAUSAL", causal), ("G", groups)]


def _scalars(q: mx.array, k: mx.array, scale: float) -> tuple[mx.array, mx.array]:
    B, H, L, _ = q.shape
    return mx.array([B, H, k.shape[1], L], mx.int32), mx.array([scale], mx.float32)


def launch_grid(n_rows: int, heads: int, batch: int, rows: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, threadgroup) in threads, as both metal_kernel and cuda_kernel take them: one threadgroup of
    `rows` SIMD groups per `rows` query (or key) rows of one head."""
    groups = -(-n_rows // rows)
    return (groups * rows * 32, heads, batch), (rows * 32, 1, 1)


def _launch(
    kind: str,
    backend: str,
    inputs: list[mx.array],
    outputs: list[tuple[tuple[int, ...], mx.Dtype]],
    grid_rows: int,
    heads: int,
    batch: int,
    targs: list[tuple[str, Any]],
    rows: int,
    verbose: bool,
) -> list[mx.array]:
    grid, threadgroup = launch_grid(grid_rows, heads, batch, rows)
    return build_kernel(kind, backend)(
        inputs=inputs,
        template=targs,
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[s for s, _ in outputs],
        output_dtypes=[d for _, d in outputs],
        verbose=verbose,
    )


def fused_forward(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    causal: bool,
    backend: str,
    rows: int = ROWS_PER_GROUP,
    tile: int | None = None,
    verbose: bool = False,
) -> tuple[mx.array, mx.array]:
    B, H, L, D = q.shape
    dims, sc = _scalars(q, k, scale)
    targs = template_args(q.dtype, D, causal, H // k.shape[1], rows, tile)
    o, lse = _launch(
        "forward",
        backend,
        [q, k, v, dims, sc],
        [(q.shape, q.dtype), ((B, H, L), mx.float32)],
        L,
        H,
        B,
        targs,
        rows,
        verbose,
    )
    return o, lse


def fused_dq(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    do: mx.array,
    lse: mx.array,
    delta: mx.array,
    *,
    scale: float,
    causal: bool,
    backend: str,
    rows: int = ROWS_PER_GROUP,
    tile: int | None = None,
    verbose: bool = False,
) -> mx.array:
    B, H, L, D = q.shape
    dims, sc = _scalars(q, k, scale)
    targs = template_args(q.dtype, D, causal, H // k.shape[1], rows, tile)
    (dq,) = _launch(
        "dq", backend, [q, k, v, do, lse, delta, dims, sc], [(q.shape, q.dtype)], L, H, B, targs, rows, verbose
    )
    return dq


def fused_dkv(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    do: mx.array,
    lse: mx.array,
    delta: mx.array,
    *,
    scale: float,
    causal: bool,
    backend: str,
    rows: int = ROWS_PER_GROUP,
    tile: int | None = None,
    verbose: bool = False,
) -> tuple[mx.array, mx.array]:
    B, H, L, D = q.shape
    hkv = k.shape[1]
    dims, sc = _scalars(q, k, scale)
    targs = template_args(q.dtype, D, causal, H // hkv, rows, tile)
    dk, dv = _launch(
        "dkv",
        backend,
        [q, k, v, do, lse, delta, dims, sc],
        [(k.shape, k.dtype), (v.shape, v.dtype)],
        L,
        hkv,
        B,
        targs,
        rows,
        verbose,
    )
    return dk, dv


@functools.cache
def fused_function(scale: float, causal: bool, backend: str) -> Callable:
    """custom_function (q, k, v) -> (O, lse) with the two-kernel FlashAttention-2 backward as its VJP."""

    @mx.custom_function
    def fwd(q: mx.array, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        return fused_forward(q, k, v, scale=scale, causal=causal, backend=backend)

    @fwd.vjp
    def bwd(primals, cotangents, outputs):  # type: ignore[no-untyped-def]
        q, k, v = primals
        do, dlse = cotangents
        o, lse = outputs
        do = do.astype(q.dtype)
        delta = attention_delta(o, do, dlse)
        dq = fused_dq(q, k, v, do, lse, delta, scale=scale, causal=causal, backend=backend)
        dk, dv = fused_dkv(q, k, v, do, lse, delta, scale=scale, causal=causal, backend=backend)
        return dq, dk, dv

    return fwd


def unsupported(head_dim: int, dtype: str) -> str | None:
    """Why the fused kernels cannot run this head dim or dtype ('float32', 'bfloat16', ...), or None."""
    if head_dim not in HEAD_DIMS:
        dims = ", ".join(map(str, HEAD_DIMS[:-1])) + f" and {HEAD_DIMS[-1]}"
        return f"the fused kernels support head dims {dims} (d_model / n_heads), not {head_dim}"
    if getattr(mx, dtype, None) not in DTYPES:
        return f"the fused kernels compute in float32, float16 or bfloat16, not {dtype}"
    return None


@functools.cache
def kernel_error(backend: str, dtype: str, head_dim: int, groups: int) -> str | None:
    """None when the fused forward and backward kernels of this shape build and run on `backend`, else what
    went wrong (a Metal or NVRTC compile error, or no such back-end in this MLX). MLX compiles a kernel when
    it is first evaluated, so without this a failure would surface in the middle of the first step. Runs
    the kernels on a tiny causal input (groups query heads on one K/V head); never call it while tracing."""
    try:
        dt = getattr(mx, dtype)
        q = mx.zeros((1, groups, PROBE_LEN, head_dim), dt)
        kv = mx.zeros((1, 1, PROBE_LEN, head_dim), dt)
        fwd = fused_function(head_dim**-0.5, True, backend)

        def loss(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
            return fwd(q, k, v)[0].astype(mx.float32).sum()

        mx.eval(mx.grad(loss, argnums=(0, 1, 2))(q, kv, kv))
    except Exception as e:  # noqa: BLE001 - whatever stops the kernel from running means it cannot be used here
        return f"{type(e).__name__}: {e}"
    return None


def fused_attention(
    q: mx.array, k: mx.array, v: mx.array, *, scale: float, causal: bool = True, backend: str
) -> mx.array:
    """Fused attention on the GPU. q: (B, H, L, D); k, v: (B, Hkv, L, D); D in 32, 64, 128."""
    _check(q, k, v)
    why = unsupported(q.shape[-1], str(q.dtype).rsplit(".", 1)[-1])
    if why:
        raise MlxllmError(
            f"attention 'flash' cannot run this model on {backend}: {why}. Set model.attention = 'auto' "
            "(this device's fastest implementation that supports the model) or 'fast', or choose d_model and "
            "n_heads for a supported head dim."
        )
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    return fused_function(float(scale), bool(causal), backend)(q, k, v)[0]
