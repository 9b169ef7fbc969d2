"""Loading trained runs and sampling from them with a KV cache."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlxllm import pretrained
from mlxllm.model import Transformer
from mlxllm.tokenizer import Tokenizer


def load(path: str | Path, which: str = "best") -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer from a run directory ('best' or 'latest' checkpoint), a checkpoint directory,
    or an mlx-lm / Hugging Face Llama directory."""
    found = pretrained.find(path, which)
    model = pretrained.build(found)
    model.eval()
    return model, found.tokenizer


def sample_next(logits: mx.array, temperature: float, top_k: int | None, top_p: float | None, key: mx.array) -> mx.array:
    """One token id per row of logits (B, V)."""
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if top_p is not None and 0 < top_p < 1:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        sorted_logits = mx.where(before >= top_p, -mx.inf, sorted_logits)
        logits = mx.put_along_axis(logits, order, sorted_logits, axis=-1)
    return mx.random.categorical(logits, axis=-1, key=key)


def generate_ids(
    model: Transformer,
    prompt: list[int],
    max_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> list[int]:
    """Continue `prompt` by `max_tokens` tokens."""
    window = model.config.max_seq_len
    ids = list(prompt) or [0]
    key = mx.random.key(seed)
    start = max(0, len(ids) - window)  # the model sees ids[start:]
    cache = None
    for _ in range(max_tokens):
        key, sub = mx.random.split(key)
        if len(ids) - start > window:
            # Past the context window: restart from its most recent half.
            start, cache = len(ids) - window // 2, None
        if cache is None:
            cache = model.make_cache()
            logits = model(mx.array([ids[start:]]), cache)[:, -1]
        else:
            logits = model(mx.array([[ids[-1]]]), cache)[:, -1]
        ids.append(sample_next(logits, temperature, top_k, top_p, sub).item())
    return ids[len(prompt) or 1 :]


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str = "",
    max_tokens: int = 200,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> str:
    """Sample a continuation of `prompt` (returned without the prompt)."""
    prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    out = generate_ids(model, prompt_ids, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if tokenizer.eos_id in out:
        out = out[: out.index(tokenizer.eos_id)]
    return tokenizer.decode(out)
