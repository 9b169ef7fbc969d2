"""LoRA: fine-tuning a pretrained model through small low-rank adapters on its attention and MLP
projections, with the model's own weights frozen, so that only the adapters need gradients and
optimizer state. W x becomes W x + (alpha / rank) * B (A x); B starts at zero, so training starts
from the pretrained model exactly. Checkpoints hold the adapters beside the frozen weights; loading
a run (generate, export, init_from) merges them into plain Llama weights.

QLoRA is the same over a quantized model (an mlx-lm quantized folder): the frozen W is an
nn.QuantizedLinear, kept packed while training, and only the adapters are in full precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from mlxllm.config import ModelConfig
from mlxllm.model import Transformer

import mlx.core as mx
import mlx.nn as nn

TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class LoRALinear(nn.Module):
    """A frozen linear layer (plain or quantized) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear | nn.QuantizedLinear, rank: int, alpha: float, key: mx.array):
        super().__init__()
        out_dims, in_dims = base.weight.shape
        if isinstance(base, nn.QuantizedLinear):  # packed: 32 // bits values to a uint32
            in_dims = in_dims * 32 // base.bits
        self.base = base
        self.scale = alpha / rank
        bound = 1 / math.sqrt(in_dims)  # as nn.Linear initializes its weight
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank), key=key)
        self.lora_b = mx.zeros((rank, out_dims))
        self.base.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        return self.base(x) + ((x @ self.lora_a) @ self.lora_b) * self.scale


def _targets(model: Transformer) -> Iterator[tuple[nn.Module, str]]:
    for layer in model.model.layers:
        for path in TARGETS:
            owner, name = path.split(".")
            yield getattr(layer, owner), name


def apply(model: Transformer, rank: int, alpha: float, seed: int = 0) -> None:
    """Freeze the model and put adapters on its projections (in place); only they stay trainable."""
    model.freeze()
    keys = iter(mx.random.split(mx.random.key(seed), len(model.model.layers) * len(TARGETS)))
    for owner, name in _targets(model):
        setattr(owner, name, LoRALinear(getattr(owner, name), rank, alpha, next(keys)))
    # The adapters only: the frozen weights may be a resumed run's placeholders, replaced by its checkpoint
    # unevaluated (runstate), and evaluating them would make a full-precision copy of a quantized model.
    mx.eval(model.trainable_parameters())


def merged(weights: dict[str, mx.array], scale: float) -> dict[str, mx.array]:
    """Checkpoint weights with adapters (`x.base.weight`, `x.lora_a`, `x.lora_b`) as plain ones (`x.weight`);
    a QLoRA run's are dequantized first (quant.dequantized)."""
    out = {}
    for name, w in weights.items():
        if name.endswith(".base.weight"):
            prefix = name[: -len(".base.weight")]
            a, b = weights[f"{prefix}.lora_a"], weights[f"{prefix}.lora_b"]
            out[f"{prefix}.weight"] = w + scale * (a @ b).T.astype(w.dtype)
        elif not name.endswith((".lora_a", ".lora_b")):
            out[name] = w
    return out


def trainable_params(cfg: ModelConfig, rank: int) -> int:
    """How many parameters the adapters of a model of this shape have."""
    d, h, kv, f = cfg.d_model, cfg.head_dim, cfg.kv_heads, cfg.hidden_dim
    shapes = [(d, cfg.n_heads * h), (d, kv * h), (d, kv * h), (cfg.n_heads * h, d), (d, f), (d, f), (f, d)]
    return cfg.n_layers * sum(rank * (i + o) for i, o in shapes)
