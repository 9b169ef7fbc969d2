"""Loading trained runs and sampling from them with a KV cache."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxllm import ops, pretrained
from mlxllm.model import KVCache, Transformer
from mlxllm.tokenizer import Tokenizer


def load(path: str | Path, which: str = "best") -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer from a run directory ('best' or 'latest' checkpoint), a checkpoint directory,
    or an mlx-lm / Hugging Face Llama directory."""
    found = pretrained.find(path, which)
    model = pretrained.build(found)
    model.eval()
    return model, found.tokenizer


def sample_next(
    logits: mx.array, temperature: float, top_k: int | None, top_p: float | None, key: mx.array
) -> mx.array:
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


# Decode steps queued ahead of the token being read (stream_ids).
PIPELINE_DEPTH = 1


class DecodeWeights:
    """The weights a model's decode steps read: its parameters in `ops.decode_layout`, made again
    whenever the model's parameters are no longer the arrays they were made from. Held by the
    model (`of`), so they and the compiled steps live as long as it does."""

    def __init__(self) -> None:
        self.params: dict = {}  # refilled in place: the compiled steps' input
        self.decoders: dict[tuple[float, int | None, float | None], Decoder] = {}
        self._sources: list[mx.array] = []

    @staticmethod
    def of(model: Transformer) -> DecodeWeights:
        weights = model.__dict__.get("_mlxllm_decode")
        if weights is None:  # set as a plain attribute: a Module would take a dict value for a child
            weights = model.__dict__["_mlxllm_decode"] = DecodeWeights()
        weights.refresh(model)
        return weights

    def refresh(self, model: Transformer) -> None:
        params = model.parameters()
        sources = [p for _, p in tree_flatten(params)]
        if len(sources) != len(self._sources) or any(a is not b for a, b in zip(sources, self._sources)):
            self.params.clear()
            self.params.update(ops.decode_layout(params))
            self._sources = sources


class Decoder:
    """A model's token-by-token decoding with one sampling setting: a compiled step over whole
    KV-cache buffers (model.KVCache.fixed), traced once per buffer size rather than per position."""

    def __init__(self, model: Transformer, weights: DecodeWeights, sampling: tuple[float, int | None, float | None]):
        self.model, self.weights, self.sampling = model, weights, sampling
        self._step = mx.compile(self._decode, inputs=weights.params)

    @classmethod
    def of(cls, model: Transformer, temperature: float, top_k: int | None, top_p: float | None) -> Decoder:
        """The model's decoder for this setting (made, and traced, once per model), reading the
        model's current weights."""
        weights = DecodeWeights.of(model)
        sampling = (float(temperature), top_k, top_p)
        if sampling not in weights.decoders:
            weights.decoders[sampling] = cls(model, weights, sampling)
        return weights.decoders[sampling]

    def _decode(
        self,
        token: mx.array,
        at: mx.array,
        visible: mx.array,
        key: mx.array,
        keys: list[mx.array],
        values: list[mx.array],
    ) -> tuple:
        # Runs only while tracing (the compiled step replays without Python), on the decode weights.
        own = self.model.parameters()
        self.model.update(self.weights.params)
        try:
            caches = [KVCache.fixed(k, v, at, visible) for k, v in zip(keys, values)]
            logits = self.model(token.reshape(1, 1), caches)[:, -1]
        finally:
            self.model.update(own)
        token, key = self._sample(logits, key)
        return token, key, [c.keys for c in caches], [c.values for c in caches]

    def _sample(self, logits: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
        if self.sampling[0] <= 0:  # greedy draws nothing: the key is not split
            return sample_next(logits, *self.sampling, key), key
        key, sub = mx.random.split(key)
        return sample_next(logits, *self.sampling, sub), key

    def prefill(self, tokens: list[int], key: mx.array) -> tuple[list[KVCache], mx.array, mx.array]:
        """Run the window `tokens` into a new cache: (cache, the next token (1,), the next key)."""
        cache = self.model.make_cache()
        logits = self.model(mx.array([tokens]), cache)[:, -1]
        return (cache, *self._sample(logits, key))

    def decode(self, cache: list[KVCache], token: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
        """Feed one token (1,) to the cache: (the next token, the next key), both still lazy."""
        for c in cache:
            c.reserve(1)
        offset, capacity = cache[0].offset, cache[0].capacity
        at = mx.array([offset], dtype=mx.int32)
        visible = KVCache.visible_mask(offset, 1, capacity)
        token, key, keys, values = self._step(
            token, at, visible, key, [c.keys for c in cache], [c.values for c in cache]
        )
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values, c.offset = k, v, offset + 1
        return token, key


def stream_ids(
    model: Transformer,
    prompt: list[int],
    max_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> Iterator[int]:
    """The ids `generate_ids` returns, one at a time, as they are decoded.

    The model sees the most recent ids up to its context window; past it, decoding restarts from the
    window's most recent half. Up to PIPELINE_DEPTH steps are queued (mx.async_eval) before the oldest
    token is read: each step takes the previous one's token as a lazy array, so the host builds and
    queues the next graphs while the device computes, and the device never waits for the host."""
    window = model.config.max_seq_len
    ids = list(prompt) or [0]
    start = max(0, len(ids) - window)  # the model sees ids[start:]
    decoder = Decoder.of(model, temperature, top_k, top_p)
    key = mx.random.key(seed)
    cache: list[KVCache] | None = None
    queued: deque[mx.array] = deque()  # tokens computed or in flight, not read yet
    for _ in range(max_tokens):
        seen = len(ids) + len(queued)
        if cache is None or seen - start > window:
            while queued:  # a new window starts from the ids themselves
                ids.append(queued.popleft().item())
                yield ids[-1]
            if seen - start > window:
                start = seen - window // 2
            cache, token, key = decoder.prefill(ids[start:], key)
        else:
            token, key = decoder.decode(cache, queued[-1] if queued else mx.array(ids[-1:]), key)
        mx.async_eval(token, key)
        queued.append(token)
        if len(queued) > PIPELINE_DEPTH:
            ids.append(queued.popleft().item())
            yield ids[-1]
    while queued:
        ids.append(queued.popleft().item())
        yield ids[-1]


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
    return list(stream_ids(model, prompt, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))


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
