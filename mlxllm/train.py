"""Training: AdamW with warmup and cosine decay, the whole step compiled with its state, exact resume."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_reduce, tree_unflatten

from mlxllm import _blas
from mlxllm import checkpoint as ckpt
from mlxllm import cpu_math
from mlxllm import data as data_mod
from mlxllm.config import RunConfig, dump_toml
from mlxllm.device import peak_flops
from mlxllm.memory import check_fits, configure_cache, describe as describe_memory, estimate_memory, set_wired_limit
from mlxllm.errors import MlxllmError
from mlxllm.model import ModelConfig, Transformer, build_model
from mlxllm.progress import Reporter
from mlxllm.tokenizer import TokenizerConfig

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    data: str | None = None  # a file, a folder or a glob; None: the built-in corpus
    out_dir: str = "runs/default"
    batch_size: int = 16
    seq_len: int | None = None  # None: the model's max_seq_len
    grad_accum: int = 1
    learning_rate: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "float32"
    max_steps: int = 100  # the quick start: a couple of minutes on 2 CPU cores
    max_tokens: int | None = None
    max_seconds: float | None = None
    eval_interval: int = 50  # evaluate, then checkpoint, every N steps
    eval_batches: int = 10
    log_interval: int = 10
    keep_last: int = 2
    seed: int = 0
    val_fraction: float = 0.1
    compile: bool = True
    # Each micro-batch is split over this many CPU streams, one thread each, gradients averaged.
    # 0: one per core on the Linux CPU backend (batch_size and model size permitting), else 1.
    cpu_streams: int = 0
    sample_tokens: int = 200
    sample_prompt: str = ""

    def __post_init__(self) -> None:
        problems = []
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval", "keep_last"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be a positive integer (got {v!r})")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 1):
            problems.append(f"seq_len must be a positive integer (got {self.seq_len!r})")
        if not isinstance(self.cpu_streams, int) or self.cpu_streams < 0:
            problems.append(f"cpu_streams must be 0 (auto) or a positive integer (got {self.cpu_streams!r})")
        elif self.cpu_streams and self.batch_size % self.cpu_streams:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of cpu_streams ({self.cpu_streams})")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be positive (got {self.learning_rate})")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be between 0 and 1 (got {self.min_lr_ratio})")
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append(f"max_tokens must be positive (got {self.max_tokens})")
        if self.max_seconds is not None and self.max_seconds <= 0:
            problems.append(f"max_seconds must be positive (got {self.max_seconds})")
        if problems:
            raise MlxllmError("Invalid training config: " + "; ".join(problems) + ".")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MlxllmError(
                f"Unknown train config key(s) {', '.join(unknown)}. Valid keys: {', '.join(sorted(names))}."
            )
        return cls(**d)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    elapsed: float
    val_loss: float | None
    val_bpb: float | None
    best_val_loss: float | None
    tokens_per_sec: float | None
    stopped_by: str
    history: list[dict[str, Any]] = field(default_factory=list)


# A callback sees each evaluation's metrics; returning True stops training (a search prunes this way).
Callback = Callable[[dict[str, Any]], "bool | None"]


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine from learning_rate down to the floor."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    floor = cfg.learning_rate * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.learning_rate - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def loss_fn(model: Transformer, batch: mx.array) -> mx.array:
    logits = model(batch[:, :-1]).astype(mx.float32)
    if cpu_math.use_fast_exp():
        return cpu_math.cross_entropy(logits, batch[:, 1:]).mean()
    return nn.losses.cross_entropy(logits, batch[:, 1:], reduction="mean")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Below this many FLOPs per stream and micro-batch, splitting costs more than it gains: measured on
# 2 cores, 0.18 GFLOP (2 x 64, context 64, batch 8) ran 0.87x with two streams, 1.3 GFLOP 1.15x,
# 5.3 GFLOP 1.34x, 43 GFLOP (4 x 256, context 256, batch 16) 1.3x.
MIN_STREAM_FLOPS = 0.5e9


def stream_count(cfg: TrainConfig, model: ModelConfig | None = None) -> int:
    """How many streams a step is split over (train.cpu_streams, or its auto choice for this model)."""
    if cfg.cpu_streams:
        return cfg.cpu_streams
    # MLX runs each stream's ops in order on one thread, and on the CPU most of a small model's
    # elementwise work is single-threaded: one stream per core with single-threaded BLAS calls
    # measured 1.2-1.35x faster (d256 and d512, 2 cores) than one stream with 2-thread BLAS.
    # Only where we can set the BLAS thread count, else the streams' BLAS threads oversubscribe.
    if mx.default_device().type != mx.DeviceType.cpu or not sys.platform.startswith("linux") or _blas.threads() is None:
        return 1
    cores = usable_cores()
    choices = [n for n in range(1, min(cores, cfg.batch_size) + 1) if cfg.batch_size % n == 0]
    if model is not None:
        seq_len = cfg.seq_len or model.max_seq_len
        flops = model.flops_per_token(seq_len) * cfg.batch_size * seq_len
        choices = [n for n in choices if n == 1 or flops / n >= MIN_STREAM_FLOPS]
    return max(choices)


# MLX runs a graph in the order of a breadth-first walk back from its outputs that turns depth-first
# wherever a level is wider than MLX_BFS_MAX_WIDTH (default 20), and it stops queueing work while ten
# tasks are outstanding. With the step split over streams, a depth-first stretch queues one stream's
# ops only, and the other stream idles until the walk comes back to it. Measured on the 4 x 256 train
# step, 2 cores: 6,400 tokens/s at widths 20, 100 or 1,000 but 3,900 at 50; with the attention
# gradient or a linear layer's written out by hand (custom_function), 4,100-5,900 at width 20 (CPU
# busy 1.25-1.8 of 2 cores instead of 1.94); 4 accumulated micro-batches traced as one graph 4,800
# at 20, 6,550 at 1,000. A width above any level of our graphs makes the walk breadth-first, so the
# streams' identical graphs interleave whatever their shape; peak memory of one step was unchanged
# (595 MB d256, 1,251 MB d512). MLX reads it at its first evaluation, so it is set here, at import;
# a value already in the environment wins.
BFS_WIDTH = "10000"
BFS_ENV_APPLIED = False
if sys.platform.startswith("linux") and mx.default_device() == mx.cpu and "MLX_BFS_MAX_WIDTH" not in os.environ:
    os.environ["MLX_BFS_MAX_WIDTH"] = BFS_WIDTH
    BFS_ENV_APPLIED = True

_streams: list[mx.Stream] = []


def data_streams(n: int) -> list[mx.Stream]:
    """n streams on the default device (made once per process: each CPU stream is a thread).

    With n > 1 on the CPU, BLAS calls are limited to cores // n threads each, so the streams
    do not oversubscribe the cores; train() restores the previous setting when it ends."""
    if n == 1:
        return [mx.default_stream(mx.default_device())]
    while len(_streams) < n:
        _streams.append(mx.new_stream(mx.default_device()))
    if mx.default_device().type == mx.DeviceType.cpu:
        _blas.set_threads(max(1, usable_cores() // n))
    return _streams[:n]


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


def make_step(model: Transformer, optimizer: optim.Optimizer, cfg: TrainConfig) -> Callable:
    """One optimizer step over `grad_accum` micro-batches, compiled with model and optimizer state.

    Takes batches of shape (grad_accum, batch_size, seq_len + 1); returns (mean loss, gradient norm)."""
    compute = getattr(mx, cfg.dtype)
    streams = data_streams(stream_count(cfg, model.config))

    def cast(params: Any) -> Any:
        return params if compute == mx.float32 else tree_map(lambda p: p.astype(compute), params)

    def loss_of(params: Any, batch: mx.array) -> mx.array:
        model.update(cast(params))  # bf16 compute on fp32 master weights
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
    # activations are alive at a time, as the memory estimate assumes. Traced as one graph, MLX ran
    # parts of them side by side: 4 micro-batches of the d256 step peaked at 1.6-2.1 GB, against 0.6 GB
    # for one.
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
    compute = getattr(mx, cfg.dtype)
    streams = data_streams(stream_count(cfg, model.config))

    def loss_at(batch: mx.array) -> mx.array:
        if compute == mx.float32:
            return loss_fn(model, batch)
        params = model.trainable_parameters()
        model.update(tree_map(lambda p: p.astype(compute), params))
        loss = loss_fn(model, batch)
        model.update(params)
        return loss

    def evaluate(batch: mx.array) -> mx.array:
        return split_over(streams, loss_at, batch)

    return mx.compile(evaluate, inputs=model.state) if cfg.compile else evaluate


def evaluate(eval_fn: Callable, batches: list[np.ndarray], bytes_per_token: float) -> dict[str, float]:
    losses = []
    for b in batches:  # one batch after another: as one graph, MLX would run them side by side
        losses.append(eval_fn(mx.array(b)))
        mx.async_eval(losses[-1])
    loss = mx.mean(mx.stack(losses)).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": loss / math.log(2) / bytes_per_token}


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    return optim.AdamW(
        learning_rate=cfg.learning_rate, betas=[cfg.beta1, cfg.beta2], weight_decay=cfg.weight_decay
    )


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    holds_run = run_dir.exists() and any((run_dir / n).exists() for n in ("config.toml", "checkpoints", "metrics.jsonl"))
    if holds_run and overwrite:
        shutil.rmtree(run_dir)
    elif holds_run and not resume:
        raise MlxllmError(
            f"{run_dir} already holds a training run. Pass --resume to continue it, --overwrite to replace it, "
            "or choose another directory with --out."
        )
    elif run_dir.exists() and not run_dir.is_dir():
        raise MlxllmError(f"{run_dir} is a file, not a directory. Choose another --out.")
    run_dir.mkdir(parents=True, exist_ok=True)


def _check_resume(run_dir: Path, saved: RunConfig, saved_data: str | None, run: RunConfig, data_key: str) -> None:
    # The token cache key covers the corpus content and the tokenizer settings.
    if saved.tokenizer != run.tokenizer or saved_data != data_key:
        raise MlxllmError(
            f"Cannot resume {run_dir}: its tokenizer or corpus differs from this one "
            f"(checkpoint: {saved.tokenizer}, data={saved.train.data!r}; now: {run.tokenizer}, data={run.train.data!r}). "
            "Resume with the same --data (unchanged) and tokenizer settings, or start a new run with --out or --overwrite."
        )
    if saved.model != run.model:
        diff = [
            f"{f.name}: checkpoint {getattr(saved.model, f.name)!r}, now {getattr(run.model, f.name)!r}"
            for f in fields(ModelConfig)
            if getattr(saved.model, f.name) != getattr(run.model, f.name)
        ]
        raise MlxllmError(
            f"Cannot resume {run_dir}: the model shape does not match the checkpoint ({'; '.join(diff)}). "
            "Resume with the run's own config (it is saved as config.toml in the run directory), "
            "or start a new run with --out or --overwrite."
        )


def train(
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    tokenizer_config: TokenizerConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callback | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train a model from text, as `mlxllm train` does. Returns where it went and how it ended."""
    run = RunConfig(
        model=model_config or ModelConfig(), train=train_config or TrainConfig(), tokenizer=tokenizer_config or TokenizerConfig()
    )
    cfg = run.train
    seq_len = cfg.seq_len or run.model.max_seq_len
    if seq_len > run.model.max_seq_len:
        raise MlxllmError(f"train.seq_len ({seq_len}) exceeds model.max_seq_len ({run.model.max_seq_len}); raise max_seq_len or shorten seq_len.")
    run_dir = Path(cfg.out_dir)
    _prepare_run_dir(run_dir, resume, overwrite)

    data = data_mod.prepare(cfg.data, run.tokenizer, val_fraction=cfg.val_fraction, quiet=not show_progress)
    data_mod.check_length(data, seq_len)
    tok = data.tokenizer
    run = replace(run, model=replace(run.model, vocab_size=tok.vocab_size))
    mem = estimate_memory(run.model, cfg.batch_size, seq_len, cfg.dtype, cfg.grad_accum)
    check_fits(mem, cfg.batch_size, seq_len)  # refuses, with a suggestion, a run the device cannot hold
    set_wired_limit()  # Apple silicon: keep the working set wired, as mlx-lm does
    configure_cache()  # CPU: reuse freed activation buffers instead of page-faulting them back every step

    latest = ckpt.latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        from mlxllm.config import load_config

        saved_data = ckpt.read_state(latest).get("data")
        _check_resume(run_dir, load_config(latest / "config.toml"), saved_data, run, data.directory.name)
    tok.save(run_dir)
    (run_dir / "config.toml").write_text(dump_toml(run))

    mx.random.seed(cfg.seed)
    model = build_model(run.model, seed=cfg.seed)
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    best_val: float | None = None
    if latest is not None:
        state = ckpt.read_state(latest)
        model.load_weights(str(latest / "model.safetensors"))
        optimizer.state = tree_unflatten(list(mx.load(str(latest / "optimizer.safetensors")).items()))
        step, tokens_seen, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        best_val = state.get("best_val_loss")
        mx.eval(model.parameters(), optimizer.state)

    tokens_per_step = cfg.batch_size * seq_len * cfg.grad_accum
    total_steps = cfg.max_steps
    if cfg.max_tokens is not None:
        total_steps = min(total_steps, math.ceil(cfg.max_tokens / tokens_per_step))
    flops_per_step = run.model.flops_per_token(seq_len) * tokens_per_step
    peak, _ = peak_flops(cfg.dtype)

    val_batches = data_mod.eval_batches(data, cfg.batch_size, seq_len, cfg.eval_batches)
    extra_files = [run_dir / "config.toml", *sorted(run_dir.glob("tokenizer.*"))]

    reporter = Reporter(run_dir, total_steps, start_step=step, show=show_progress)
    if show_progress:
        n_params = run.model.num_params()
        reporter.message(
            f"Model: {run.model.n_layers} layers x {run.model.d_model}, {run.model.n_heads} heads "
            f"({run.model.kv_heads} KV), {n_params / 1e6:.2f}M parameters; vocab {tok.vocab_size}; "
            f"{len(data.train):,} training tokens; {total_steps} steps of {tokens_per_step:,} tokens; "
            + describe_memory(mem)
            + (f"; resuming at step {step}" if latest is not None else "")
        )

    history: list[dict[str, Any]] = []
    last_val: dict[str, float] = {}
    last_good = latest
    start = time.perf_counter()
    window_start, window_tokens, window_losses = start, 0, []
    tps: float | None = None
    stopped_by = "max_steps"

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    def progress() -> float:
        p = step / total_steps
        return max(p, elapsed() / cfg.max_seconds) if cfg.max_seconds else p

    def save(val: dict[str, float]) -> None:
        nonlocal last_good, best_val
        if val and (best_val is None or val["val_loss"] < best_val):
            best_val = val["val_loss"]
        weights = dict(tree_flatten(model.parameters()))
        opt_state = dict(tree_flatten(optimizer.state))
        state = {"step": step, "tokens": tokens_seen, "elapsed": elapsed(), "seed": cfg.seed, "data": data.directory.name,
                 "val_loss": val.get("val_loss"), "val_bpb": val.get("val_bpb"), "best_val_loss": best_val}
        last_good = ckpt.save_checkpoint(run_dir, step, weights, opt_state, state, extra_files)
        ckpt.prune(run_dir, cfg.keep_last)

    batch = mx.array(data_mod.train_batch(data, cfg.seed, step, cfg.batch_size, seq_len, cfg.grad_accum))
    blas_threads = _blas.threads()  # make_step may lower it for its streams; restored at the end
    try:
        step_fn = make_step(model, optimizer, cfg)
        eval_fn = make_eval(model, cfg)
        while True:
            if step >= total_steps:
                break
            if cfg.max_seconds is not None and elapsed() >= cfg.max_seconds:
                stopped_by = "max_seconds"
                break
            optimizer.learning_rate = lr_at(cfg, step, progress())
            loss, _ = step_fn(batch)
            mx.async_eval(loss, model.parameters(), optimizer.state)
            step += 1
            tokens_seen += tokens_per_step
            window_losses.append(loss)
            window_tokens += tokens_per_step
            # Next batch is gathered on the host while the step runs.
            batch = mx.array(data_mod.train_batch(data, cfg.seed, step, cfg.batch_size, seq_len, cfg.grad_accum))

            at_eval = step % cfg.eval_interval == 0 or step >= total_steps
            if step % cfg.log_interval == 0 or at_eval:
                # Wait for the whole last step (a loss is ready after its forward) so that the window's
                # time holds all of its steps' work.
                mx.eval(model.parameters(), optimizer.state)
                train_loss = mx.mean(mx.stack(window_losses)).item()
                now = time.perf_counter()
                tps = window_tokens / (now - window_start)
                window_start, window_tokens, window_losses = now, 0, []
                if not math.isfinite(train_loss):
                    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
                    raise MlxllmError(
                        f"The training loss became {train_loss} by step {step}; training stopped and {where}. "
                        "Lower train.learning_rate, raise train.warmup_steps or use dtype=float32, then resume "
                        "with --resume (it continues from the last good checkpoint)."
                    )
                metrics: dict[str, Any] = {
                    "step": step, "loss": train_loss, "lr": lr_at(cfg, step - 1, progress()), "tokens": tokens_seen,
                    "tokens_per_sec": tps, "mfu": flops_per_step / tokens_per_step * tps / peak,
                    "peak_memory_gb": mx.get_peak_memory() / 1e9, "elapsed": elapsed(),
                }
                if at_eval:
                    last_val = evaluate(eval_fn, val_batches, data.bytes_per_token)
                    metrics.update(last_val)
                    history.append(metrics)
                    save(last_val)
                    window_start = time.perf_counter()  # evaluation and saving are not training time
                reporter.log(metrics)
                if at_eval and callback is not None and callback(metrics):
                    stopped_by = "callback"
                    break
            if cfg.max_tokens is not None and tokens_seen >= cfg.max_tokens:
                stopped_by = "max_tokens"
                break
        if not history or history[-1]["step"] != step:
            last_val = evaluate(eval_fn, val_batches, data.bytes_per_token) if step else {}
            if step:
                save(last_val)
                reporter.log({"step": step, "elapsed": elapsed(), **last_val})
    finally:
        reporter.close()
        if blas_threads is not None:
            _blas.set_threads(blas_threads)

    result = TrainResult(
        run_dir=run_dir, step=step, tokens=tokens_seen, elapsed=elapsed(), val_loss=last_val.get("val_loss"),
        val_bpb=last_val.get("val_bpb"), best_val_loss=best_val, tokens_per_sec=tps, stopped_by=stopped_by,
        history=history,
    )
    if show_progress:
        reporter.summary({
            "run directory": str(run_dir), "steps": str(step), "tokens": f"{tokens_seen:,}",
            "time": f"{result.elapsed:.1f} s", "stopped by": stopped_by,
            "validation loss": f"{result.val_loss:.4f}" if result.val_loss is not None else "-",
            "validation bits/byte": f"{result.val_bpb:.3f}" if result.val_bpb is not None else "-",
            "tokens/s (last window)": f"{tps:,.0f}" if tps else "-",
        })
    return result

