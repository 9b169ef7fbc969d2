"""Loading trained runs and sampling from them with a KV cache."""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from mlxllm import ops, pretrained
from mlxllm.model import KVCache, Transformer, set_training
from mlxllm.tokenizer import Tokenizer

import mlx.core as mx
from mlx.utils import tree_flatten


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


Sampling = tuple[float, int | None, float | None]  # (temperature, top_k, top_p)


class DecodeWeights:
    """The weights a model's decode steps read: its parameters in `ops.decode_layout`, made again
    whenever the model's parameters are no longer the arrays they were made from."""

    def __init__(self) -> None:
        self.params: dict = {}  # refilled in place: the compiled steps' input
        self._sources: list[mx.array] = []

    def refresh(self, model: Transformer) -> None:
        params = model.parameters()
        sources = [p for _, p in tree_flatten(params)]
        if len(sources) != len(self._sources) or any(a is not b for a, b in zip(sources, self._sources)):
            self.params.clear()
            self.params.update(ops.decode_layout(params))
            self._sources = sources


class Decoder:
    """A model's token-by-token decoding: the decode weights and, per sampling setting, a compiled
    step over whole KV-cache buffers (model.KVCache.fixed), traced once per buffer size rather than per
    position. Keep one to decode from the same model many times without tracing again; it follows the
    model's current weights. Decoding never drops: the model runs in eval mode within."""

    def __init__(self, model: Transformer) -> None:
        """model: the model to decode from, for as long as this decoder lives."""
        self.model = model
        self.weights = DecodeWeights()
        self._steps: dict[Sampling, Callable] = {}

    def _step_for(self, sampling: Sampling) -> Callable:
        if sampling not in self._steps:
            self._steps[sampling] = mx.compile(functools.partial(self._decode, sampling), inputs=self.weights.params)
        return self._steps[sampling]

    def _decode(
        self,
        sampling: Sampling,
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
        training = set_training(self.model, False)
        try:
            caches = [KVCache.fixed(k, v, at, visible) for k, v in zip(keys, values)]
            logits = self.model(token.reshape(1, 1), caches)[:, -1]
        finally:
            set_training(self.model, training)
            self.model.update(own)
        token, key = _sample(logits, sampling, key)
        return token, key, [c.keys for c in caches], [c.values for c in caches]

    def prefill(self, tokens: list[int], key: mx.array, sampling: Sampling) -> tuple[list[KVCache], mx.array, mx.array]:
        """Run the window `tokens` into a new cache: (cache, the next token (1,), the next key)."""
        cache = self.model.make_cache()
        training = set_training(self.model, False)
        try:
            logits = self.model(mx.array([tokens]), cache)[:, -1]
        finally:
            set_training(self.model, training)
        return (cache, *_sample(logits, sampling, key))

    def decode(
        self, cache: list[KVCache], token: mx.array, key: mx.array, sampling: Sampling
    ) -> tuple[mx.array, mx.array]:
        """Feed one token (1,) to the cache: (the next token, the next key), both still lazy."""
        for c in cache:
            c.reserve(1)
        offset, capacity = cache[0].offset, cache[0].capacity
        at = mx.array([offset], dtype=mx.int32)
        visible = KVCache.visible_mask(offset, 1, capacity)
        token, key, keys, values = self._step_for(sampling)(
            token, at, visible, key, [c.keys for c in cache], [c.values for c in cache]
        )
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values, c.offset = k, v, offset + 1
        return token, key

    def stream(self, prompt: list[int], max_tokens: int, sampling: Sampling, seed: int) -> Iterator[int]:
        """`stream_ids` with this decoder."""
        self.weights.refresh(self.model)
        window = self.model.config.max_seq_len
        ids = list(prompt) or [0]
        start = max(0, len(ids) - window)  # the model sees ids[start:]
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
                cache, token, key = self.prefill(ids[start:], key, sampling)
            else:
                token, key = self.decode(cache, queued[-1] if queued else mx.array(ids[-1:]), key, sampling)
            mx.async_eval(token, key)
            queued.append(token)
            if len(queued) > PIPELINE_DEPTH:
                ids.append(queued.popleft().item())
                yield ids[-1]
        while queued:
            ids.append(queued.popleft().item())
            yield ids[-1]


def _sample(logits: mx.array, sampling: Sampling, key: mx.array) -> tuple[mx.array, mx.array]:
    if sampling[0] <= 0:  # greedy draws nothing: the key is not split
        return sample_next(logits, *sampling, key), key
    key, sub = mx.random.split(key)
    return sample_next(logits, *sampling, sub), key


def _decoder(model: Transformer, decoder: Decoder | None) -> Decoder:
    if decoder is None:
        return Decoder(model)
    if decoder.model is not model:
        raise ValueError("the decoder given decodes another model: make one with Decoder(model)")
    return decoder


def stream_ids(
    model: Transformer,
    prompt: list[int],
    max_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    decoder: Decoder | None = None,
) -> Iterator[int]:
    """The ids `generate_ids` returns, one at a time, as they are decoded.

    The model sees the most recent ids up to its context window; past it, decoding restarts from the
    window's most recent half. Up to PIPELINE_DEPTH steps are queued (mx.async_eval) before the oldest
    token is read: each step takes the previous one's token as a lazy array, so the host builds and
    queues the next graphs while the device computes, and the device never waits for the host.
    decoder: a `Decoder(model)` kept across calls, so that its compiled steps are traced once; None:
    a new one, traced in this call."""
    sampling = (float(temperature), top_k, top_p)
    return _decoder(model, decoder).stream(prompt, max_tokens, sampling, seed)


def generate_ids(
    model: Transformer,
    prompt: list[int],
    max_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    decoder: Decoder | None = None,
) -> list[int]:
    """Continue `prompt` by `max_tokens` tokens (decoder: see `stream_ids`)."""
    ids = stream_ids(
        model, prompt, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, decoder=decoder
    )
    return list(ids)


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
    decoder: Decoder | None = None,
) -> str:
    """Sample a continuation of `prompt` (returned without the prompt; decoder: see `stream_ids`)."""
    prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    out = generate_ids(
        model, prompt_ids, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, decoder=decoder
    )
    if tokenizer.eos_id in out:
        out = out[: out.index(tokenizer.eos_id)]
    return tokenizer.decode(out)
