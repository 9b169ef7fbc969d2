"""A Llama-style decoder in MLX: RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases.

Parameter names follow the Llama checkpoint layout (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, `model.norm`, `lm_head`), so weights map one-to-one onto it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxllm import cpu_math
from mlxllm.errors import MlxllmError

ATTENTION_IMPLS = ("auto", "fast", "flash", "tiled", "reference")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # 0: taken from the tokenizer when training starts
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    ffn_dim: int | None = None  # None: derived from mlp_ratio, rounded up to a multiple of 32
    mlp_ratio: float = 8 / 3
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        for name in ("n_layers", "d_model", "n_heads", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer (got {getattr(self, name)!r})")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 0:
            problems.append(f"vocab_size must be a non-negative integer (got {self.vocab_size!r})")
        if problems:
            raise MlxllmError("Invalid model config: " + "; ".join(problems) + ".")
        kv = self.kv_heads
        if self.d_model % self.n_heads:
            problems.append(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                f"try d_model = {self.n_heads * max(1, round(self.d_model / self.n_heads / 2) * 2)}"
            )
        elif self.head_dim % 2:
            problems.append(
                f"head_dim = d_model / n_heads = {self.head_dim} must be even for rotary embeddings; "
                "change d_model or n_heads"
            )
        if kv < 1 or self.n_heads % kv:
            problems.append(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({kv}); "
                "use a divisor of n_heads such as 1 or n_heads itself"
            )
        if self.ffn_dim is not None and self.ffn_dim < 1:
            problems.append(f"ffn_dim must be positive (got {self.ffn_dim})")
        if self.mlp_ratio <= 0:
            problems.append(f"mlp_ratio must be positive (got {self.mlp_ratio})")
        if self.attention not in ATTENTION_IMPLS:
            problems.append(f"attention must be one of {', '.join(ATTENTION_IMPLS)} (got {self.attention!r})")
        if problems:
            raise MlxllmError("Invalid model config: " + "; ".join(problems) + ".")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        return 32 * math.ceil(self.mlp_ratio * self.d_model / 32)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MlxllmError(
                f"Unknown model config key(s) {', '.join(unknown)}. Valid keys: {', '.join(sorted(names))}."
            )
        return cls(**d)

    def num_params(self, embeddings: bool = True) -> int:
        d, h, kv, f = self.d_model, self.head_dim, self.kv_heads, self.hidden_dim
        per_layer = d * self.n_heads * h * 2 + d * kv * h * 2 + 3 * d * f + 2 * d
        n = self.n_layers * per_layer + d
        if embeddings:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        elif not self.tie_embeddings:
            n += self.vocab_size * d  # the output projection is real compute
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's estimate."""
        n = self.num_params(embeddings=False)
        if self.tie_embeddings:
            n += self.vocab_size * self.d_model  # the tied output projection is still a matmul
        return 6 * n + 6 * self.n_layers * self.d_model * seq_len  # causal: half of 12*L*d*T


# ---------------------------------------------------------------------------------------------
# Attention: every implementation goes through this one function.


def reference_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float, causal: bool) -> mx.array:
    """Plain MLX ops. q: (B, H, L, D); k, v: (B, Hkv, S, D); queries aligned to the end of keys."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv != H:  # group the query heads instead of repeating K/V in memory
        q = q.reshape(B, Hkv, H // Hkv, L, D)
        k, v = k[:, :, None], v[:, :, None]
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if causal:
        mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
    out = _softmax(scores.astype(mx.float32)).astype(v.dtype) @ v
    return out.reshape(B, H, L, D)


# Causal training attention from this length up is computed as two query halves.
SPLIT_MIN_LEN = 128


def causal_halves_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float) -> mx.array:
    """Causal self-attention (L == S) as two query halves: the first half never scores the second
    half's keys, a quarter of the score matrix (its FLOPs and its softmax passes) never computed.
    Exact; the train step of the 4 x 256 model at context 256 measured 4-5% faster on 2 CPU cores,
    while four blocks were 15-25% slower (more, smaller matmuls and slice gradients).

    Its gradient is written out (_halves_vjp) rather than traced through the slices, the mask
    and the softmax: a slice's traced gradient is a zero array with the slice written into it,
    and the softmax's needs a product the size of the score matrix. Measured on that step (A/B in
    one process, 7 interleaved windows): +1.9% over the traced gradient, +0.6% more from making v
    contiguous once."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    q = q.reshape(B, Hkv, H // Hkv, L, D)  # query heads grouped by the K/V head they share
    # v arrives as a transposed view; each matmul would copy it (three times over, forward and back).
    out = _halves(float(scale))(q, k[:, :, None], mx.contiguous(v)[:, :, None])[0]
    # Written in (B, L, H, D) order, which the output projection reads: the caller's transpose back
    # is then a view, not a copy (+0.8%), and the gradient arrives in the same order.
    return out.reshape(B, L, H, D).transpose(0, 2, 1, 3)


