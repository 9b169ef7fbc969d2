"""The training step and evaluation: AdamW (its learning rate from mlxllm.schedule), the whole step compiled
with the model's and the optimizer's state, split over streams where that keeps more cores busy."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map, tree_reduce

from mlxllm import ops
from mlxllm.config import TrainConfig
from mlxllm.cpu.streams import data_streams, split_over, spread, spread_updates, stream_count
from mlxllm.distributed import Group
from mlxllm.model import Transformer


def loss_fn(model: Transformer, batch: mx.array) -> mx.array:
    """Mean next-token cross-entropy of a (B, L + 1) batch of token windows."""
    logits = model(batch[:, :-1]).astype(mx.float32)
    return ops.cross_entropy(logits, batch[:, 1:])


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    return optim.AdamW(learning_rate=cfg.learning_rate, betas=[cfg.beta1, cfg.beta2], weight_decay=cfg.weight_decay)


def _cast(params: Any, dtype: mx.Dtype) -> Any:
    return params if dtype == mx.float32 else tree_map(lambda p: p.astype(dtype), params)


def _averaged(grads: Any, group: Group, dtype: mx.Dtype) -> Any:
    """The gradients averaged over the group's processes, sent as `dtype` (bfloat16 halves the bytes)."""
    if group.size == 1:
        return grads
    if dtype == mx.float32:
        return nn.average_gradients(grads, group.handle)
    sent = nn.average_gradients(tree_map(lambda g: g.astype(dtype), grads), group.handle)
    return tree_map(lambda g: g.astype(mx.float32), sent)


def make_step(model: Transformer, optimizer: optim.Optimizer, cfg: TrainConfig, group: Group = Group()) -> Callable:
    """One optimizer step over `grad_accum` micro-batches, compiled with model and optimizer state.

    Takes batches of shape (grad_accum, batch_size, seq_len + 1), this process's rows of the global
    batch; returns (mean loss, gradient norm) over the whole group. `cfg.batch_size` is the rows per
    process. Run it within `cpu.streams.blas_threads_for(stream_count(cfg, model.config))`."""
    compute = getattr(mx, cfg.dtype)
    streams = data_streams(stream_count(cfg, model.config))

    def loss_of(params: Any, batch: mx.array) -> mx.array:
        model.update(_cast(params, compute))  # bf16 compute on fp32 master weights
        return loss_fn(model, batch)

    grad_fn = mx.value_and_grad(loss_of)

    def grads_of(batch: mx.array) -> tuple[mx.array, Any]:
        params = model.trainable_parameters()
        # Gradients first, so that spread maps each parameter to the same stream here as in apply.
        grads, loss = split_over(streams, lambda b: grad_fn(params, b)[::-1], batch)
        model.update(params)
        return loss, grads

    def apply(loss: mx.array, grads: Any) -> tuple[mx.array, mx.array]:
        if cfg.grad_accum > 1:
            loss, grads = loss / cfg.grad_accum, spread(streams, lambda g: g / cfg.grad_accum, grads)
        # One all-reduce per step; each process's rows are an equal share, so the mean of the means
        # is the mean over the global batch, as one process would compute it.
        grads, loss = _averaged(grads, group, getattr(mx, cfg.allreduce_dtype)), group.mean(loss)
        if group.size > 1 and cfg.max_seconds:  # a schedule on the clock follows rank 0's clock
            lr = optimizer.learning_rate
            optimizer.learning_rate = group.sum(lr if group.primary else mx.zeros_like(lr))
        # optim.clip_grad_norm, with its per-parameter work spread over the streams.
        norm = mx.sqrt(tree_reduce(mx.add, spread(streams, lambda g: g.square().sum(), grads)))
        scale = mx.minimum(cfg.grad_clip / (norm + 1e-6), 1.0)
        grads = spread(streams, lambda g: g * scale, grads)
        with spread_updates(optimizer, streams):
            optimizer.update(model, grads)
        return loss, norm

    # The step draws no random numbers (no dropout; batches come from (seed, step)), so the
    # state is the model and the optimizer, and a checkpoint of both resumes exactly.
    state = [model.state, optimizer.state]
    if cfg.grad_accum == 1:

        def step(batches: mx.array) -> tuple[mx.array, mx.array]:
            return apply(*grads_of(batches[0]))

        return mx.compile(step, inputs=state, outputs=state) if cfg.compile else step

    # Micro-batches are evaluated one after another (async_eval between them), so one micro-batch's
    # activations are alive at a time, as the memory estimate assumes; traced as one graph, MLX
    # would run parts of them side by side.
    micro = mx.compile(grads_of, inputs=model.state) if cfg.compile else grads_of
    update = mx.compile(apply, inputs=state, outputs=state) if cfg.compile else apply

    def accumulated_step(batches: mx.array) -> tuple[mx.array, mx.array]:
        total, grads = micro(batches[0])
        for i in range(1, cfg.grad_accum):
            mx.async_eval(total, grads)
            loss, g = micro(batches[i])
            total, grads = total + loss, spread(streams, mx.add, grads, g)
        return update(total, grads)

    return accumulated_step


def make_eval(model: Transformer, cfg: TrainConfig) -> Callable:
    """The mean loss of one validation batch, compiled, in the training dtype."""
    compute = getattr(mx, cfg.dtype)
    streams = data_streams(stream_count(cfg, model.config))

    def loss_at(batch: mx.array) -> mx.array:
        if compute == mx.float32:
            return loss_fn(model, batch)
        params = model.trainable_parameters()
        model.update(_cast(params, compute))
        loss = loss_fn(model, batch)
        model.update(params)
        return loss

    def evaluate(batch: mx.array) -> mx.array:
        return split_over(streams, loss_at, batch)

    return mx.compile(evaluate, inputs=model.state) if cfg.compile else evaluate


def evaluate(
    eval_fn: Callable, batches: list[np.ndarray], bytes_per_token: float, group: Group = Group()
) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte over the batches (each process its rows of each)."""
    losses = []
    for b in batches:  # one batch after another: as one graph, MLX would run them side by side
        losses.append(eval_fn(mx.array(group.rows(b))))
        mx.async_eval(losses[-1])
    loss = group.mean(mx.mean(mx.stack(losses))).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": loss / math.log(2) / bytes_per_token}
