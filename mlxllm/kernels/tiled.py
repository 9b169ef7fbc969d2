"""FlashAttention-2 in plain MLX ops: the same tiles, online softmax and backward split as the GPU kernels.

It runs on any device. Its point is memory: no (L, S) score matrix is ever materialised, only
(q_tile, k_tile) blocks, so peak memory grows linearly with the sequence length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx

# Large tiles keep the Python-built graph small; on the CPU a 512 x 512 block is one cheap matmul.
TILE_Q = 512
TILE_K = 512


def _split_heads(q: mx.array, hkv: int) -> mx.array:
    """(B, H, L, D) -> (B, Hkv, G, L, D): the G query heads that share one K/V head, without copies."""
    B, H, L, D = q.shape
    return q.reshape(B, hkv, H // hkv, L, D)


def _block_mask(q0: int, nq: int, k0: int, nk: int) -> mx.array:
    """Causal mask for a block whose rows start at q0 and columns at k0 (queries aligned with keys)."""
    return mx.arange(q0, q0 + nq)[:, None] >= mx.arange(k0, k0 + nk)[None]


def _tiles(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(size, n - s)) for s in range(0, n, size)]


def _scores(qb: mx.array, kb: mx.array, scale: float) -> mx.array:
    # qb: (B, Hkv, G, nq, D) fp32, kb: (B, Hkv, nk, D) fp32 -> (B, Hkv, G, nq, nk)
    return (qb @ kb[:, :, None].swapaxes(-1, -2)) * scale


def _masked(s: mx.array, causal: bool, q0: int, nq: int, k0: int, nk: int) -> mx.array:
    # Only blocks that straddle the diagonal need a mask; blocks above it are never visited.
    if causal and k0 + nk - 1 > q0:
        s = mx.where(_block_mask(q0, nq, k0, nk), s, -mx.inf)
    return s


def tiled_forward(
    q: mx.array, k: mx.array, v: mx.array, *, scale: float, causal: bool, tile_q: int = TILE_Q, tile_k: int = TILE_K
) -> tuple[mx.array, mx.array]:
    """Returns O (B, H, L, D) in q's dtype and the row log-sum-exp (B, H, L) in fp32."""
    B, H, L, D = q.shape
    hkv, S = k.shape[1], k.shape[2]
    qg = _split_heads(q, hkv)
    outs, lses = [], []
    for q0, nq in _tiles(L, tile_q):
        qb = qg[:, :, :, q0 : q0 + nq].astype(mx.float32)
        m = mx.full(qb.shape[:-1], -mx.inf, mx.float32)
        l = mx.zeros(qb.shape[:-1], mx.float32)
        acc = mx.zeros(qb.shape, mx.float32)
        for k0, nk in _tiles(S, tile_k):
            if causal and k0 > q0 + nq - 1:
                break  # every later key tile is above the diagonal
            kb = k[:, :, k0 : k0 + nk].astype(mx.float32)
            vb = v[:, :, k0 : k0 + nk].astype(mx.float32)
            s = _masked(_scores(qb, kb, scale), causal, q0, nq, k0, nk)
            m_new = mx.maximum(m, s.max(-1))
            p = mx.exp(s - m_new[..., None])
            alpha = mx.exp(m - m_new)  # exp(-inf) = 0 on the first tile
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vb[:, :, None]
            m = m_new
        outs.append((acc / l[..., None]).astype(q.dtype))
        lses.append(m + mx.log(l))
    o = mx.concatenate(outs, axis=3).reshape(B, H, L, D)
    lse = mx.concatenate(lses, axis=3).reshape(B, H, L)
    return o, lse


