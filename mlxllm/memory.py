"""How much memory a training run needs, checked against the device before training starts.

The estimate counts fp32 master weights, their gradients, AdamW's two moments, a low-precision copy of the
weights when computing in bfloat16, and the activations the backward pass keeps (per layer and token:
the block's inputs, normed inputs, q/k/v before and after RoPE, attention scores/probabilities
(n_heads x seq_len of them), the attention output, and the SwiGLU's gate/up/silu/product), plus the logits.
With dropout, each dropped activation also keeps its mask, one activation-sized array each: the
embeddings, and the attention and MLP outputs of every layer.
A QLoRA run's frozen base counts at its packed size: each weight matrix at its bits per value plus
its groups' scales and biases (quant.bytes_per_weight), the norms in fp32, and no low-precision copy
of it (only the adapters are cast to the compute dtype). With gradient checkpointing
(train.grad_checkpoint) each block keeps only its input, and one block's activations at a time are
alive again while its backward recomputes them.

MLXLLM_MEMORY_LIMIT (bytes, or with a unit: 6GB, 512MB) sets the memory a run may use in place of the
device's (a Mac shared with other work, or a test).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from mlxllm import device, quant
from mlxllm.config import ModelConfig
from mlxllm.device import backend
from mlxllm.errors import MlxllmError

import mlx.core as mx

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 0.9  # refuse a run whose estimate exceeds this share of the device's memory
LIMIT_ENV = "MLXLLM_MEMORY_LIMIT"
UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).rsplit(".", 1)[-1]
    if name not in DTYPE_BYTES:
        raise MlxllmError(f"Unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)}.")
    return name


def estimate_memory(
    model_cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    dtype: Any = "float32",
    grad_accum: int = 1,
    trainable: int | None = None,
    quantization: dict[str, Any] | None = None,
    grad_checkpoint: bool = False,
) -> dict[str, float]:
    """Bytes needed by one training step: weights, grads, optimizer, activations, total (all floats).
    trainable: how many parameters get gradients (LoRA's adapters), when not all of them.
    quantization: how the frozen weights are quantized (QLoRA: config.json's entry, or a layout).
    grad_checkpoint: each block's activations are recomputed in the backward (train.grad_checkpoint)."""
    name = _dtype_name(dtype)
    act_bytes = DTYPE_BYTES[name]
    n = model_cfg.num_params()
    d, f, L, H, V = model_cfg.d_model, model_cfg.hidden_dim, model_cfg.n_layers, model_cfg.n_heads, model_cfg.vocab_size
    kv = model_cfg.kv_heads * model_cfg.head_dim
    adapters = trainable or 0  # LoRA's, beside the frozen weights
    trained = n if trainable is None else trainable
    low = name != "float32"
    if quantization:
        norms = (2 * L + 1) * d
        weights = (
            (n - norms) * quant.bytes_per_weight(quantization) + 4 * (norms + adapters) + low * act_bytes * adapters
        )
    else:
        weights = 4 * (n + adapters) + low * act_bytes * n  # fp32 master + compute copy
    grads = 4 * trained
    optimizer = 2 * 4 * trained  # AdamW: first and second moments in fp32
    tokens = batch_size * seq_len  # micro-batch: grad_accum micro-batches run one after another
    per_token_layer = 6 * d + 2 * d + 4 * kv + 4 * f + 3 * H * seq_len  # see the module docstring
    embeddings = d
    if model_cfg.dropout:
        per_token_layer, embeddings = per_token_layer + 2 * d, embeddings + d  # the masks
    blocks = L * per_token_layer if not grad_checkpoint else L * d + per_token_layer  # inputs + one block's
    activations = tokens * blocks * act_bytes + tokens * (embeddings * act_bytes + 3 * V * 4)
    total = weights + grads + optimizer + activations
    if grad_accum > 1:
        total += grads  # the running sum of gradients
    return {
        "weights": float(weights),
        "gradients": float(grads),
        "optimizer": float(optimizer),
        "activations": float(activations),
        "total": float(total),
    }


def device_memory() -> tuple[float | None, str]:
    """(bytes the training may use, where the figure comes from); None when unknown."""
    if os.environ.get(LIMIT_ENV):
        return parse_bytes(os.environ[LIMIT_ENV], LIMIT_ENV), LIMIT_ENV
    info = device.info()
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return float(info[key]), f"GPU {key}"
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "system RAM"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def parse_bytes(text: str, what: str) -> float:
    """A size such as 8GB, 512MB or 1e9 (bytes); `what` names it in the error."""
    t = text.strip().upper().replace(" ", "").removesuffix("IB").removesuffix("B")
    number = t.rstrip("KMGT")
    unit = t[len(number) :] + "B" if t[len(number) :] else ""
    try:
        value = float(number) * UNITS[unit]
    except (ValueError, KeyError):
        value = -1.0
    if not value > 0:
        raise MlxllmError(f"{what} must be a size such as 8GB, 512MB or 1e9 (bytes) (got {text!r}).")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def describe(est: dict[str, float]) -> str:
    return (
        f"memory estimate {format_bytes(est['total'])} (weights {format_bytes(est['weights'])}, "
        f"gradients {format_bytes(est['gradients'])}, optimizer {format_bytes(est['optimizer'])}, "
        f"activations {format_bytes(est['activations'])})"
    )


def check_fits(
    est: dict[str, float], batch_size: int, seq_len: int, device: tuple[float | None, str] | None = None
) -> None:
    """Raise MlxllmError with a suggestion when the estimate exceeds the device's memory.
    device: (bytes, where the figure comes from) of the device the estimate is for; default device_memory()."""
    available, where = device or device_memory()
    if available is None or est["total"] <= HEADROOM * available:
        return
    fixed = est["total"] - est["activations"]
    suggestion = []
    if fixed < HEADROOM * available and est["activations"] > 0:
        room = HEADROOM * available - fixed
        fit = max(0, int(batch_size * room / est["activations"]))
        if fit >= 1:
            suggestion.append(
                f"train.batch_size={fit} with train.grad_accum={-(-batch_size // fit)} (the same tokens per step; "
                'train.micro_batch="auto" picks it for you)'
            )
        suggestion.append("train.grad_checkpoint=true (a third more compute)")
        suggestion.append("a shorter train.seq_len")
        if backend() != "cpu":  # MLX's CPU has no fast bfloat16 (cpu/precision.py)
            suggestion.append("train.dtype=bfloat16")
    else:
        suggestion.append(
            "a smaller model (fewer layers or a smaller d_model): its weights and optimizer state alone do not fit"
        )
    raise MlxllmError(
        f"This run needs about {format_bytes(est['total'])} but the device has {format_bytes(available)} "
        f"({where}); {describe(est)}. Try " + ", or ".join(suggestion) + "."
    )


def set_wired_limit() -> int | None:
    """On Apple silicon, wire up to the GPU's recommended working set, as mlx-lm does; returns the limit set."""
    if sys.platform != "darwin" or device.backend() != "metal":
        return None
    limit = device.info().get("max_recommended_working_set_size")
    if not limit:
        return None
    try:
        mx.set_wired_limit(int(limit))
    except (AttributeError, RuntimeError):  # an older MLX or macOS without wired memory: run without it
        return None
    return int(limit)


def configure_cache() -> int | None:
    """On the CPU, let MLX keep freed buffers up to its memory limit, as it does on Metal; returns the limit set.

    MLX's CPU allocator caches only 32 MB of freed buffers by default. A training step frees and re-allocates
    hundreds of MB of activations, so without a larger cache every step returns them to malloc, which unmaps
    them, and the next step page-faults and zeroes them again, in kernel time. The cache never holds more
    than the step's own peak. MLXLLM_CPU_CACHE_LIMIT (bytes; 0 leaves MLX's default) overrides.
    """
    if mx.default_device() != mx.cpu:
        return None
    env = os.environ.get("MLXLLM_CPU_CACHE_LIMIT")
    if env is not None and int(env) == 0:
        return None
    limit = int(env) if env else int(mx.get_memory_limit())
    mx.set_cache_limit(limit)
    return limit
