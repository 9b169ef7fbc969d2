"""The training loop: prepare the data and the run directory, build or restore the model, run the
compiled step, evaluate and checkpoint on schedule, and report."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlxllm import checkpoint as ckpt
from mlxllm import data as data_mod
from mlxllm import lora, pretrained, rundir
from mlxllm.config import ModelConfig, RunConfig, TokenizerConfig, TrainConfig, dump_toml
from mlxllm.cpu import blas
from mlxllm.cpu.streams import blas_threads_for, stream_count
from mlxllm.data import TokenData
from mlxllm.device import peak_flops
from mlxllm.errors import MlxllmError
from mlxllm.memory import check_fits, configure_cache, describe as describe_memory, estimate_memory, set_wired_limit
from mlxllm.model import Transformer, build_model
from mlxllm.pretrained import Pretrained
from mlxllm.progress import Reporter
from mlxllm.step import evaluate, lr_at, make_eval, make_optimizer, make_step


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


@dataclass
class _Run:
    """One training run while it trains: what it was given, what it built, and how far it is."""

    run: RunConfig
    run_dir: Path
    data: TokenData
    seq_len: int
    model: Transformer
    optimizer: optim.Optimizer
    step: int = 0
    tokens: int = 0
    elapsed_before: float = 0.0  # training time of the runs this one resumes
    best_val: float | None = None
    last_good: Path | None = None
    start: float = field(default_factory=time.perf_counter)
    lock: IO[str] | None = None  # the run directory's, held while training

    @property
    def cfg(self) -> TrainConfig:
        return self.run.train

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.seq_len * self.cfg.grad_accum

    @property
    def total_steps(self) -> int:
        if self.cfg.max_tokens is None:
            return self.cfg.max_steps
        return min(self.cfg.max_steps, math.ceil(self.cfg.max_tokens / self.tokens_per_step))

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def progress(self) -> float:
        p = self.step / self.total_steps
        return max(p, self.elapsed() / self.cfg.max_seconds) if self.cfg.max_seconds else p

    def batch(self) -> mx.array:
        """The batch of the next step: a pure function of (seed, step)."""
        c = self.cfg
        return mx.array(data_mod.train_batch(self.data, c.seed, self.step, c.batch_size, self.seq_len, c.grad_accum))

    def restore(self, latest: Path) -> None:
        state = ckpt.read_state(latest)
        self.model.load_weights(str(latest / "model.safetensors"))
        self.optimizer.state = tree_unflatten(list(mx.load(str(latest / "optimizer.safetensors")).items()))
        self.step, self.tokens, self.elapsed_before = state["step"], state["tokens"], state["elapsed"]
        self.best_val, self.last_good = state.get("best_val_loss"), latest
        mx.eval(self.model.parameters(), self.optimizer.state)

    def save(self, val: dict[str, float]) -> None:
        if val and (self.best_val is None or val["val_loss"] < self.best_val):
            self.best_val = val["val_loss"]
        state = {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed(), "seed": self.cfg.seed,
                 "data": self.data.directory.name, "val_loss": val.get("val_loss"), "val_bpb": val.get("val_bpb"),
                 "best_val_loss": self.best_val}
        extra_files = [self.run_dir / "config.toml", *sorted(self.run_dir.glob("tokenizer*"))]
        weights, opt_state = dict(tree_flatten(self.model.parameters())), dict(tree_flatten(self.optimizer.state))
        self.last_good = ckpt.save_checkpoint(self.run_dir, self.step, weights, opt_state, state, extra_files)
        ckpt.prune(self.run_dir, self.cfg.keep_last)


def _pretrained(run: RunConfig, latest: Path | None) -> Pretrained | None:
    """The model a run starts from (train.init_from); when resuming, as its own checkpoint holds it."""
    if not run.train.init_from:
        if run.tokenizer.kind == "hf":
            raise MlxllmError("tokenizer.kind = hf means a pretrained model's own tokenizer: set train.init_from "
                              "(--init-from PATH) to that model, or choose tokenizer.kind = bpe or byte.")
        return None
    source = pretrained.find(latest or run.train.init_from)
    if source.quantization:
        raise MlxllmError(f"{source.source} is quantized, and a quantized model cannot be trained further. "
                          "Start from the unquantized model (export it without --quantize).")
    return source


def _with_source(run: RunConfig, latest: Path | None) -> tuple[RunConfig, Pretrained | None]:
    """The run with its starting model's shape and tokenizer (train.init_from), checked."""
    source = _pretrained(run, latest)
    if source is not None:  # its shape and tokenizer; the device's attention as configured here
        run = replace(run, model=replace(source.config, attention=run.model.attention), tokenizer=source.tokenizer_config)
    seq_len = run.train.seq_len or run.model.max_seq_len
    if seq_len > run.model.max_seq_len:
        raise MlxllmError(f"train.seq_len ({seq_len}) exceeds model.max_seq_len ({run.model.max_seq_len}); raise max_seq_len or shorten seq_len.")
    return run, source