def _exp(x: mx.array) -> mx.array:
    """exp of x <= 0."""
    return cpu_math.exp_nonpositive(x) if cpu_math.use_fast_exp() else mx.exp(x)


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


@functools.lru_cache(maxsize=None)
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
        dv = key_grad(e1.astype(dt).swapaxes(-1, -2) @ (do[:, :, :, :h] / l1).astype(dt),
                      e2.astype(dt).swapaxes(-1, -2) @ (do[:, :, :, h:] / l2).astype(dt))
        return dq, dk, dv

    return halves


def _softmax(x: mx.array) -> mx.array:
    return cpu_math.softmax(x) if cpu_math.use_fast_exp() else mx.softmax(x, axis=-1)


def _silu(x: mx.array) -> mx.array:
    return cpu_math.silu(x) if cpu_math.use_fast_exp() else nn.silu(x)  # same function, faster exp on CPU


def resolve_attention(impl: str) -> str:
    """Turn 'auto' into a concrete implementation for this device."""
    if impl != "auto":
        return impl
    try:
        from mlxllm.kernels import resolve_auto
    except ImportError:
        return "fast" if mx.default_device() == mx.gpu else "reference"
    return resolve_auto()


def attention(
    q: mx.array, k: mx.array, v: mx.array, *, scale: float, causal: bool = True, impl: str = "auto"
) -> mx.array:
    """Scaled dot-product attention. q: (B, H, L, D); k, v: (B, Hkv, S, D) with H % Hkv == 0."""
    impl = resolve_attention(impl)
    if impl == "fast":
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)
    if impl == "reference" or q.shape[2] != k.shape[2]:
        if causal and q.shape[2] == k.shape[2] >= SPLIT_MIN_LEN:
            return causal_halves_attention(q, k, v, scale=scale)
        # Decoding with a KV cache (L != S) is a tiny matmul: the plain path is the right one.
        return reference_attention(q, k, v, scale=scale, causal=causal)
    from mlxllm import kernels

    if impl == "flash":
        return kernels.flash_attention(q, k, v, scale=scale, causal=causal)
    if impl == "tiled":
        return kernels.tiled_attention(q, k, v, scale=scale, causal=causal)
    raise MlxllmError(f"Unknown attention implementation {impl!r}; choose one of {', '.join(ATTENTION_IMPLS)}.")


# ---------------------------------------------------------------------------------------------
# The model.


