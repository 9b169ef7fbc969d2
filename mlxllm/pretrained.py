"""A trained model on disk, whatever made it: an mlxllm run or checkpoint, or an mlx-lm / Hugging Face
Llama directory (config.json, safetensors, tokenizer; mlx-lm's quantized folders too). Read into a
shape, weights and a tokenizer, and built into mlxllm's decoder, for generation and as the start of
fine-tuning (train.init_from). A run's checkpoint reads as plain weights: its LoRA adapters merged,
over its QLoRA base dequantized."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlxllm import checkpoint as ckpt
from mlxllm import hf_config, lora, quant
from mlxllm.config import ModelConfig, TokenizerConfig, load_config
from mlxllm.errors import MlxllmError
from mlxllm.model import Transformer
from mlxllm.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

import mlx.core as mx
import mlx.nn as nn

# Buffers some Llama checkpoints carry that are not parameters (mlxllm recomputes them).
_NOT_PARAMETERS = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Pretrained:
    config: ModelConfig
    weights: dict[str, mx.array]
    tokenizer: Tokenizer
    quantization: dict[str, Any] | None  # config.json's `quantization` entry (an mlx-lm quantized folder)
    source: Path

    @property
    def tokenizer_config(self) -> TokenizerConfig:
        """The [tokenizer] table a run started from this model records."""
        kind = {ByteTokenizer: "byte", SentencePieceTokenizer: "bpe"}.get(type(self.tokenizer), "hf")
        return TokenizerConfig(kind=kind, vocab_size=self.tokenizer.vocab_size)


def _read_weights(directory: Path) -> dict[str, mx.array]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise MlxllmError(f"{directory} has a config.json but no .safetensors weights. mlxllm reads safetensors only.")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(str(f)))
    return {k: v for k, v in weights.items() if not k.endswith(_NOT_PARAMETERS)}


def _from_hf(directory: Path) -> Pretrained:
    where = directory / "config.json"
    try:
        d = json.loads(where.read_text())
    except (OSError, ValueError) as e:
        raise MlxllmError(f"{where} could not be read as JSON ({e}). Is {directory} a model directory?") from None
    weights = _read_weights(directory)
    # Without the key, transformers and mlx-lm assume opposite defaults: the weights say which it is.
    config = hf_config.from_hf({"tie_word_embeddings": "lm_head.weight" not in weights, **d}, str(where))
    if config.tie_embeddings:  # some exports write the tied matrix twice
        for part in ("weight", "scales", "biases"):
            weights.pop(f"lm_head.{part}", None)
    return Pretrained(config, weights, load_tokenizer(directory), d.get("quantization"), directory)


def _from_checkpoint(chosen: Path) -> Pretrained:
    ckpt.check(chosen)  # a damaged file is named, not loaded
    run = load_config(chosen / "config.toml")
    weights = dict(mx.load(str(chosen / "model.safetensors")))
    recorded = ckpt.read_state(chosen).get("quantization")
    if recorded:  # a QLoRA run: its frozen quantized base dequantized, for the adapters to merge into
        weights = quant.dequantized(weights, recorded)
    if run.train.lora_rank:  # a LoRA run: its adapters merged into the model's own weights
        weights = lora.merged(weights, run.train.lora_alpha / run.train.lora_rank)
    return Pretrained(run.model, weights, load_tokenizer(chosen), None, chosen)


def find(path: str | Path, which: str = "best") -> Pretrained:
    """The model at path: an mlxllm run directory ('best' or 'latest' checkpoint), one checkpoint, or a
    Llama directory as mlx-lm and transformers write it."""
    path = Path(path)
    if (path / "config.json").exists() and not (path / "config.toml").exists():
        p = _from_hf(path)
    elif path.is_dir() and ((path / "checkpoints").is_dir() or (path / "state.json").exists()):
        p = _from_checkpoint(ckpt.choose(path, which))
    else:
        raise MlxllmError(
            f"{path} holds no checkpoint and is not a model: expected an mlxllm run directory (with checkpoints/), "
            "one of its checkpoints, or a Llama model directory (config.json, *.safetensors and a tokenizer) such "
            f"as `mlxllm export` or mlx-lm write. Train first (`mlxllm train --out {path}`), or check the path."
        )
    if p.tokenizer.vocab_size > p.config.vocab_size:
        raise MlxllmError(
            f"The tokenizer in {p.source} has {p.tokenizer.vocab_size} tokens but the model's embeddings hold "
            f"{p.config.vocab_size}: they do not belong together. Use the tokenizer the model was trained with."
        )
    return p


def build(p: Pretrained, *, attention: str | None = None) -> Transformer:
    """mlxllm's decoder holding p's weights in fp32; the layers that were saved quantized stay so
    (their packed weights as saved, their scales and biases in fp32, so that they compute in fp32 as
    the rest of the model does). attention overrides the implementation the config names."""
    model = Transformer(replace(p.config, attention=attention or p.config.attention))
    if p.quantization:
        nn.quantize(model, class_predicate=quant.from_weights(p.quantization, p.weights))
    weights = {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in p.weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise MlxllmError(
            f"The weights in {p.source} do not fit its config ({e}). The files may be from different models."
        ) from None
    mx.eval(model.parameters())
    return model