def _build_run(run: RunConfig, source: Pretrained | None, latest: Path | None, data: TokenData | None,
               quiet: bool) -> _Run:
    """Tokenize the corpus and build the model (or restore it from the last checkpoint)."""
    cfg, run_dir = run.train, Path(run.train.out_dir)
    seq_len = cfg.seq_len or run.model.max_seq_len
    if data is None:
        data = data_mod.prepare(cfg.data, run.tokenizer, val_fraction=cfg.val_fraction, quiet=quiet,
                                tokenizer=source.tokenizer if source else None)
    data_mod.check_length(data, seq_len)
    if source is None:
        run = replace(run, model=replace(run.model, vocab_size=data.tokenizer.vocab_size))
    check_fits(_memory(run, seq_len), cfg.batch_size, seq_len)  # refuses, with a suggestion, what cannot fit
    set_wired_limit()  # Apple silicon: keep the working set wired, as mlx-lm does
    configure_cache()  # CPU: reuse freed activation buffers instead of page-faulting them back every step

    if latest is not None:
        rundir.check_resume(latest, run, data.directory.name)
    data.tokenizer.save(run_dir)
    (run_dir / "config.toml").write_text(dump_toml(run))

    mx.random.seed(cfg.seed)
    if source is not None and latest is None:
        model = pretrained.build(source, attention=run.model.attention)
    else:
        model = build_model(run.model, seed=cfg.seed)
    if cfg.lora_rank:
        lora.apply(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    r = _Run(run, run_dir, data, seq_len, model, optimizer)
    if latest is not None:
        r.restore(latest)
    rundir.keep_metrics_until(run_dir, r.step)  # rows logged after that checkpoint come again
    return r


def _open_run(run: RunConfig, resume: bool, overwrite: bool, data: TokenData | None, quiet: bool) -> _Run:
    """Lock the run directory, check the settings, and set the run up; nothing is written (or
    replaced) before the settings pass their checks."""
    run_dir, source = Path(run.train.out_dir), None
    if not resume:
        run, source = _with_source(run, None)
    lock = rundir.lock_run_dir(run_dir, resume, overwrite)
    try:
        latest = ckpt.latest_good(run_dir) if resume and not overwrite else None
        if resume:
            run, source = _with_source(run, latest)
        if overwrite:
            rundir.clear(run_dir)
        r = _build_run(run, source, latest, data, quiet)
    except BaseException:
        lock.close()
        raise
    r.lock = lock
    return r


def _memory(run: RunConfig, seq_len: int) -> dict[str, float]:
    t = run.train
    trainable = lora.trainable_params(run.model, t.lora_rank) if t.lora_rank else None
    return estimate_memory(run.model, t.batch_size, seq_len, t.dtype, t.grad_accum, trainable=trainable)


def _describe(r: _Run) -> str:
    m, resumed = r.run.model, r.last_good is not None
    return (
        f"Model: {m.n_layers} layers x {m.d_model}, {m.n_heads} heads ({m.kv_heads} KV), "
        f"{m.num_params() / 1e6:.2f}M parameters; vocab {m.vocab_size}; {len(r.data.train):,} training tokens; "
        f"{r.total_steps} steps of {r.tokens_per_step:,} tokens; " + describe_memory(_memory(r.run, r.seq_len))
        + (f"; resuming at step {r.step}" if resumed else "")
    )


@dataclass
class _Window:
    """The steps since the last log line: their losses, tokens and start time."""

    start: float
    tokens: int = 0
    losses: list[mx.array] = field(default_factory=list)


def _window_metrics(r: _Run, window: _Window, peak: float) -> dict[str, Any]:
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
        "step": r.step, "loss": train_loss, "lr": lr_at(r.cfg, r.step - 1, r.progress()), "tokens": r.tokens,
        "tokens_per_sec": tps, "mfu": r.run.model.flops_per_token(r.seq_len) * tps / peak,
        "peak_memory_gb": mx.get_peak_memory() / 1e9, "elapsed": r.elapsed(),
    }


@dataclass
class _Outcome:
    stopped_by: str = "max_steps"
    last_val: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    tokens_per_sec: float | None = None


