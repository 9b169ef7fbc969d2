"""A Llama-style decoder in MLX: RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases.

Parameter names follow the Llama checkpoint layout (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, `model.norm`, `lm_head`), so weights map one-to-one onto it. The
math that depends on the device is behind two seams: `ops` (activations, norms, rotary embeddings)
and `attention`.

Dropout (`ModelConfig.dropout`, off by default) is residual dropout: on the token embeddings and on
each attention and MLP output before it is added to the residual stream, in training mode only
(`set_training`). The attention probabilities are not dropped: the fused, flash and tiled attention
kernels never hold them. Each block draws one key from MLX's random state and its two masks from it.

Gradient checkpointing (`set_grad_checkpoint`, train.grad_checkpoint) recomputes each block's
activations in the backward from its input instead of keeping them (`_recomputed`).
"""

from __future__ import annotations

import math

from mlxllm import ops
from mlxllm.attention import attention, decode_attention
from mlxllm.config import ModelConfig
from mlxllm.errors import MlxllmError

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

__all__ = [
    "KVCache",
    "ModelConfig",
    "Transformer",
    "build_model",
    "init_weights",
    "set_grad_checkpoint",
    "set_training",
]


class KVCache:
    """Keys and values of the tokens seen so far, for one layer.

    They live in buffers (B, Hkv, capacity, D) that grow `step` positions at a time and are written
    in place, so a decoded token costs one small write instead of a copy of everything before it.
    `update` appends at `offset` and returns the keys and values so far (a prompt, any eager call).
    A cache made by `fixed` is for a traced decode step instead: it writes at a position held in an
    array and attends over the whole buffers with a mask, so that the step's shapes, and with them
    its compiled graph, are the same at every position.
    """

    step = 256

    def __init__(self, step: int | None = None) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # tokens written
        self.at: mx.array | None = None  # `fixed` only: (1,) int32, where the new tokens go
        self.visible: mx.array | None = None  # `fixed` only: (L, capacity) bool, what they attend to
        if step is not None:
            self.step = step

    @classmethod
    def fixed(cls, keys: mx.array, values: mx.array, at: mx.array, visible: mx.array) -> KVCache:
        """A cache over whole buffers that writes the next L tokens from position `at` (a (1,) int32
        array) and lets them attend to the positions `visible` marks (see `visible_mask`)."""
        cache = cls()
        cache.keys, cache.values, cache.at, cache.visible = keys, values, at, visible
        return cache

    @staticmethod
    def visible_mask(offset: int, length: int, capacity: int) -> mx.array:
        """(length, capacity): True where the token at offset + i may attend (positions <= its own)."""
        return mx.array(np.arange(capacity)[None] <= offset + np.arange(length)[:, None])

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def position(self) -> int | mx.array:
        """Position of the next token: `offset`, or the array `at` in a `fixed` cache."""
        return self.offset if self.at is None else self.at

    def reserve(self, n: int) -> None:
        """Grow the buffers (once there are any) so that n more tokens fit."""
        if self.keys is not None and self.offset + n > self.capacity:
            self._grow(self.offset + n, self.keys, self.values)

    def _grow(self, needed: int, k: mx.array, v: mx.array) -> None:
        # New buffers of `needed` positions rounded up to whole steps, shaped and typed like k and v,
        # holding the tokens so far.
        B, H, _, D = k.shape
        size = -(-needed // self.step) * self.step
        keys, values = mx.zeros((B, H, size, D), k.dtype), mx.zeros((B, H, size, v.shape[3]), v.dtype)
        if self.offset:
            keys[..., : self.offset, :] = self.keys[..., : self.offset, :]
            values[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = keys, values

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write k, v (B, Hkv, L, D) after the tokens so far; the keys and values to attend to (in a
        `fixed` cache, the whole buffers)."""
        if self.at is not None:
            self.keys = mx.slice_update(self.keys, k, self.at, axes=(2,))
            self.values = mx.slice_update(self.values, v, self.at, axes=(2,))
            return self.keys, self.values
        start, end = self.offset, self.offset + k.shape[2]
        if end > self.capacity:
            self._grow(end, k, v)
        self.keys[..., start:end, :] = k
        self.values[..., start:end, :] = v
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: ops.Rope):
        """rope: the model's rotary embedding, which all its layers share."""
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.impl = cfg.attention
        self.rope = rope  # not a Module: an attribute, not a child with parameters
        self.q_proj = ops.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = ops.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = ops.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = ops.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None:
            return self.o_proj(self._cached(q, k, v, cache))
        # Llama's rotate-half layout keeps q_proj/k_proj in checkpoint order.
        q, k = self.rope(q), self.rope(k)
        out = attention(q, k, v, scale=self.scale, causal=True, impl=self.impl, training=self.training)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _cached(self, q: mx.array, k: mx.array, v: mx.array, cache: KVCache) -> mx.array:
        """The new tokens' attention to the cached ones and themselves, (B, L, H * D)."""
        B, L = q.shape[:2]
        position = cache.position
        end = position + L if isinstance(position, int) else cache.capacity  # bounds the positions
        q = self.rope.at(q, offset=position, end=end)
        k = self.rope.at(k, offset=position, end=end)
        keys, values = cache.update(k, v)
        if cache.visible is None:
            out = attention(q, keys, values, scale=self.scale, causal=True, impl=self.impl, training=self.training)
        else:
            out = decode_attention(q, keys, values, scale=self.scale, visible=cache.visible)
        # (B, H, L, D) -> (B, L, H * D); with one token, the same memory order.
        return out.reshape(B, L, -1) if L == 1 else out.transpose(0, 2, 1, 3).reshape(B, L, -1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = ops.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.up_proj = ops.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.down_proj = ops.Linear(cfg.hidden_dim, cfg.d_model, bias=False)

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
    def __init__(self, cfg: ModelConfig, rope: ops.Rope):
        super().__init__()
        self.self_attn = Attention(cfg, rope)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.p = cfg.dropout  # residual dropout's probability; 0 (the default): no random draws
        self.grad_checkpoint = False  # set_grad_checkpoint: recompute this block's activations in the backward

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        # With dropout, the block draws one key from MLX's random state and its masks from that key, so
        # that a checkpointed block's recomputation draws the same masks as its forward.
        key = mx.random.randint(0, 2**31 - 1, (2,), dtype=mx.uint32) if self.p > 0 and self.training else None
        if self.grad_checkpoint and cache is None and self.training:
            return _recomputed(self, x, key)
        return self.forward(x, cache, key)

    def forward(self, x: mx.array, cache: KVCache | None = None, key: mx.array | None = None) -> mx.array:
        """The block on x; `key`: its dropout masks' random key (None: no dropout)."""
        keys = (None, None) if key is None else mx.random.split(key)
        h = x + self._drop(self.self_attn(self.input_layernorm(x), cache), keys[0])
        return h + self._drop(self.mlp(self.post_attention_layernorm(h)), keys[1])

    def _drop(self, x: mx.array, key: mx.array | None) -> mx.array:
        if key is None:
            return x
        keep = 1 - self.p
        return (mx.random.bernoulli(keep, x.shape, key=key) * x) * (1 / keep)


def _recomputed(block: TransformerBlock, x: mx.array, key: mx.array | None) -> mx.array:
    """The block's output, with a backward that keeps only its input and parameters and recomputes the
    rest (gradient checkpointing). Its parameters are inputs of the custom function, so that their
    gradients flow; the dropout key is a constant of it, so the recomputation draws the forward's masks.

    Not mx.checkpoint: in a training step MLX evaluates its recomputation as soon as the block's
    inputs exist, and each block's parameter gradients only after the whole backward, each holding its
    recomputed activations, so it saved about 3% of an 8-layer step's peak. The two dependencies below
    make the recomputation wait for the backward to reach the block, and the gradient of the block's
    input wait for those of its parameters, so one block's activations are alive at a time."""
    flat = tree_flatten(block.trainable_parameters())
    names, n = [name for name, _ in flat], len(flat)

    def run(*arrays: mx.array) -> mx.array:
        block.update(tree_unflatten(list(zip(names, arrays[:n]))))
        return block.forward(arrays[n], None, key)

    @mx.custom_function
    def forward(*arrays: mx.array) -> mx.array:
        return run(*arrays)

    @forward.vjp
    def backward(primals: tuple, cotangent: mx.array, output: mx.array) -> tuple:
        _, grads = mx.vjp(run, mx.depends(list(primals), [cotangent]), [cotangent])
        *params, dx = grads
        return (*params, mx.depends([dx], params)[0])

    return forward(*(a for _, a in flat), x)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = ops.Rope(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.layers = [TransformerBlock(cfg, self.rope) for _ in range(cfg.n_layers)]
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        h = self.dropout(self.embed_tokens(tokens))
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
            self.lm_head = ops.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        h = self.model(tokens, cache)
        if self.config.tie_embeddings:
            return ops.embedding_head(self.model.embed_tokens, h)
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


def set_grad_checkpoint(model: Transformer, on: bool) -> None:
    """Gradient checkpointing (train.grad_checkpoint) on or off for every block: in training mode, the
    backward recomputes each block's activations from its input instead of keeping them."""
    for layer in model.model.layers:
        layer.grad_checkpoint = on


def set_training(model: nn.Module, training: bool) -> bool:
    """Dropout on (training=True: a training step) or off (evaluation, decoding); returns the mode
    before. MLX modules start in training mode.

    The mode is read when the model is called, so a compiled function keeps the mode it was traced
    in: set it inside the traced function (the step's loss, the evaluation's), not around its calls."""
    before = model.training
    if before != training:
        model.train(training)
    return before
