"""The model's math, one function per op: MLX's own op, or on the CPU backend the equal one from
`mlxllm.cpu` that runs faster there (a bfloat16 step's matrix products: oneDNN's bfloat16 matmul). The one
place that chooses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mlxllm.cpu import bf16matmul, fastexp, layers

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


def _cpu() -> bool:
    return mx.default_device() == mx.cpu


def _bf16_products(dtype: mx.Dtype) -> bool:
    return dtype == mx.bfloat16 and _cpu() and bf16matmul.chosen()


def param_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """What a step computing in `dtype` casts the model's weights to: `dtype`, or float32 on the CPU where
    a bfloat16 step's matrix products round their inputs inside oneDNN's matmul (autocast: see `autocast`)."""
    return mx.float32 if _bf16_products(dtype) else dtype


@contextlib.contextmanager
def autocast(dtype: mx.Dtype) -> Iterator[None]:
    """Around the forward and backward of a step computing in `dtype`: on the CPU, for bfloat16 where
    cpu.bf16matmul chose oneDNN's matmul (precision.compute_dtype asks it), the model's matrix products run in
    bfloat16 into float32 and everything else in float32; elsewhere nothing changes."""
    if not _bf16_products(dtype):
        yield
        return
    with bf16matmul.products():
        yield


def matmul(x: mx.array, w: mx.array) -> mx.array:
    """x (..., K) @ w (K, N): the model's matrix products (its layers and LM head)."""
    if bf16matmul.active() and _cpu():
        return bf16matmul.matmul(x, w)
    return x @ w


def linear(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T, weight (out, in) as nn.Linear holds it."""
    return matmul(x, weight.T)


def embedding_head(embedding: nn.Module, h: mx.array) -> mx.array:
    """The tied LM head, embedding.as_linear(h): a plain embedding's product through `matmul` (a quantized
    one multiplies its packed weights itself)."""
    if isinstance(embedding, nn.QuantizedEmbedding):
        return embedding.as_linear(h)
    return linear(h, embedding.weight)


class Linear(nn.Linear):
    """nn.Linear (the same parameters, names and quantization) with its product through `matmul`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = linear(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


def silu(x: mx.array) -> mx.array:
    return fastexp.silu(x) if fastexp.use_fast_exp() else nn.silu(x)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis."""
    return fastexp.softmax(x) if fastexp.use_fast_exp() else mx.softmax(x, axis=-1)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean cross-entropy of integer targets."""
    if fastexp.use_fast_exp():
        return fastexp.cross_entropy(logits, targets).mean()
    return nn.losses.cross_entropy(logits, targets, reduction="mean")


def token_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Cross-entropy of each integer target (no reduction)."""
    if fastexp.use_fast_exp():
        return fastexp.cross_entropy(logits, targets)
    return nn.losses.cross_entropy(logits, targets, reduction="none")


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    if _cpu() and x.size >= fastexp.PER_STREAM_MIN_SIZE:
        return layers.rms_norm(float(eps))(x, weight)
    return mx.fast.rms_norm(x, weight, eps)


class Rope:
    """Llama's rotate-half rotary embedding, for one model: built with it and shared by its layers.

    It holds the cos/sin tables up to the model's context, computed and evaluated here, outside any
    traced function: a traced step would otherwise compute them again on every call, forward and back.
    Not a Module, so the tables are no parameters (nothing trains, saves or loads them)."""

    def __init__(self, max_len: int, dims: int, base: float) -> None:
        """max_len: the longest sequence the tables cover (longer ones compute their angles); dims:
        the head dimension (even); base: the rotary base, rope_theta."""
        self.dims, self.base = dims, float(base)
        table = layers.rope_angles(max_len, dims, self.base)
        mx.eval(table)
        self._sequence = layers.sequence_rope(self.base, table)
        # Per position, the factors of x's halves and of its swapped halves, (max_len, 2, dims / 2), for
        # `at`; on the CPU only, where mx.fast.rope computes cos and sin of every angle on every call.
        self._decode: tuple[mx.array, mx.array] | None = None
        if _cpu():
            cos, sin = table
            self._decode = mx.stack([cos, cos], axis=1), mx.stack([-sin, sin], axis=1)
            mx.eval(self._decode)

    def __call__(self, x: mx.array) -> mx.array:
        """A whole sequence from position 0 (training and the forward without a cache): x (B, L, H, D)
        -> (B, H, L, D). With a KV cache: `at`."""
        if _cpu():
            return self._sequence(x)
        return mx.fast.rope(
            x.transpose(0, 2, 1, 3), x.shape[-1], traditional=False, base=self.base, scale=1.0, offset=0
        )

    def at(self, x: mx.array, *, offset: int | mx.array, end: int) -> mx.array:
        """The rotation of tokens at positions offset, offset + 1, ... (decoding with a KV cache): x
        (B, L, H, D) -> (B, H, L, D). offset is an int or a (1,) int32 array, so that one traced decode
        step serves every position; end bounds offset + L.

        On the CPU the factors are gathered from the tables (equal values to mx.fast.rope's), with the
        same ops for every layer of a step, which the compiler then merges into one."""
        B, L, H, D = x.shape
        tables = self._decode if _cpu() and D == self.dims else None
        if tables is None or tables[0].shape[0] < end:
            return mx.fast.rope(
                x.transpose(0, 2, 1, 3),
                D,
                traditional=False,
                base=self.base,
                scale=1.0,
                offset=offset if isinstance(offset, int) else offset[0],
            )
        if isinstance(offset, int):
            positions = mx.arange(offset, offset + L)
        else:  # one token: the very same array in every layer
            positions = offset if L == 1 else offset + mx.arange(L, dtype=offset.dtype)
        cos, sin = (mx.take(t, positions, axis=0).astype(x.dtype) for t in tables)  # (L, 2, D/2)
        # (B, H, L, 2, D/2); with one token, a reshape is the transpose.
        x5 = x.reshape(B, H, L, 2, D // 2) if L == 1 else x.reshape(B, L, H, 2, D // 2).transpose(0, 2, 1, 3, 4)
        # rotate-half, (x1 c - x2 s, x2 c + x1 s): one kernel, reading the halves swapped via a reversed view
        return (x5 * cos + x5[..., ::-1, :] * sin).reshape(B, H, L, D)


# Weights up to this many bytes in all get a decoding copy (decode_layout); larger models decode
# from their own weights rather than hold every weight twice.
DECODE_LAYOUT_MAX_BYTES = 1 << 30


def decode_layout(params: dict) -> dict:
    """The parameter tree a one-token decode step should read: `params`, or on the CPU each 2-D
    weight w as the transpose of a contiguous copy of w.T. Linear layers compute x @ w.T: with w.T
    contiguous the CPU BLAS reads it in its own order, where for w's rows it first repacks the
    whole matrix, for a single row of x the larger part of the work. Same values (copied and
    evaluated here, once)."""
    flat = tree_flatten(params)
    weights = [w for _, w in flat if w.ndim == 2]
    if not _cpu() or not weights or sum(w.nbytes for w in weights) > DECODE_LAYOUT_MAX_BYTES:
        return params
    copies = [(k, mx.contiguous(w.T).T if w.ndim == 2 else w) for k, w in flat]
    mx.eval([w for _, w in copies])
    return tree_unflatten(copies)
