"""An independent PyTorch implementation of mlxllm's model and training step, for side-by-side speed.

Same architecture as mlxllm.model (Llama-style: RMSNorm, rotate-half RoPE, SwiGLU, no biases, tied
embeddings, GPT-2 init with scaled output projections) and the same step as mlxllm.step.make_step
(mean cross-entropy, global-norm gradient clipping, AdamW with the same hyperparameters). It imports
nothing from mlxllm, so the benchmark compares two implementations rather than one with itself.
Only needed where torch is installed; mlxllm itself never imports it, and the benchmark's
PyTorch workers load this file by its path, without importing mlxllm (or MLX and its BLAS).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import NamedTuple

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
    # In x's dtype: under autocast q and k come out of their projections in bfloat16, as v does, and
    # attention takes all three in one dtype (the float32 tables would promote q and k alone).
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
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
    def __init__(
        self,
        vocab: int,
        n_layers: int,
        d: int,
        n_heads: int,
        hidden: int,
        max_seq: int,
        theta: float = 10000.0,
        eps: float = 1e-5,
    ):
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


MODES = ("eager", "compile", "compile-step")
DTYPES = ("float32", "bfloat16")  # bfloat16: torch.autocast on the forward, all state float32


class Trainer(NamedTuple):
    step: Callable[[torch.Tensor], torch.Tensor]  # one training step on a (B, T + 1) batch; returns the loss
    model: Llama
    optimizer: str  # which AdamW implementation: "fused" or "foreach"
    adamw: torch.optim.AdamW  # the optimizer itself: its state is float32 under autocast too


def make_adamw(params: list[nn.Parameter], cfg: dict, *, fused: bool) -> tuple[torch.optim.AdamW, str]:
    """mlxllm's AdamW hyperparameters; PyTorch's fused kernel where asked for and this PyTorch has it on
    the CPU (2.4 and later), else the multi-tensor (foreach) one. Both compute the same update."""
    kwargs = dict(lr=cfg.get("learning_rate", 1e-3), betas=(0.9, 0.95), weight_decay=cfg.get("weight_decay", 0.1))
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs), "fused"
        except (RuntimeError, TypeError, ValueError):  # an older PyTorch: fused is for CUDA only
            pass
    return torch.optim.AdamW(params, foreach=True, **kwargs), "foreach"


def make_trainer(
    cfg: dict, *, mode: str = "eager", seed: int = 0, backend: str = "inductor", dtype: str = "float32"
) -> Trainer:
    """The training step, run as `mode` says: "eager"; "compile", torch.compile over the forward and loss
    (backward, clipping and AdamW eager); "compile-step", torch.compile over the whole step. `backend`
    is torch.compile's (the benchmark's is Inductor; "aot_eager" traces the same graphs without code
    generation). `dtype` "bfloat16" runs the model's forward under torch.autocast(device_type="cpu",
    dtype=torch.bfloat16): mixed precision, as a PyTorch user trains in bfloat16 on a CPU, with the
    weights, gradients, AdamW state and the loss in float32. cfg has vocab_size, n_layers, d_model,
    n_heads, hidden_dim, seq_len."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (got {dtype!r})")
    torch.manual_seed(seed)
    model = Llama(cfg["vocab_size"], cfg["n_layers"], cfg["d_model"], cfg["n_heads"], cfg["hidden_dim"], cfg["seq_len"])
    params = list(model.parameters())
    # The fused AdamW is marked torch.compiler.disable (a graph break, run outside the graph); compiled
    # over the whole step, the foreach AdamW is traced and Inductor fuses its update itself.
    opt, kind = make_adamw(params, cfg, fused=mode != "compile-step")
    clip = cfg.get("grad_clip", 1.0)

    half = getattr(torch, dtype) if dtype != "float32" else None

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        if half is None:  # no autocast region at all: float32 traces the graphs it always did
            return model(tokens)
        with torch.autocast(device_type="cpu", dtype=half):
            return model(tokens)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        logits = forward(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))

    if mode == "compile-step":
        return Trainer(_compiled_whole_step(loss_of, params, opt, clip, backend), model, kind, opt)
    fwd = torch.compile(loss_of, backend=backend) if mode == "compile" else loss_of

    def step(batch: torch.Tensor) -> torch.Tensor:
        loss = fwd(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return loss.detach()

    return Trainer(step, model, kind, opt)


def _compiled_whole_step(
    loss_of: Callable, params: list[nn.Parameter], opt: torch.optim.Optimizer, clip: float, backend: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Forward, backward, clipping and the AdamW step under one torch.compile.

    Dynamo traces loss.backward() into the graph only with trace_autograd_ops (PyTorch 2.13; without
    it, the backward is a graph break and runs as AOTAutograd's compiled backward). The optimizer
    step is a graph of its own: Optimizer.step graph-breaks on purpose (torch/optim/optimizer.py, so
    that AOT sees the update as in-place), so the whole step is two graphs, not one. zero_grad stays
    outside: Optimizer.zero_grad is on Dynamo's skip list, and a graph break between the forward and
    the backward splits the graph the backward is traced into."""
    import torch._dynamo

    def train_step(batch: torch.Tensor) -> torch.Tensor:
        loss = loss_of(batch)
        value = loss.detach()  # detached before backward: a returned loss whose graph backward consumed graph-breaks
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return value

    compiled = torch.compile(train_step, backend=backend)
    cfg = torch._dynamo.config
    patch = cfg.patch(trace_autograd_ops=True) if hasattr(cfg, "trace_autograd_ops") else contextlib.nullcontext()

    def step(batch: torch.Tensor) -> torch.Tensor:
        for p in params:  # what opt.zero_grad(set_to_none=True) does
            p.grad = None
        with patch:
            return compiled(batch)

    return step
