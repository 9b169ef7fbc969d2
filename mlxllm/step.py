"""The training step and evaluation: AdamW (its learning rate from mlxllm.schedule), and one optimizer
step compiled with the model's, the optimizer's and the random state, as mlx-lm's trainer makes it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from mlxllm import data, ops
from mlxllm.config import ModelConfig, TrainConfig
from mlxllm.cpu import streams
from mlxllm.device import usable_cores
from mlxllm.distributed import Group
from mlxllm.model import Transformer, set_grad_checkpoint, set_training

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

# A transform of a function of a batch (as mx.compile is): cpu.streams.Split runs it over CPU streams.
Transform = Callable[[Callable[[mx.array], Any]], Callable[[mx.array], Any]]


def loss_fn(model: Transformer, batch: mx.array) -> mx.array:
    """Mean next-token cross-entropy of a (B, L + 1) batch of token windows. Of a (B, 2, L + 1) batch
    (the tokens, and 1 where a token counts as a target), the mean over all B * L targets with the
    uncounted ones as 0: divided by the share of targets counted it is the mean over the counted ones,
    and slices of equal size average into the whole batch's, as unmasked means do (make_step and
    evaluate divide by the global batch's share)."""
    if batch.ndim == 2:
        logits = model(batch[:, :-1]).astype(mx.float32)
        return ops.cross_entropy(logits, batch[:, 1:])
    tokens, counted = batch[:, 0], batch[:, 1, 1:]
    logits = model(tokens[:, :-1]).astype(mx.float32)
    return (ops.token_cross_entropy(logits, tokens[:, 1:]) * counted).mean()


def _loss_in_mode(model: Transformer, batch: mx.array, training: bool) -> mx.array:
    """loss_fn with dropout on (training) or off; the mode is read while tracing, so it is set here,
    inside the traced function, and put back after."""
    before = set_training(model, training)
    try:
        return loss_fn(model, batch)
    finally:
        set_training(model, before)


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    return optim.AdamW(learning_rate=cfg.learning_rate, betas=[cfg.beta1, cfg.beta2], weight_decay=cfg.weight_decay)


def step_seed(seed: int, step: int) -> int:
    """The random seed of optimizer step `step` of a run seeded `seed`: a pure function of both, so
    that what a step draws (dropout) is drawn again on resume, with no random state in the checkpoint."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0])


def stream_count(cfg: TrainConfig, model: ModelConfig | None = None) -> int:
    """How many CPU streams a step is split over: train.cpu_streams, or the auto choice for this model
    on this process's cores (cpu.streams.auto_count)."""
    if cfg.cpu_streams:
        return cfg.cpu_streams
    flops = None
    if model is not None:
        seq_len = cfg.seq_len or model.max_seq_len
        flops = model.flops_per_token(seq_len) * cfg.batch_size * seq_len
    return streams.auto_count(cfg.batch_size, usable_cores(), flops)


def cpu_split(cfg: TrainConfig, model: ModelConfig, group: Group = Group()) -> streams.Split:
    """The split over CPU streams of this process's step (cfg.batch_size: its rows); open it (`with`)
    around the steps, for its BLAS thread count."""
    return streams.Split(stream_count(cfg, model), usable_cores(), shared=group.local_size > 1)


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