def tiled_backward(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    lse: mx.array,
    delta: mx.array,
    do: mx.array,
    *,
    scale: float,
    causal: bool,
    tile_q: int = TILE_Q,
    tile_k: int = TILE_K,
) -> tuple[mx.array, mx.array, mx.array]:
    """FlashAttention-2 backward: a dQ pass over key tiles and a dK/dV pass over query tiles, no scatter-adds.

    Probabilities are recomputed from the saved log-sum-exp: P = exp(S - lse); dS = P * (dO.V^T - delta).
    """
    B, H, L, D = q.shape
    hkv, S = k.shape[1], k.shape[2]
    G = H // hkv
    qg = _split_heads(q, hkv)
    dog = _split_heads(do, hkv)
    lg = lse.reshape(B, hkv, G, L)
    dg = delta.reshape(B, hkv, G, L)

    def block(q0: int, nq: int, k0: int, nk: int) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array]:
        qb = qg[:, :, :, q0 : q0 + nq].astype(mx.float32)
        dob = dog[:, :, :, q0 : q0 + nq].astype(mx.float32)
        kb = k[:, :, k0 : k0 + nk].astype(mx.float32)
        vb = v[:, :, k0 : k0 + nk].astype(mx.float32)
        s = _masked(_scores(qb, kb, scale), causal, q0, nq, k0, nk)
        p = mx.exp(s - lg[:, :, :, q0 : q0 + nq, None])
        dp = dob @ vb[:, :, None].swapaxes(-1, -2)
        ds = p * (dp - dg[:, :, :, q0 : q0 + nq, None])
        return qb, dob, kb, p, ds

    # dQ: each query tile walks the key tiles up to the diagonal.
    dqs = []
    for q0, nq in _tiles(L, tile_q):
        dq = None
        for k0, nk in _tiles(S, tile_k):
            if causal and k0 > q0 + nq - 1:
                break
            _, _, kb, _, ds = block(q0, nq, k0, nk)
            part = ds @ kb[:, :, None]
            dq = part if dq is None else dq + part
        dqs.append((dq * scale).astype(q.dtype))
    dq = mx.concatenate(dqs, axis=3).reshape(B, H, L, D)

    # dK/dV: each key tile walks the query tiles from the diagonal down, summing over its G query heads.
    dks, dvs = [], []
    for k0, nk in _tiles(S, tile_k):
        dk = dv = None
        for q0, nq in _tiles(L, tile_q):
            if causal and k0 > q0 + nq - 1:
                continue  # this query tile is entirely before the key tile
            qb, dob, _, p, ds = block(q0, nq, k0, nk)
            dv_part = (p.swapaxes(-1, -2) @ dob).sum(2)
            dk_part = (ds.swapaxes(-1, -2) @ qb).sum(2)
            dv = dv_part if dv is None else dv + dv_part
            dk = dk_part if dk is None else dk + dk_part
        dks.append((dk * scale).astype(k.dtype))
        dvs.append(dv.astype(v.dtype))
    return dq, mx.concatenate(dks, axis=2), mx.concatenate(dvs, axis=2)


def attention_delta(o: mx.array, do: mx.array, dlse: mx.array | None = None) -> mx.array:
    """rowsum(dO * O) in fp32. A cotangent on the log-sum-exp output folds in here: dS += dlse * P."""
    delta = (do.astype(mx.float32) * o.astype(mx.float32)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.astype(mx.float32)
    return delta


@functools.cache
def tiled_function(scale: float, causal: bool, tile_q: int = TILE_Q, tile_k: int = TILE_K) -> Callable:
    """A custom_function (q, k, v) -> (O, lse) whose VJP is the tiled backward."""

    @mx.custom_function
    def fwd(q: mx.array, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        return tiled_forward(q, k, v, scale=scale, causal=causal, tile_q=tile_q, tile_k=tile_k)

    @fwd.vjp
    def bwd(primals, cotangents, outputs):  # type: ignore[no-untyped-def]
        q, k, v = primals
        do, dlse = cotangents
        o, lse = outputs
        delta = attention_delta(o, do, dlse)
        return tiled_backward(q, k, v, lse, delta, do, scale=scale, causal=causal, tile_q=tile_q, tile_k=tile_k)

    return fwd


def tiled_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    causal: bool = True,
    tile_q: int = TILE_Q,
    tile_k: int = TILE_K,
) -> mx.array:
    """Tiled attention in MLX ops. q: (B, H, L, D); k, v: (B, Hkv, L, D)."""
    _check(q, k, v)
    return tiled_function(float(scale), bool(causal), int(tile_q), int(tile_k))(q, k, v)[0]


def _check(q: mx.array, k: mx.array, v: mx.array) -> None:
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"expected q (B, H, L, D) and k, v (B, Hkv, S, D); got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"need H % Hkv == 0, L == S and equal head dims; got {q.shape} and {k.shape}")


__all__ = [
    "TILE_K",
    "TILE_Q",
    "attention_delta",
    "tiled_attention",
    "tiled_backward",
    "tiled_forward",
    "tiled_function",
]
