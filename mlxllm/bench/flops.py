"""The matmul FLOPs a training step really executes per token, by the attention implementation it runs.

The model's estimate (ModelConfig.flops_per_token) counts causal attention as half the T x T square. What
runs differs: plain ops compute the whole square and mask it; the two-halves attention skips the quarter
its query halves never see; tiled and fused kernels skip the key tiles above the diagonal but compute the
tiles across it whole.
"""

from __future__ import annotations

from typing import Any

from mlxllm.cpu.halves import SPLIT_MIN_LEN
from mlxllm.kernels.fused import ROWS_PER_GROUP, inner_tile
from mlxllm.kernels.tiled import TILE_K, TILE_Q


def visited_fraction(seq_len: int, rows: int, keys: int) -> float:
    """The share of the T x T square a causal kernel computes when it takes `rows` queries at a time and,
    for each, whole tiles of `keys` keys up to the diagonal."""
    visited = 0
    for q0 in range(0, seq_len, rows):
        nq = min(rows, seq_len - q0)
        visited += nq * min(seq_len, -(-(q0 + nq) // keys) * keys)
    return visited / seq_len**2


def attention_fraction(impl: str, backend: str, seq_len: int, head_dim: int, dtype: str = "float32") -> float:
    """The share of the T x T score square that attention `impl` (resolved, not 'auto') computes in training
    on `backend` ('cpu', 'metal', 'cuda')."""
    if impl == "halves":
        return 0.75 if seq_len >= SPLIT_MIN_LEN else 1.0  # below SPLIT_MIN_LEN it is the reference path
    if impl == "tiled" or (impl == "flash" and backend == "cpu"):  # flash on the CPU is the tiled form
        return visited_fraction(seq_len, TILE_Q, TILE_K)
    if impl == "flash":
        return visited_fraction(seq_len, ROWS_PER_GROUP, inner_tile(head_dim))
    # mx.fast's attention: MLX 0.32 trains with it unfused (the whole square, masked) on the CPU and on Metal,
    # and on CUDA unless cuDNN takes it (fp16/bf16, head dim a multiple of 8 up to 128), which skips the
    # upper triangle: about half of it.
    if impl == "fast" and backend == "cuda" and dtype != "float32" and head_dim % 8 == 0 and head_dim <= 128:
        return (seq_len + 1) / (2 * seq_len)
    return 1.0  # 'reference', and 'fast' unfused


def executed_matmul_flops_per_token(
    cfg: dict[str, Any], attention: str = "halves", backend: str = "cpu", dtype: str = "float32"
) -> float:
    """Matmul FLOPs mlxllm's step executes per token of the benchmark config `cfg`, counted layer by layer,
    with attention `attention` (resolved) on `backend`: projections, output layer, and the share of the
    score square that attention computes (attention_fraction)."""
    from mlxllm.bench.workers import model_config

    mc = model_config(cfg)
    d, f, L, T, V = mc.d_model, mc.hidden_dim, mc.n_layers, cfg["seq_len"], mc.vocab_size
    hd, h, kv = mc.head_dim, mc.n_heads, mc.kv_heads
    linear = L * (d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f) + V * d  # projections + output projection
    square = L * 2 * (2 * T * h * hd)  # QK^T and PV per token, forward, the full square
    scores = square * attention_fraction(attention, backend, T, hd, dtype)
    return 3 * (2 * linear + scores)  # backward is twice the forward
