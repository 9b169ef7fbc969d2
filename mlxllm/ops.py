"""The model's elementwise math, one function per op: MLX's own op, or on the CPU backend the
equal one from `mlxllm.cpu` that MLX's CPU compiler runs faster. The one place that chooses."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxllm.cpu import fastexp, layers


def _cpu() -> bool:
    return mx.default_device() == mx.cpu


def silu(x: mx.array) -> mx.array:
    return fastexp.silu(x) if fastexp.use_fast_exp() else nn.silu(x)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis."""
    return fastexp.softmax(x) if fastexp.use_fast_exp() else mx.softmax(x, axis=-1)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean cross-entropy of integer targets."""
    if fastexp.use_fast_exp():
        return fastexp.cross_entropy(logits, targets).mean()
    return nn.losses.cross_entropy(logits, targets, reduction="mean")


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    if _cpu() and x.size >= fastexp.PER_STREAM_MIN_SIZE:
        return layers.rms_norm(float(eps))(x, weight)
    return mx.fast.rms_norm(x, weight, eps)


def prepare_rope(max_len: int, dims: int, base: float) -> None:
    """Make the rotary table that `rope` reads for whole sequences, outside any traced function."""
    layers.prepare_rope_table(max_len, dims, float(base))


def rope(x: mx.array, *, base: float, offset: int | None) -> mx.array:
    """Llama's rotate-half rotary embedding of x: (B, L, H, D), returned as (B, H, L, D).

    offset None: a whole sequence from position 0 (training); else positions from offset (decoding)."""
    if offset is None and _cpu():
        return layers.sequence_rope(float(base))(x)
    return mx.fast.rope(x.transpose(0, 2, 1, 3), x.shape[-1], traditional=False, base=base, scale=1.0,
                        offset=offset or 0)