class KVCache:
    """Keys and values of the tokens seen so far, for one layer."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def offset(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = mx.concatenate([self.keys, k], axis=2)
            self.values = mx.concatenate([self.values, v], axis=2)
        return self.keys, self.values


# ---------------------------------------------------------------------------------------------
# Rotary embeddings for a whole sequence on the CPU.


def _rope_angles(length: int, dims: int, base: float) -> tuple[mx.array, mx.array]:
    """cos and sin of position * frequency, (length, dims // 2), as mx.fast.rope computes them.

    From the table made for the model's max_seq_len (prepare_rope_table) when there is one: a traced
    step would otherwise recompute it on every call, forward and back (0.9% of the d256 step)."""
    table = _ROPE_TABLES.get((dims, base))
    if table is not None and table[0].shape[0] >= length:
        return table[0][:length], table[1][:length]
    half = dims // 2
    inv_freq = mx.exp(-mx.arange(0, half, dtype=mx.float32) / half * math.log(base))
    angles = mx.arange(length, dtype=mx.float32)[:, None] * inv_freq[None]
    return mx.cos(angles), mx.sin(angles)


_ROPE_TABLES: dict[tuple[int, float], tuple[mx.array, mx.array]] = {}


def prepare_rope_table(length: int, dims: int, base: float) -> None:
    """Compute (and evaluate) the cos/sin table up to length, outside any traced function."""
    table = _ROPE_TABLES.get((dims, base))
    if table is None or table[0].shape[0] < length:
        _ROPE_TABLES.pop((dims, base), None)
        table = _rope_angles(length, dims, base)
        mx.eval(table)
        _ROPE_TABLES[(dims, base)] = table


def _rotate(x5: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Llama's rotate-half rotation of x5 = (..., 2, D/2) halves: (x1 c - x2 s, x2 c + x1 s), as
    one elementwise kernel that reads the halves swapped through a reversed view (no concatenate)."""
    return x5 * cos[..., None, :] + x5[..., ::-1, :] * mx.stack([-sin, sin], axis=-2)


@functools.lru_cache(maxsize=None)
def _sequence_rope(base: float) -> Callable:
    """x: (B, L, H, D), positions 0..L-1 -> rotated, in (B, H, L, D) order.

    The same rotation as mx.fast.rope(x.transpose(0, 2, 1, 3), offset=0), which on the CPU is made of
    half-width kernels, a concatenate, and a transposed copy for its gradient. Here the rotation and
    the transpose are one pass forward and one back (the gradient rotates by -angle)."""

    @mx.custom_function
    def rope(x: mx.array) -> mx.array:
        B, L, H, D = x.shape
        cos, sin = (t.astype(x.dtype) for t in _rope_angles(L, D, base))  # (L, D/2)
        x5 = x.reshape(B, L, H, 2, D // 2).transpose(0, 2, 1, 3, 4)
        return _rotate(x5, cos, sin).reshape(B, H, L, D)

    @rope.vjp
    def _rope_vjp(x, cotangent, output):
        B, L, H, D = x.shape
        cos, sin = (t.astype(cotangent.dtype)[:, None] for t in _rope_angles(L, D, base))  # (L, 1, D/2)
        g5 = cotangent.reshape(B, H, L, 2, D // 2).transpose(0, 2, 1, 3, 4)
        return _rotate(g5, cos, -sin).reshape(B, L, H, D)

    return rope


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.impl = cfg.attention
        self.rope_theta = cfg.rope_theta
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        prepare_rope_table(cfg.max_seq_len, self.head_dim, float(self.rope_theta))

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        # Llama's rotate-half layout (traditional=False) keeps q_proj/k_proj in checkpoint order.
        if cache is None and mx.default_device() == mx.cpu:
            rope = _sequence_rope(float(self.rope_theta))
            q, k = rope(q), rope(k)
        else:
            offset = 0 if cache is None else cache.offset
            q, k = (
                mx.fast.rope(t.transpose(0, 2, 1, 3), self.head_dim, traditional=False, base=self.rope_theta,
                             scale=1.0, offset=offset)
                for t in (q, k)
            )
        if cache is not None:
            k, v = cache.update(k, v)
        out = attention(q, k, v, scale=self.scale, causal=True, impl=self.impl)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(_silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() == mx.cpu and x.size >= cpu_math.PER_STREAM_MIN_SIZE:
            return _rms_norm(float(self.eps))(x, self.weight)
        return mx.fast.rms_norm(x, self.weight, self.eps)


@functools.lru_cache(maxsize=None)
def _rms_norm(eps: float) -> Callable:
    """mx.fast.rms_norm with its gradient written out; on the CPU MLX derives the gradient from the
    norm's unfused definition. Training arrays only: the wrapper costs decoding one token more than
    it saves there."""

    @mx.custom_function
    def rms_norm(x: mx.array, weight: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, weight, eps)

    @rms_norm.vjp
    def _rms_norm_vjp(primals, cotangent, output):
        x, weight = primals
        f32 = mx.float32  # as the forward kernel computes (a no-op for fp32 training)
        x32, cot32 = x.astype(f32), cotangent.astype(f32)
        r = mx.rsqrt(mx.mean(mx.square(x32), axis=-1, keepdims=True) + eps)
        normed, g = x32 * r, cot32 * weight.astype(f32)
        dx = r * (g - normed * mx.mean(g * normed, axis=-1, keepdims=True))
        dw = (cot32 * normed).reshape(-1, x.shape[-1]).sum(axis=0)
        return dx.astype(x.dtype), dw.astype(weight.dtype)

    return rms_norm


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = [TransformerBlock(cfg) for _ in range(cfg.n_layers)]
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        h = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if cache is None else cache[i])
        return self.norm(h)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise MlxllmError("ModelConfig.vocab_size must be set (it comes from the tokenizer).")
        self.config = cfg
        self.model = LlamaModel(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        h = self.model(tokens, cache)
        if self.config.tie_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.model.layers]


def init_weights(model: Transformer, seed: int) -> None:
    """GPT-2 style init: N(0, 0.02), output projections scaled by 1/sqrt(2 * n_layers)."""
    cfg = model.config
    keys = iter(mx.random.split(mx.random.key(seed), len(_flatten(model.parameters()))))
    std = 0.02
    out_std = std / math.sqrt(2 * cfg.n_layers)
    flat = dict(_flatten(model.parameters()))
    new = {}
    for name, p in sorted(flat.items()):
        key = next(keys)
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            new[name] = mx.ones_like(p)
            continue
        s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
        new[name] = mx.random.normal(p.shape, dtype=p.dtype, key=key) * s
    from mlx.utils import tree_unflatten

    model.update(tree_unflatten(list(new.items())))


def _flatten(tree: Any) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    init_weights(model, seed)
    mx.eval(model.parameters())
    return model
