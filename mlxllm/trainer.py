"""The training loop: prepare the data and the run directory, build or restore the model, run the
compiled step, evaluate and checkpoint on schedule, and report."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxllm import checkpoint as ckpt
from mlxllm import data as data_mod
from mlxllm import distributed
from mlxllm.config import RunConfig
from mlxllm.cpu import blas
from mlxllm.cpu.precision import held_dtype
from mlxllm.cpu.streams import Split
from mlxllm.data import TokenData
from mlxllm.device import backend, peak_flops
from mlxllm.errors import MlxllmError
from mlxllm.layout import group_peak, layout
from mlxllm.memory import describe as describe_memory
from mlxllm.progress import Reporter
from mlxllm.runstate import Run, memory, open_run
from mlxllm.schedule import lr_at
from mlxllm.signals import StopOnSignal, signal_name
from mlxllm.step import cpu_split, evaluate, make_eval, make_step, step_seed

import mlx.core as mx


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


def _describe(r: Run) -> str:
    m, resumed, g = r.run.model, r.step > 0, r.group
    counted = f" ({r.data.train_counted:,} counted: prompts masked)" if r.data.train_mask is not None else ""
    return (
        f"Model: {m.n_layers} layers x {m.d_model}, {m.n_heads} heads ({m.kv_heads} KV), "
        f"{m.num_params() / 1e6:.2f}M parameters; vocab {m.vocab_size}; {len(r.data.train):,} training tokens"
        f"{counted}; "
        f"{r.total_steps} steps of {r.tokens_per_step:,} tokens; "
        + describe_memory(memory(r.run, r.seq_len, g, quantization=r.quantization))
        + (f"; resuming at step {r.step}" if resumed else "")
        + (f"; data-parallel over {g.describe()}" if g.size > 1 else "")
    )


@dataclass
class _Window:
    """The steps since the last log line: their losses, tokens and start time."""

    start: float
    tokens: int = 0
    losses: list[mx.array] = field(default_factory=list)


def _window_metrics(r: Run, window: _Window, peak: float) -> dict[str, Any]:
    # Wait for the whole last step (a loss is ready after its forward) so that the window's time
    # holds all of its steps' work.
    mx.eval(r.model.parameters(), r.optimizer.state)
    train_loss = mx.mean(mx.stack(window.losses)).item()
    tps = window.tokens / (time.perf_counter() - window.start)
    if not math.isfinite(train_loss):
        where = f"the last good checkpoint is {r.last_good}" if r.last_good else "no checkpoint was saved yet"
        raise MlxllmError(
            f"The training loss became {train_loss} by step {r.step}; training stopped and {where}. "
            "Lower train.learning_rate, raise train.warmup_steps or use dtype=float32, then resume "
            "with --resume (it continues from the last good checkpoint)."
        )
    return {
        "step": r.step,
        "loss": train_loss,
        "lr": lr_at(r.cfg, r.step - 1, r.progress()),
        "tokens": r.tokens,
        "tokens_per_sec": tps,
        "mfu": r.run.model.flops_per_token(r.seq_len) * tps / peak,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "elapsed": r.elapsed(),
    }


@dataclass
class _Outcome:
    stopped_by: str = "max_steps"
    last_val: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    tokens_per_sec: float | None = None


def _out_of_time(r: Run) -> bool:
    """train.max_seconds reached. In a group, rank 0's clock decides, read every log_interval steps
    (a collective every step would wait out each step's work)."""
    if r.cfg.max_seconds is None or (r.group.size > 1 and r.step % r.cfg.log_interval):
        return False
    return r.group.decide(r.elapsed() >= r.cfg.max_seconds)


def _learning_rate(r: Run) -> float | mx.array:
    """This step's learning rate. On the clock (train.max_seconds) in a group it is rank 0's: each
    rank's clock differs, and their weights must not. Left lazy, the all-sum runs with the step."""
    lr, g = lr_at(r.cfg, r.step, r.progress()), r.group
    if g.size == 1 or not r.cfg.max_seconds:
        return lr
    return g.sum(mx.array(lr if g.primary else 0.0))


def _stop_saving(r: Run, window: _Window, reporter: Reporter, peak: float) -> None:
    """Stopped by a signal: the steps since the last log are logged, and this step is saved unless its
    evaluation just saved it. No evaluation: a scheduler's grace period may not afford one."""
    if window.losses:
        reporter.log(_window_metrics(r, window, peak))
    if r.last_good is None or ckpt.read_state(r.last_good)["step"] != r.step:
        r.save({})


def _loop(
    r: Run, reporter: Reporter, callback: Callback | None, peak: float, split: Split, stop: StopOnSignal
) -> _Outcome:
    """Step until a budget, the callback or a signal (`stop`) stops it; evaluate and checkpoint every
    eval_interval."""
    cfg, out, g = r.cfg, _Outcome(), r.group
    step_fn = make_step(r.model, r.optimizer, r.local_cfg, g, split)
    eval_fn = make_eval(r.model, r.local_cfg, split)
    val_batches = data_mod.eval_batches(r.data, cfg.batch_size, r.seq_len, cfg.eval_batches)
    r.start = time.perf_counter()
    window, batch = _Window(r.start), r.batch()
    with g.watch() as beat:
        while r.step < r.total_steps:
            if stop.agreed is not None:
                out.stopped_by = signal_name(stop.agreed)
                break
            if _out_of_time(r):
                out.stopped_by = "max_seconds"
                break
            if (why := r.early_stop()) is not None:  # also at once, for a resumed run that had stopped so
                out.stopped_by = "early_stop"
                reporter.message(why)
                break
            r.optimizer.learning_rate = _learning_rate(r)
            mx.random.seed(step_seed(cfg.seed, r.step))
            loss, _ = step_fn(batch)
            mx.async_eval(loss, r.model.parameters(), r.optimizer.state)
            stop.poll(loss)
            r.step, r.tokens = r.step + 1, r.tokens + r.tokens_per_step
            window.losses.append(loss)
            window.tokens += r.tokens_per_step
            batch = r.batch()  # gathered on the host while the step runs
            beat()

            at_eval = r.step % cfg.eval_interval == 0 or r.step >= r.total_steps
            if r.step % cfg.log_interval == 0 or at_eval:
                metrics = _window_metrics(r, window, peak)
                out.tokens_per_sec, window = metrics["tokens_per_sec"], _Window(time.perf_counter())
                if at_eval:
                    out.last_val = evaluate(eval_fn, val_batches, r.data.bytes_per_token, g)
                    metrics.update(out.last_val)
                    out.history.append(metrics)
                    r.save(out.last_val)
                    window = _Window(time.perf_counter())  # evaluation and saving are not training time
                reporter.log(metrics)
                ckpt.crash_point("step", r.step)
                if at_eval and callback is not None and g.decide(bool(callback(metrics)) if g.primary else False):
                    out.stopped_by = "callback"
                    break
            if cfg.max_tokens is not None and r.tokens >= cfg.max_tokens:
                out.stopped_by = "max_tokens"
                break
        if stop.agreed is not None and out.stopped_by == signal_name(stop.agreed):
            _stop_saving(r, window, reporter, peak)
        elif r.step and (not out.history or out.history[-1]["step"] != r.step):
            out.last_val = evaluate(eval_fn, val_batches, r.data.bytes_per_token, g)
            r.save(out.last_val)
            reporter.log({"step": r.step, "elapsed": r.elapsed(), **out.last_val})
    return out


def _summary(result: TrainResult) -> dict[str, str]:
    return {
        "run directory": str(result.run_dir),
        "steps": str(result.step),
        "tokens": f"{result.tokens:,}",
        "time": f"{result.elapsed:.1f} s",
        "stopped by": result.stopped_by,
        "validation loss": f"{result.val_loss:.4f}" if result.val_loss is not None else "-",
        "validation bits/byte": f"{result.val_bpb:.3f}" if result.val_bpb is not None else "-",
        "tokens/s (last window)": f"{result.tokens_per_sec:,.0f}" if result.tokens_per_sec else "-",
    }


def train(
    run: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callback | None = None,
    show_progress: bool = True,
    data: TokenData | None = None,
) -> TrainResult:
    """Train a model from text, as `mlxllm train` does. Returns where it went and how it ended.

    run: the model, tokenizer and training settings (RunConfig(model=..., tokenizer=..., train=...),
    or load_config). resume: continue the run in train.out_dir from its latest checkpoint. overwrite:
    replace a run already there. callback: sees each evaluation's metrics; True stops training.
    show_progress: the live display and summary (False: quiet). data: token data already prepared
    (`data.prepare`) for this corpus and tokenizer, so that many runs on one corpus (a search)
    tokenize and hash it once."""
    if not isinstance(run, RunConfig):
        raise MlxllmError(
            f"train() takes one RunConfig (got {type(run).__name__}): train(RunConfig(model=ModelConfig(...), "
            "tokenizer=TokenizerConfig(...), train=TrainConfig(...))), or train(load_config('config.toml'))."
        )
    g = distributed.group()
    warning = blas.warning(backend())
    if warning and g.primary:  # said even when quiet: it can cost a run 20x its time
        print("Warning: " + warning, file=sys.stderr)
    r = open_run(run, resume, overwrite, data, quiet=not show_progress, g=g)
    stop = StopOnSignal(g)
    try:
        # Measured once per machine, with the BLAS's own thread count; the group's peak is its devices'.
        with g.in_turn("measuring the machine"):
            peak = group_peak(peak_flops(held_dtype(r.cfg.dtype, backend()))[0], layout(g, backend()))
        reporter = Reporter(
            r.run_dir if g.primary else None, r.total_steps, start_step=r.step, show=show_progress and g.primary
        )
        reporter.message(_describe(r))
        try:
            with cpu_split(r.local_cfg, r.run.model, g) as split, stop:  # its BLAS threads, the signals
                out = _loop(r, reporter, callback, peak, split, stop)
        except RuntimeError as e:
            if not g.is_lost(e):
                raise
            raise g.lost(e, r.step) from None
        finally:
            reporter.close()
    finally:
        if r.lock is not None:
            r.lock.close()
    stopped = stop.stopped(r.step, r.last_good if g.primary else None)
    if stopped is not None:
        raise stopped
    result = TrainResult(
        run_dir=r.run_dir,
        step=r.step,
        tokens=r.tokens,
        elapsed=r.elapsed(),
        val_loss=out.last_val.get("val_loss"),
        val_bpb=out.last_val.get("val_bpb"),
        best_val_loss=r.best_val,
        tokens_per_sec=out.tokens_per_sec,
        stopped_by=out.stopped_by,
        history=out.history,
    )
    reporter.summary(_summary(result))
    return result
