"""Fused causal attention: Metal/CUDA kernels, their tiled MLX reference, and the 'auto' choice.

`mlxllm.attention.attention` calls `flash_attention` (impl="flash"), `tiled_attention` (impl="tiled")
and `resolve_auto` (impl="auto"); a run checks its model's choice first with `choose`.
"""

from __future__ import annotations

from mlxllm.device import backend
from mlxllm.kernels.select import Shape, choose, record_choice, resolve_auto
from mlxllm.kernels.tiled import tiled_attention

import mlx.core as mx


def gpu_backend() -> str | None:
    """'metal' or 'cuda' when a kernel backend exists and the GPU is the default device, else None."""
    kind = backend()
    return None if kind == "cpu" else kind


def flash_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float, causal: bool = True) -> mx.array:
    """Fused attention: the Metal or CUDA kernel on a GPU, the tiled reference elsewhere."""
    kind = gpu_backend()
    if kind is None:
        return tiled_attention(q, k, v, scale=scale, causal=causal)
    from mlxllm.kernels.fused import fused_attention

    return fused_attention(q, k, v, scale=scale, causal=causal, backend=kind)


__all__ = [
    "Shape",
    "choose",
    "flash_attention",
    "gpu_backend",
    "record_choice",
    "resolve_auto",
    "tiled_attention",
]