def _loop(r: _Run, reporter: Reporter, callback: Callback | None, peak: float) -> _Outcome:
    """Step until a budget (or the callback) stops it; evaluate and checkpoint every eval_interval."""
    cfg, out = r.cfg, _Outcome()
    step_fn, eval_fn = make_step(r.model, r.optimizer, cfg), make_eval(r.model, cfg)
    val_batches = data_mod.eval_batches(r.data, cfg.batch_size, r.seq_len, cfg.eval_batches)
    r.start = time.perf_counter()
    window, batch = _Window(r.start), r.batch()
    while r.step < r.total_steps:
        if cfg.max_seconds is not None and r.elapsed() >= cfg.max_seconds:
            out.stopped_by = "max_seconds"
            break
        r.optimizer.learning_rate = lr_at(cfg, r.step, r.progress())
        loss, _ = step_fn(batch)
        mx.async_eval(loss, r.model.parameters(), r.optimizer.state)
        r.step, r.tokens = r.step + 1, r.tokens + r.tokens_per_step
        window.losses.append(loss)
        window.tokens += r.tokens_per_step
        batch = r.batch()  # gathered on the host while the step runs

        at_eval = r.step % cfg.eval_interval == 0 or r.step >= r.total_steps
        if r.step % cfg.log_interval == 0 or at_eval:
            metrics = _window_metrics(r, window, peak)
            out.tokens_per_sec, window = metrics["tokens_per_sec"], _Window(time.perf_counter())
            if at_eval:
                out.last_val = evaluate(eval_fn, val_batches, r.data.bytes_per_token)
                metrics.update(out.last_val)
                out.history.append(metrics)
                r.save(out.last_val)
                window = _Window(time.perf_counter())  # evaluation and saving are not training time
            reporter.log(metrics)
            ckpt.crash_point("step", r.step)
            if at_eval and callback is not None and callback(metrics):
                out.stopped_by = "callback"
                break
        if cfg.max_tokens is not None and r.tokens >= cfg.max_tokens:
            out.stopped_by = "max_tokens"
            break
    if r.step and (not out.history or out.history[-1]["step"] != r.step):
        out.last_val = evaluate(eval_fn, val_batches, r.data.bytes_per_token)
        r.save(out.last_val)
        reporter.log({"step": r.step, "elapsed": r.elapsed(), **out.last_val})
    return out


def _summary(result: TrainResult) -> dict[str, str]:
    return {
        "run directory": str(result.run_dir), "steps": str(result.step), "tokens": f"{result.tokens:,}",
        "time": f"{result.elapsed:.1f} s", "stopped by": result.stopped_by,
        "validation loss": f"{result.val_loss:.4f}" if result.val_loss is not None else "-",
        "validation bits/byte": f"{result.val_bpb:.3f}" if result.val_bpb is not None else "-",
        "tokens/s (last window)": f"{result.tokens_per_sec:,.0f}" if result.tokens_per_sec else "-",
    }


def train(
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    tokenizer_config: TokenizerConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callback | None = None,
    show_progress: bool = True,
    data: TokenData | None = None,
) -> TrainResult:
    """Train a model from text, as `mlxllm train` does. Returns where it went and how it ended.

    `data`: token data already prepared (`data.prepare`) for this corpus and tokenizer, so that many
    runs on one corpus (a search) tokenize and hash it once."""
    run = RunConfig(
        model=model_config or ModelConfig(), train=train_config or TrainConfig(), tokenizer=tokenizer_config or TokenizerConfig()
    )
    if blas.warning():  # said even when quiet: it can cost a run 20x its time
        print("Warning: " + blas.warning(), file=sys.stderr)
    r = _open_run(run, resume, overwrite, data, quiet=not show_progress)
    try:
        peak, _ = peak_flops(r.cfg.dtype)  # measured (once per machine) with the BLAS's own thread count
        reporter = Reporter(r.run_dir, r.total_steps, start_step=r.step, show=show_progress)
        reporter.message(_describe(r))
        try:
            with blas_threads_for(stream_count(r.cfg, r.run.model)):
                out = _loop(r, reporter, callback, peak)
        finally:
            reporter.close()
    finally:
        r.lock.close()
    result = TrainResult(
        run_dir=r.run_dir, step=r.step, tokens=r.tokens, elapsed=r.elapsed(), val_loss=out.last_val.get("val_loss"),
        val_bpb=out.last_val.get("val_bpb"), best_val_loss=r.best_val, tokens_per_sec=out.tokens_per_sec,
        stopped_by=out.stopped_by, history=out.history,
    )
    reporter.summary(_summary(result))
    return result
