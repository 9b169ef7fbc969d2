"""A Llama-style decoder in MLX: RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases.

Parameter names follow the Llama checkpoint layout (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, `model.norm`, `lm_head`), so weights map one-to-one onto it. The
math that depends on the device is behind two seams: `ops` (activations, norms, rotary embeddings)
and `attention`.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxllm import ops
from mlxllm.attention import attention
from mlxllm.config import ModelConfig
from mlxllm.errors import MlxllmError

__all__ = ["KVCache", "ModelConfig", "Transformer", "build_model", "init_weights"]


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
        ops.prepare_rope(cfg.max_seq_len, self.head_dim, self.rope_theta)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        # Llama's rotate-half layout keeps q_proj/k_proj in checkpoint order.
        offset = None if cache is None else cache.offset
        q, k = ops.rope(q, base=self.rope_theta, offset=offset), ops.rope(k, base=self.rope_theta, offset=offset)
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
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return ops.rms_norm(x, self.weight, self.eps)


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
    flat = dict(tree_flatten(model.parameters()))
    keys = iter(mx.random.split(mx.random.key(seed), len(flat)))
    std = 0.02
    out_std = std / math.sqrt(2 * cfg.n_layers)
    new = {}
    for name, p in sorted(flat.items()):
        key = next(keys)
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            new[name] = mx.ones_like(p)
            continue
        s = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
        new[name] = mx.random.normal(p.shape, dtype=p.dtype, key=key) * s
    model.update(tree_unflatten(list(new.items())))


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    init_weights(model, seed)
    mx.eval(model.parameters())
    return model
