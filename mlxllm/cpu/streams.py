"""One training step split over several MLX streams, so that every CPU core has work.

MLX runs each stream's ops in order on one thread, and on the CPU most of a small model's
elementwise work is single-threaded. So the step's micro-batch is split over one stream per core,
each with single-threaded BLAS calls, and the per-parameter work (gradient average, clipping,
optimizer update) alternates between the streams leaf by leaf. On one stream (a GPU, or a model
too small to gain) every function here is the plain computation.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from mlxllm.config import ModelConfig, TrainConfig
from mlxllm.cpu import blas
from mlxllm.device import usable_cores
from mlxllm.distributed import current

# Below this many FLOPs per stream and micro-batch, splitting costs more than it gains (see
# benchmarks/README.md for the measurements behind it).
MIN_STREAM_FLOPS = 0.5e9


def stream_count(cfg: TrainConfig, model: ModelConfig | None = None) -> int:
    """How many streams a step is split over (train.cpu_streams, or its auto choice for this model)."""
    if cfg.cpu_streams:
        return cfg.cpu_streams
    # Only where the BLAS thread count can be set: else the streams' BLAS threads oversubscribe.
    if mx.default_device().type != mx.DeviceType.cpu or not sys.platform.startswith("linux") or blas.threads() is None:
        return 1
    choices = [n for n in range(1, min(usable_cores(), cfg.batch_size) + 1) if cfg.batch_size % n == 0]
    if model is not None:
        seq_len = cfg.seq_len or model.max_seq_len
        flops = model.flops_per_token(seq_len) * cfg.batch_size * seq_len
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


@contextlib.contextmanager
def blas_threads_for(n_streams: int) -> Iterator[None]:
    """Within: each BLAS call uses cores // n_streams threads (with n_streams > 1 on the CPU), so
    the streams do not oversubscribe the cores; the previous setting is restored after."""
    before = blas.threads()
    shared = current().local_size > 1  # other processes of a training group use the other cores
    if (n_streams > 1 or shared) and mx.default_device().type == mx.DeviceType.cpu:
        blas.set_threads(max(1, usable_cores() // n_streams))
    try:
        yield
    finally:
        if before is not None:
            blas.set_threads(before)


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

    The gradient average, clipping and optimizer update touch every parameter once: on one stream
    (one thread) they leave the other cores idle at the end of each step. Trees with the same
    structure map the same leaf to the same stream (see spread_updates)."""
    return tree_map(fn if len(streams) == 1 else _round_robin(streams, fn), *trees)


@contextlib.contextmanager
def spread_updates(optimizer: optim.Optimizer, streams: list[mx.Stream]) -> Iterator[None]:
    """Within: the optimizer updates parameter i on streams[i % len(streams)], as spread does.

    MLX optimizers update each parameter in apply_single, called over the gradient tree in order."""
    if len(streams) == 1:
        yield
        return
    optimizer.apply_single = _round_robin(streams, optimizer.apply_single)  # shadows the method
    try:
        yield
    finally:
        del optimizer.apply_single
