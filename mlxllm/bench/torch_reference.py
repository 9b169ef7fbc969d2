"""An independent PyTorch implementation of mlxllm's model and training step, for side-by-side speed.

Same architecture as mlxllm.model (Llama-style: RMSNorm, rotate-half RoPE, SwiGLU, no biases, tied
embeddings, GPT-2 init with scaled output projections) and the same step as mlxllm.step.make_step
(mean cross-entropy, global-norm gradient clipping, AdamW with the same hyperparameters). It imports
nothing from mlxllm, so the benchmark compares two implementations rather than one with itself.
Only needed where torch is installed; mlxllm itself never imports it, and the benchmark's
PyTorch workers load this file by its path, without importing mlxllm (or MLX and its BLAS).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)  # rotate-half layout
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, hidden: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.input_layernorm(x)
        q, k, v = (p(h).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, D))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, vocab: int, n_layers: int, d: int, n_heads: int, hidden: int, max_seq: int,
                 theta: float = 10000.0, eps: float = 1e-5):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, n_heads, hidden, eps) for _ in range(n_layers))
        self.norm = RMSNorm(d, eps)
        cos, sin = rope_tables(d // n_heads, max_seq, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        out_std = 0.02 / math.sqrt(2 * n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                nn.init.normal_(p, 0.0, out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        cos, sin = self.cos[:T], self.sin[:T]
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h) @ self.embed_tokens.weight.T  # tied output projection


def make_trainer(cfg: dict, *, compile: bool = False, seed: int = 0):
    """(step(batch) -> loss tensor, model). cfg has vocab_size, n_layers, d_model, n_heads, hidden_dim, seq_len."""
    torch.manual_seed(seed)
    model = Llama(cfg["vocab_size"], cfg["n_layers"], cfg["d_model"], cfg["n_heads"], cfg["hidden_dim"], cfg["seq_len"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.get("learning_rate", 1e-3), betas=(0.9, 0.95),
                            weight_decay=cfg.get("weight_decay", 0.1), foreach=True)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))

    fwd = torch.compile(loss_of) if compile else loss_of

    def step(batch: torch.Tensor) -> torch.Tensor:
        loss = fwd(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.get("grad_clip", 1.0))
        opt.step()
        return loss.detach()

    return step, model
