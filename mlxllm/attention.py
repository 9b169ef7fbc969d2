"""The attention() seam: every attention in the model goes through this one function, which picks
the implementation (model.attention: auto, fast, flash, tiled, halves, reference; see
config.ATTENTION_IMPLS) for this device."""

from __future__ import annotations

from mlxllm import kernels, ops
from mlxllm.config import ATTENTION_IMPLS
from mlxllm.cpu.halves import SPLIT_MIN_LEN, causal_halves_attention
from mlxllm.device import device_name
from mlxllm.errors import MlxllmError

import mlx.core as mx


def _grouped(q: mx.array, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Query heads grouped by the K/V head they share, instead of K/V repeated in memory."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    if Hkv == H:
        return q, k, v
    return q.reshape(B, Hkv, H // Hkv, L, D), k[:, :, None], v[:, :, None]


def reference_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float, causal: bool) -> mx.array:
    """Plain MLX ops at every length: the whole score matrix, masked, and the model's softmax
    (ops.softmax); the baseline the other implementations are checked against.
    q: (B, H, L, D); k, v: (B, Hkv, S, D); queries aligned to the end of keys."""
    B, H, L, D = q.shape
    S = k.shape[2]
    q, k, v = _grouped(q, k, v)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if causal:
        mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
    out = ops.softmax(scores.astype(mx.float32)).astype(v.dtype) @ v
    return out.reshape(B, H, L, D)


def resolve_attention(impl: str, shape: kernels.Shape | None = None) -> str:
    """Turn 'auto' into a concrete implementation for `shape` on this device (None: the device's own choice)."""
    return kernels.resolve_auto(shape) if impl == "auto" else impl


def shape_of(q: mx.array, training: bool) -> kernels.Shape:
    """The Shape (kernels.select) of queries q (B, H, L, D) on this device."""
    return kernels.Shape(device_name(), str(q.dtype).rsplit(".", 1)[-1], q.shape[-1], training)


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    causal: bool = True,
    impl: str = "auto",
    training: bool = True,
) -> mx.array:
    """Scaled dot-product attention. q: (B, H, L, D); k, v: (B, Hkv, S, D) with H % Hkv == 0.
    training: whether a backward pass follows (what 'auto' chooses for; a module passes its .training)."""
    if impl == "auto":
        impl = kernels.resolve_auto(shape_of(q, training))
    if impl == "fast":
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)
    if impl == "reference":
        return reference_attention(q, k, v, scale=scale, causal=causal)
    if impl == "halves" or q.shape[2] != k.shape[2]:
        if causal and q.shape[2] == k.shape[2] >= SPLIT_MIN_LEN:
            return causal_halves_attention(q, k, v, scale=scale)
        # Short sequences, and decoding with a KV cache (L != S): a small matmul, for which the whole
        # score matrix is the right path.
        return reference_attention(q, k, v, scale=scale, causal=causal)
    if impl == "flash":
        return kernels.flash_attention(q, k, v, scale=scale, causal=causal)
    if impl == "tiled":
        return kernels.tiled_attention(q, k, v, scale=scale, causal=causal)
    raise MlxllmError(f"Unknown attention implementation {impl!r}; choose one of {', '.join(ATTENTION_IMPLS)}.")


def decode_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float, visible: mx.array) -> mx.array:
    """Attention of L new tokens over whole KV-cache buffers, for a traced decode step.

    q: (B, H, L, D); k, v: (B, Hkv, S, D) buffers, of which each query attends to the positions
    `visible` (L, S) marks: its own and those before it that hold tokens. Shapes do not depend on
    the position, so a compiled step is traced once per buffer size, not once per token."""
    if kernels.gpu_backend() is not None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=visible)
    B, H, L, D = q.shape
    q, k, v = _grouped(q, k, v)
    # On the CPU every op of a one-token step costs more in dispatch than in arithmetic: the scale
    # and mask are one fused kernel and MLX's own softmax one more (the mlxllm.cpu fast exp that
    # training uses would be several).
    scores = mx.where(visible, (q @ k.swapaxes(-1, -2)) * scale, mx.array(-mx.inf, q.dtype))
    out = mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype) @ v
    return out.reshape(B, H, L, D)
