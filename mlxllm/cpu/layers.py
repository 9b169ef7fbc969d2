"""Rotary embeddings for a whole sequence and RMSNorm, with their gradients written out.

On the CPU, mx.fast.rope is made of half-width kernels, a concatenate and a transposed copy for
its gradient, and MLX derives mx.fast.rms_norm's gradient from the norm's unfused definition.
These compute the same values in fewer passes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import mlx.core as mx


def rope_angles(length: int, dims: int, base: float) -> tuple[mx.array, mx.array]:
    """cos and sin of position * frequency, (length, dims // 2), as mx.fast.rope computes them."""
    half = dims // 2
    inv_freq = mx.exp(-mx.arange(0, half, dtype=mx.float32) / half * math.log(base))
    angles = mx.arange(length, dtype=mx.float32)[:, None] * inv_freq[None]
    return mx.cos(angles), mx.sin(angles)


def _rotate(x5: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Llama's rotate-half rotation of x5 = (..., 2, D/2) halves: (x1 c - x2 s, x2 c + x1 s), as
    one elementwise kernel that reads the halves swapped through a reversed view (no concatenate)."""
    return x5 * cos[..., None, :] + x5[..., ::-1, :] * mx.stack([-sin, sin], axis=-2)


def sequence_rope(base: float, table: tuple[mx.array, mx.array] | None = None) -> Callable[[mx.array], mx.array]:
    """x: (B, L, H, D), positions 0..L-1 -> rotated, in (B, H, L, D) order.

    The same rotation as mx.fast.rope(x.transpose(0, 2, 1, 3), offset=0); the rotation and the
    transpose are one pass forward and one back (the gradient rotates by -angle). `table`: the
    evaluated `rope_angles` of some length (the model's context, see `ops.Rope`), read for sequences
    up to that length; without it a traced step computes the angles again on every call, forward and back."""

    def angles(length: int, dims: int) -> tuple[mx.array, mx.array]:
        if table is not None and table[0].shape[0] >= length and 2 * table[0].shape[1] == dims:
            return table[0][:length], table[1][:length]
        return rope_angles(length, dims, base)

    @mx.custom_function
    def rope(x: mx.array) -> mx.array:
        B, L, H, D = x.shape
        cos, sin = (t.astype(x.dtype) for t in angles(L, D))  # (L, D/2)
        x5 = x.reshape(B, L, H, 2, D // 2).transpose(0, 2, 1, 3, 4)
        return _rotate(x5, cos, sin).reshape(B, H, L, D)

    @rope.vjp
    def _rope_vjp(x, cotangent, output):
        B, L, H, D = x.shape
        cos, sin = (t.astype(cotangent.dtype)[:, None] for t in angles(L, D))  # (L, 1, D/2)
        g5 = cotangent.reshape(B, H, L, 2, D // 2).transpose(0, 2, 1, 3, 4)
        return _rotate(g5, cos, -sin).reshape(B, L, H, D)

    return rope


@functools.cache
def rms_norm(eps: float) -> Callable[[mx.array, mx.array], mx.array]:
    """mx.fast.rms_norm with its gradient written out. For training-sized arrays: decoding one token,
    the wrapper costs more than it saves."""

    @mx.custom_function
    def norm(x: mx.array, weight: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, weight, eps)

    @norm.vjp
    def _norm_vjp(primals, cotangent, output):
        x, weight = primals
        f32 = mx.float32  # as the forward kernel computes (a no-op for fp32 training)
        x32, cot32 = x.astype(f32), cotangent.astype(f32)
        # 1 / d as a computed scalar, not mx.mean's constant: MLX's CPU compiler writes constants into a fused
        # kernel's source, so each new width would compile its own kernels (seconds each) on first use.
        inv_d = 1.0 / mx.sum(mx.ones_like(weight, dtype=f32))
        r = mx.rsqrt(mx.sum(mx.square(x32), axis=-1, keepdims=True) * inv_d + eps)
        normed, g = x32 * r, cot32 * weight.astype(f32)
        dx = r * (g - normed * (mx.sum(g * normed, axis=-1, keepdims=True) * inv_d))
        dw = (cot32 * normed).reshape(-1, x.shape[-1]).sum(axis=0)
        return dx.astype(x.dtype), dw.astype(weight.dtype)

    return norm
