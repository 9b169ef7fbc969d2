"""Causal self-attention as two query halves, with its gradient written out.

The first half of the queries never scores the second half's keys, so a quarter of the score
matrix (its FLOPs and its softmax passes) is never computed; the result is exact. More, smaller
blocks lose more to small matmuls and slice gradients than they save.

The gradient is written out rather than traced through the slices, the mask and the softmax: a
slice's traced gradient is a zero array with the slice written into it, and the softmax's needs
a product the size of the score matrix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from mlxllm.cpu import fastexp

import mlx.core as mx

# Causal training attention from this length up is computed as two query halves.
SPLIT_MIN_LEN = 128


def causal_halves_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float) -> mx.array:
    """Causal self-attention (L == S). q: (B, H, L, D); k, v: (B, Hkv, L, D) -> (B, H, L, D)."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    q = q.reshape(B, Hkv, H // Hkv, L, D)  # query heads grouped by the K/V head they share
    # v arrives as a transposed view; each matmul would copy it (three times over, forward and back).
    out = _halves(float(scale))(q, k[:, :, None], mx.contiguous(v)[:, :, None])[0]
    # Written in (B, L, H, D) order, which the output projection reads: the caller's transpose back
    # is then a view, not a copy, and the gradient arrives in the same order.
    return out.reshape(B, L, H, D).transpose(0, 2, 1, 3)


def _exp(x: mx.array) -> mx.array:
    """exp of x <= 0."""
    return fastexp.exp_nonpositive(x) if fastexp.use_fast_exp() else mx.exp(x)


def _scores_exp(q: mx.array, k: mx.array, offset: int, scale: float) -> tuple[mx.array, mx.array]:
    """e = exp(scale * (q k^T - row max)) under the causal mask, query i at key position offset + i,
    and its row sums: the softmax is e / sum, the division left to the (smaller) output."""
    s = (q @ k.swapaxes(-1, -2)).astype(mx.float32)  # softmax in fp32 whatever the compute dtype
    mask = mx.arange(offset, offset + q.shape[-2])[:, None] >= mx.arange(k.shape[-2])[None]
    s = mx.where(mask, s, mx.array(-mx.inf, s.dtype))
    e = _exp((s - s.max(axis=-1, keepdims=True)) * scale)
    return e, e.sum(axis=-1, keepdims=True)


def _sum_groups(x: mx.array) -> mx.array:
    return x.squeeze(2) if x.shape[2] == 1 else x.sum(axis=2)


@functools.cache
def _halves(scale: float) -> Callable:
    """The two-halves attention with its gradient, for one scale. q: (B, Hkv, G, L, D);
    k, v: (B, Hkv, 1, L, D). Returns (out in (B, L, Hkv, G, D) order, e1, l1, e2, l2); the last four
    only feed the gradient."""

    @mx.custom_function
    def halves(q: mx.array, k: mx.array, v: mx.array) -> tuple[mx.array, ...]:
        h = q.shape[3] // 2
        e1, l1 = _scores_exp(q[:, :, :, :h], k[:, :, :, :h], 0, scale)
        e2, l2 = _scores_exp(q[:, :, :, h:], k, h, scale)
        o1 = (e1.astype(v.dtype) @ v[:, :, :, :h]) / l1
        o2 = (e2.astype(v.dtype) @ v) / l2
        o = mx.concatenate([o1.transpose(0, 3, 1, 2, 4), o2.transpose(0, 3, 1, 2, 4)], axis=1)
        return o.astype(q.dtype), e1, l1, e2, l2

    @halves.vjp
    def _halves_vjp(primals, cotangents, outputs):
        q, k, v = primals
        o, e1, l1, e2, l2 = outputs
        h = q.shape[3] // 2
        do, dt = cotangents[0], q.dtype
        # Row sums of dP * P, as the rows of dO * O (D wide, not the score matrix's L wide).
        d = (do.astype(mx.float32) * o.astype(mx.float32)).sum(axis=-1, keepdims=True)
        do, d = do.transpose(0, 2, 3, 1, 4), d.transpose(0, 2, 3, 1, 4)  # to (B, Hkv, G, L, .)

        def score_grad(e, l, do_half, d_half, v_keys):
            dp = do_half @ v_keys.swapaxes(-1, -2)
            return (e * (dp - d_half) * (scale / l)).astype(dt)  # masked entries: e is (almost) 0

        ds1 = score_grad(e1, l1, do[:, :, :, :h], d[:, :, :, :h], v[:, :, :, :h])
        ds2 = score_grad(e2, l2, do[:, :, :, h:], d[:, :, :, h:], v)
        dq = mx.concatenate([ds1 @ k[:, :, :, :h], ds2 @ k], axis=3)

        def key_grad(g1, g2):  # the second half's keys cover all L; the first half's the first h
            g1, g2 = _sum_groups(g1), _sum_groups(g2)
            return mx.concatenate([g2[:, :, :h] + g1, g2[:, :, h:]], axis=2)[:, :, None]

        dk = key_grad(ds1.swapaxes(-1, -2) @ q[:, :, :, :h], ds2.swapaxes(-1, -2) @ q[:, :, :, h:])
        dv = key_grad(
            e1.astype(dt).swapaxes(-1, -2) @ (do[:, :, :, :h] / l1).astype(dt),
            e2.astype(dt).swapaxes(-1, -2) @ (do[:, :, :, h:] / l2).astype(dt),
        )
        return dq, dk, dv

    return halves
