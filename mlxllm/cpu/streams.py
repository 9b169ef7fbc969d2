"""A training step's micro-batch split over several MLX streams, so that every CPU core has work.

MLX runs each stream's ops in order on one thread, and on the CPU most of a small model's
elementwise work is single-threaded. So the micro-batch is split over one stream per core, each
with its share of the BLAS threads, and the slices' gradients are averaged leaf by leaf, alternating
between the streams. On one stream (a GPU, or a model too small to gain) `Split` changes nothing.

The training step (mlxllm.step) is plain MLX; `Split` is a transform of its gradient function,
given to it by the trainer, which opens the Split (its BLAS threads) around training.
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Callable
from typing import Any

from mlxllm.cpu import bf16matmul, blas

import mlx.core as mx
from mlx.utils import tree_map

# Below this many FLOPs per stream and micro-batch, splitting costs more than it gains (see
# benchmarks/README.md for the measurements behind it).
MIN_STREAM_FLOPS = 0.5e9


def auto_count(batch_size: int, cores: int, flops: float | None = None) -> int:
    """How many streams suit a step over `batch_size` rows on `cores` cores (this process's share):
    the most that divide the batch, one per core at most, each with at least MIN_STREAM_FLOPS of the
    step's `flops` per micro-batch (None: not known, not limited); 1 off the Linux CPU backend."""
    # Only where the BLAS thread count can be set: else the streams' BLAS threads oversubscribe.
    if mx.default_device().type != mx.DeviceType.cpu or not sys.platform.startswith("linux") or blas.threads() is None:
        return 1
    choices = [n for n in range(1, min(cores, batch_size) + 1) if batch_size % n == 0]
    if flops is not None:
        choices = [n for n in choices if n == 1 or flops / n >= MIN_STREAM_FLOPS]
    return max(choices)


_streams: list[mx.Stream] = []


def data_streams(n: int) -> list[mx.Stream]:
    """n streams on the default device, made once per process (each CPU stream is a thread)."""
    if n == 1:
        return [mx.default_stream(mx.default_device())]
    while len(_streams) < n:
        _streams.append(mx.new_stream(mx.default_device()))
    return _streams[:n]


class Split:
    """A function of a batch run on equal slices of it, one slice per stream, its results averaged;
    and, while open (`with`), each BLAS call given its stream's share of the cores.

    `split(fn)` is a transform like `mx.compile`: the training step applies it to its micro-batch's
    value-and-gradient function, the evaluation to its loss. It wraps the value-and-gradient, not the
    loss, because MLX computes a custom function's gradient (cpu.halves, cpu.layers) on the stream
    that differentiates, so each slice is differentiated on its own stream."""

    def __init__(self, n: int, cores: int, shared: bool = False):
        """n: streams (1: every function unchanged); cores: this process's cores; shared: other
        processes of a training group use the machine's other cores (the BLAS must be told even on one
        stream, or each process's BLAS takes every core)."""
        self.streams = data_streams(n)
        self.threads = max(1, cores // n) if n > 1 or shared else None  # None: the BLAS's own count
        self._before: int | None = None
        self._before_bf16: int | None = None

    def __call__(self, fn: Callable[[mx.array], Any]) -> Callable[[mx.array], Any]:
        if len(self.streams) == 1:
            return fn
        return functools.partial(split_over, self.streams, fn)

    def __enter__(self) -> Split:
        self._before = blas.threads()
        self._before_bf16 = bf16matmul.threads()
        if self.threads is not None and mx.default_device().type == mx.DeviceType.cpu:
            blas.set_threads(self.threads)
            bf16matmul.set_threads(self.threads)  # oneDNN's bfloat16 products, on OpenMP threads of their own
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before is not None:
            blas.set_threads(self._before)
        bf16matmul.set_threads(self._before_bf16)


def split_over(streams: list[mx.Stream], fn: Callable, batch: mx.array) -> Any:
    """fn on equal slices of the batch, each on its own stream; the results (trees) averaged,
    leaf by leaf over the streams (spread).

    fn must return means over its slice, so the average is the mean over the whole batch."""
    if len(streams) == 1 or batch.shape[0] % len(streams):
        return fn(batch)
    k = batch.shape[0] // len(streams)
    outs = []
    for i, s in enumerate(streams):
        with mx.stream(s):
            outs.append(fn(batch[i * k : (i + 1) * k]))
    return spread(streams, lambda *xs: sum(xs[1:], xs[0]) / len(xs), *outs)


def _round_robin(streams: list[mx.Stream], fn: Callable) -> Callable:
    """fn, each call made on the next of the streams in turn."""
    count = itertools.count()

    def on_stream(*xs: Any) -> Any:
        with mx.stream(streams[next(count) % len(streams)]):
            return fn(*xs)

    return on_stream


def spread(streams: list[mx.Stream], fn: Callable, *trees: Any) -> Any:
    """tree_map(fn, *trees) with leaf i computed on streams[i % len(streams)].

    The slices' average touches every parameter once: on one stream (one thread) it would leave the
    other cores idle between the backward passes and the update."""
    return tree_map(fn if len(streams) == 1 else _round_robin(streams, fn), *trees)