def make_step(
    model: Transformer,
    optimizer: optim.Optimizer,
    cfg: TrainConfig,
    group: Group = Group(),
    split: Transform | None = None,
) -> Callable[[mx.array], tuple[mx.array, mx.array]]:
    """One optimizer step over `grad_accum` micro-batches, compiled with the model's, the optimizer's
    and the random state: loss and gradients of each micro-batch, summed, averaged over the group,
    clipped (optim.clip_grad_norm) and applied.

    Takes batches of shape (grad_accum, batch_size, seq_len + 1), this process's rows of the global
    batch, or (grad_accum, batch_size, 2, seq_len + 1) with their mask (the loss is then the mean over
    the global batch's counted targets, however they fall over micro-batches, streams and processes);
    returns (mean loss, gradient norm) over the whole group. `cfg.batch_size` is the rows per
    process. `split` transforms the micro-batch's loss-and-gradient function (`cpu_split` runs it
    over CPU streams); None: it runs as it is. The learning rate is the optimizer's, set by the caller.
    cfg.grad_checkpoint: each block's activations are recomputed in the backward (model.set_grad_checkpoint)."""
    compute, k = getattr(mx, cfg.dtype), cfg.grad_accum
    cast = ops.param_dtype(compute)
    set_grad_checkpoint(model, cfg.grad_checkpoint)

    def loss(params: Any, batch: mx.array) -> mx.array:
        model.update(_cast(params, cast))  # bf16 compute on fp32 master weights
        return _loss_in_mode(model, batch, training=True)

    value_and_grad = mx.value_and_grad(loss)

    def loss_and_grad(batch: mx.array) -> tuple[mx.array, Any]:
        params = model.trainable_parameters()
        with ops.autocast(compute):  # the backward too: a checkpointed block recomputes its forward in it
            value, grads = value_and_grad(params, batch)
        model.update(params)  # the master weights again, for the update
        return value, grads

    micro = split(loss_and_grad) if split is not None else loss_and_grad

    def step(
        batch: mx.array, summed: tuple[mx.array, Any] | None, update: bool, share: mx.array | None = None
    ) -> tuple[mx.array, Any]:
        value, grads = micro(batch)
        if summed is not None:
            value, grads = summed[0] + value, tree_map(mx.add, summed[1], grads)
        if not update:
            return value, grads
        if k > 1:
            value, grads = value / k, tree_map(lambda g: g / k, grads)
        # One all-reduce per step; each process's rows are an equal share, so the mean of the means
        # is the mean over the global batch, as one process would compute it.
        grads, value = _averaged(grads, group, getattr(mx, cfg.allreduce_dtype)), group.mean(value)
        if share is not None:  # a masked batch: the mean over the global batch's counted targets
            share = mx.maximum(group.mean(share), 1e-12)  # none counted: the sums are 0, and so the step
            value, grads = value / share, tree_map(lambda g: g / share, grads)
        grads, norm = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(model, grads)
        return value, norm

    # The random state is the caller's to set before each step (step_seed), so that a checkpoint of
    # the model and the optimizer resumes exactly.
    state = [model.state, optimizer.state, mx.random.state]
    if cfg.compile:
        step = mx.compile(step, inputs=state, outputs=state)

    def accumulated(batches: mx.array) -> tuple[mx.array, mx.array]:
        # Micro-batches are evaluated one after another, so one micro-batch's activations are alive
        # at a time, as the memory estimate assumes; traced as one graph, MLX would run parts of them
        # side by side.
        summed = None
        for i in range(k - 1):
            summed = step(batches[i], summed, False)
            mx.async_eval(summed)
        # (k, B, 2, L + 1): tokens and their mask; the share of this process's targets that count.
        share = batches[:, :, 1, 1:].astype(mx.float32).mean() if batches.ndim == 4 else None
        return step(batches[k - 1], summed, True, share)

    return accumulated


def make_eval(model: Transformer, cfg: TrainConfig, split: Transform | None = None) -> Callable:
    """The mean loss of one validation batch (dropout off), compiled, in the training dtype; `split` as
    make_step's."""
    compute = getattr(mx, cfg.dtype)
    cast = ops.param_dtype(compute)

    def loss_at(batch: mx.array) -> mx.array:
        with ops.autocast(compute):
            if cast == mx.float32:
                return _loss_in_mode(model, batch, training=False)
            params = model.trainable_parameters()
            model.update(_cast(params, cast))
            loss = _loss_in_mode(model, batch, training=False)
            model.update(params)
            return loss

    evaluate = split(loss_at) if split is not None else loss_at
    return mx.compile(evaluate, inputs=model.state) if cfg.compile else evaluate


def evaluate(
    eval_fn: Callable, batches: list[np.ndarray], bytes_per_token: float, group: Group = Group()
) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte over the batches (each process its rows of each):
    the mean over every counted target of every batch (all targets, unmasked), whatever the batches'
    sizes; bytes_per_token: the UTF-8 bytes per counted token."""
    losses = []
    for b in batches:  # one batch after another: as one graph, MLX would run them side by side
        losses.append(eval_fn(mx.array(group.rows(b))))
        mx.async_eval(losses[-1])
    # Each batch's mean is over all of its targets (the uncounted as 0): weighted by their number, summed,
    # and divided by the number counted.
    targets = mx.array([b.shape[0] * (b.shape[-1] - 1) for b in batches], dtype=mx.float32)
    counted = sum(data.counted_targets(b) for b in batches)
    loss = group.mean(mx.sum(mx.stack(losses) * targets)).item() / max(1, counted)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": loss / math.log(2) / bytes_per_token}
