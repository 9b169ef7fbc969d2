"""Quantized weights as mlx-lm writes them, the frozen base of a QLoRA run: which layers of a model are
quantized and how, read from a quantized model folder as mlx-lm's loader reads it, recorded with a
run's checkpoints, applied to a model again on resume, dequantized when a run is merged into plain
weights, and what they weigh in memory.

A folder written by `mlx_lm.convert -q` holds, for each quantized layer P, `P.weight` packed into
uint32 (`bits` to a value), `P.scales` and, in MLX's affine mode, `P.biases` (one of each per
`group_size` values of a row); its config.json's `quantization` entry holds the defaults
({"group_size", "bits", "mode"}) and an entry per layer where one differs.

A layout is that entry made explicit for a model as mlxllm builds it: the defaults, and under
"layers" every quantized layer's path (a LoRA target's frozen base is `P.base`, as the checkpoint
names its weights) with its {"group_size", "bits", "mode"}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def _defaults(quantization: dict[str, Any]) -> dict[str, Any]:
    return {
        "group_size": quantization["group_size"],
        "bits": quantization["bits"],
        "mode": quantization.get("mode", "affine"),
    }


def from_weights(
    quantization: dict[str, Any], weights: dict[str, mx.array]
) -> Callable[[str, nn.Module], dict[str, Any] | bool]:
    """nn.quantize's predicate for a model whose saved weights are these (config.json's `quantization`
    entry beside them), deciding as mlx-lm's loader does: a layer the entry names takes its settings;
    another is quantized when its scales were saved, with the group size and bits its shapes tell
    (the entry's defaults can be wrong for it)."""
    mode = quantization.get("mode", "affine")

    def params(path: str, module: nn.Module) -> dict[str, Any] | bool:
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        in_dims = module.weight.shape[-1]
        packed, scales = weights[f"{path}.weight"], weights[f"{path}.scales"]
        return {"group_size": in_dims // scales.shape[-1], "bits": packed.shape[-1] * 32 // in_dims, "mode": mode}

    return params


def layout(model: nn.Module, quantization: dict[str, Any]) -> dict[str, Any] | None:
    """The model's quantized layers and their settings, with the defaults of the entry (or layout) they
    came from; None when no layer is quantized."""
    layers = {
        name: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZED)
    }
    return {**_defaults(quantization), "layers": layers} if layers else None


def apply(model: nn.Module, recorded: dict[str, Any]) -> None:
    """Quantize the model's layers as a recorded layout says, in place; their values come from the
    checkpoint after. Nothing is evaluated here, so no full-precision copy is ever made."""
    layers = recorded["layers"]
    nn.quantize(model, class_predicate=lambda path, _: layers.get(path, False))


def dequantized(weights: dict[str, mx.array], recorded: dict[str, Any]) -> dict[str, mx.array]:
    """Saved weights with each quantized layer of the layout as one plain float32 `P.weight`."""
    out = dict(weights)
    for path, q in recorded["layers"].items():
        packed, scales, biases = out.pop(f"{path}.weight"), out.pop(f"{path}.scales"), out.pop(f"{path}.biases", None)
        w = mx.dequantize(packed, scales, biases, group_size=q["group_size"], bits=q["bits"], mode=q["mode"])
        out[f"{path}.weight"] = w.astype(mx.float32)
    return out


def bytes_per_weight(quantization: dict[str, Any]) -> float:
    """What one quantized weight costs in memory at the entry's defaults: its packed bits and its share
    of its group's scale and bias (float32, as mlxllm holds them; the other modes have one 8-bit scale)."""
    q = _defaults(quantization)
    per_group = 2 * 4 if q["mode"] == "affine" else 1
    return q["bits"] / 8 + per_group / q["group_size"]


def describe(quantization: dict[str, Any]) -> str:
    """'4-bit, group size 64' (and the mode, when not affine)."""
    q = _defaults(quantization)
    return f"{q['bits']}-bit, group size {q['group_size']}" + ("" if q["mode"] == "affine" else f", {q['mode']}")
