"""exp-based activations for MLX's CPU backend, from arithmetic the compiler fuses and vectorizes.

MLX's Linux x86 build evaluates exp -- and with it sigmoid, silu and softmax -- one element at a
time, through an out-of-line libm call per polynomial step, several times slower than a fused
multiply-add chain over the same array. Here exp(x), x <= 0, is exp(x/128) by its degree-9 Taylor
polynomial squared 7 times: only multiplies and adds, relative error <= 3e-5 (mean 4e-6) over
(-87, 0], and exactly 0 at and below -87. Used on the CPU only and only where the argument is <= 0
(softmax after subtracting the max; sigmoid of -|x|). The environment variable MLXLLM_FAST_EXP=0
turns it off (exact mx.exp, as on the GPU); it is read whenever the model's ops are built into a
graph, so a function compiled before a change keeps what it was traced with.

Two details keep the compiled kernels vectorised (MLX's CPU compiler runs a fused kernel's plain
contiguous loop only when every input is contiguous or a 0-d scalar, else a scalar strided loop):
constants are made on the stream that uses them (`_const`), and the long chains are cut by hand
(`_cut`). Both cost a few tiny ops per call, so arrays under `PER_STREAM_MIN_SIZE` elements
(decoding one token, uncompiled) skip them: there the extra ops would cost more than they save.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx

_TAYLOR = tuple(1 / math.factorial(i) for i in range(10))


def use_fast_exp() -> bool:
    """On the CPU backend, unless MLXLLM_FAST_EXP=0 (read now, not at import)."""
    return mx.default_device() == mx.cpu and os.environ.get("MLXLLM_FAST_EXP", "1") != "0"


PER_STREAM_MIN_SIZE = 1 << 14
_streams: list[mx.Stream] = []


def _const(value: float, like: mx.array, dtype: mx.Dtype | None = None) -> mx.array | float:
    """value as a 0-d array (of like's dtype, or dtype) computed on the current stream; for an array
    like under PER_STREAM_MIN_SIZE elements, value itself.

    MLX's compiler merges equal constants, and their broadcasts, across the whole compiled step
    whatever their stream; with the batch split over streams (streams.split_over) a kernel on one
    stream then gets the other stream's broadcast as an input it cannot fuse, a strided one. A
    constant derived from its own stream's number is merged only within that stream, and a 0-d
    input keeps the kernel on its contiguous loop."""
    if like.size < PER_STREAM_MIN_SIZE:
        return value
    stream = mx.default_stream(mx.default_device())
    index = next((i for i, s in enumerate(_streams) if s == stream), None)
    if index is None:
        _streams.append(stream)
        index = len(_streams) - 1
    return mx.array(float(index), dtype or like.dtype) * 0 + value


def _cut(x: mx.array) -> mx.array:
    # A fused kernel ends here. MLX's fusion stops at depth 11 on its own; where that cut falls on
    # a broadcast constant, the next kernel gets it as a strided input. mx.contiguous of a
    # contiguous array is no copy.
    return x if x.size < PER_STREAM_MIN_SIZE else mx.contiguous(x)


def exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for x <= 0; 0 at and below -87 (where exp(x) <= 1.6e-38, the smallest normal floats).

    Exactly 0, not a tiny value: a masked score (-inf) must give a zero whose products stay zero. A
    tiny nonzero e makes the score gradient e * (dP - delta) subnormal, and Intel cores take a
    microcode assist (on the order of a hundred cycles) for each vector operation that reads or
    writes a subnormal, which the backward matmuls then do across the masked third of every score
    matrix. AMD Zen cores handle subnormals at full speed, so there the two are equally fast."""
    dt = mx.float32  # in fp16/bf16 the seven squarings would multiply the rounding error by 128
    floor = _const(-87.0 / 128, x, dt)
    y = _cut(mx.maximum(x.astype(dt) * _const(1 / 128, x, dt), floor))
    p = _const(_TAYLOR[9], x, dt)
    for i, c in enumerate(_TAYLOR[8::-1]):
        p = p * y + _const(c, x, dt)
        if i == 3:
            p = _cut(p)
    p = _cut(mx.where(y == floor, _const(0.0, x, dt), p))  # zeroed before the squarings: no underflow; NaN stays NaN
    for _ in range(7):
        p = p * p
    return _cut(p.astype(x.dtype))


def _sigmoid(x: mx.array) -> mx.array:
    # 1/2 + tanh(x/2)/2, with tanh(|x|/2) = (1 - e)/(1 + e), e = exp(-|x|). The same function as
    # where(x >= 0, 1/(1+e), e/(1+e)), but MLX's compiler fuses this form into two contiguous
    # kernels where that one becomes four, one of them strided.
    e = exp_nonpositive(-mx.abs(x))
    one, half = _const(1.0, x), _const(0.5, x)
    t = (one - e) / (one + e)
    return _cut(half + half * mx.where(x >= _const(0.0, x), t, -t))


@mx.custom_function
def silu(x: mx.array) -> mx.array:
    return x * _sigmoid(x)


@silu.vjp
def _silu_vjp(x, cotangent, output):  # one input and one output: plain arrays, not tuples
    s = _sigmoid(x)
    one = _const(1.0, x)
    return cotangent * s * (one + x * (one - s))


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis."""
    e = exp_nonpositive(x - mx.stop_gradient(x.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


@softmax.vjp
def _softmax_vjp(x, cotangent, output):
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


@mx.custom_function
def _cross_entropy(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    m = logits.max(axis=-1, keepdims=True)
    e = exp_nonpositive(logits - m)
    total = e.sum(axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)
    return (m + mx.log(total) - picked).squeeze(-1), e, total  # e and total feed the gradient


@_cross_entropy.vjp
def _cross_entropy_vjp(primals, cotangents, outputs):
    logits, targets = primals
    _, e, total = outputs
    is_target = mx.arange(logits.shape[-1]) == targets[..., None]
    return (e / total - is_target) * cotangents[0][..., None], mx.zeros_like(targets)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross-entropy of integer targets, as nn.losses.cross_entropy(reduction="none"),
    with the fast exp (relative error <= 3e-5 in the sum of exps) and its gradient written out
    (softmax minus one-hot, from the forward's exps: no second exp pass)."""
    return _cross_entropy(logits, targets)[0]
