"""A training run's state while it trains (config, data, model, optimizer, counters), and setting it
up: checks first, then the run directory, the token data, the model, or the checkpoint it resumes.

In a data-parallel group every process holds the whole state; rank 0 alone touches the run
directory (lock, checkpoints, metrics), and the others take its model, optimizer and counters.

A QLoRA run (LoRA from an mlx-lm quantized folder) saves its frozen quantized base in each
checkpoint, packed as it trains, with its layout in state.json (quant.layout): a checkpoint stands
alone, so that resuming, generating or exporting never reads the init_from folder again."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from mlxllm import checkpoint as ckpt
from mlxllm import data as data_mod
from mlxllm import diskspace, kernels, lora, microbatch, pretrained, quant, rundir
from mlxllm.config import RunConfig, TrainConfig, dump_toml
from mlxllm.cpu.precision import compute_dtype, held_dtype
from mlxllm.data import TokenData
from mlxllm.device import backend, device_name
from mlxllm.distributed import Group
from mlxllm.errors import MlxllmError
from mlxllm.layout import Layout, layout
from mlxllm.memory import check_fits, configure_cache, estimate_memory, set_wired_limit
from mlxllm.model import Transformer, build_model
from mlxllm.pretrained import Pretrained
from mlxllm.step import make_optimizer

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten


@dataclass
class Run:
    """One training run while it trains: what it was given, what it built, and how far it is."""

    run: RunConfig
    run_dir: Path
    data: TokenData
    seq_len: int
    model: Transformer
    optimizer: optim.Optimizer
    group: Group = field(default_factory=Group)
    step: int = 0
    tokens: int = 0
    elapsed_before: float = 0.0  # training time of the runs this one resumes
    best_val: float | None = None
    evals_since_best: int = 0  # evaluations in a row without a lower validation loss (early stopping)
    last_eval_step: int = 0  # the step of the last evaluation counted there
    quantization: dict | None = None  # the frozen base's layout (quant.layout) in a QLoRA run
    last_good: Path | None = None
    start: float = field(default_factory=time.perf_counter)
    lock: IO[str] | None = None  # the run directory's, held while training (rank 0)

    @property
    def cfg(self) -> TrainConfig:
        return self.run.train

    @property
    def local_cfg(self) -> TrainConfig:
        """The settings of this process's share: batch_size is its rows of the global batch."""
        return replace(self.cfg, batch_size=self.cfg.batch_size // self.group.size)

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
        """This process's rows of the next step's global batch, a pure function of (seed, step)."""
        c = self.cfg
        rows = data_mod.train_batch(self.data, c.seed, self.step, c.batch_size, self.seq_len, c.grad_accum)
        return mx.array(self.group.rows(rows, axis=1))

    def restore(self, latest: Path) -> None:
        state = ckpt.read_state(latest)
        self.model.load_weights(str(latest / "model.safetensors"))
        self.optimizer.state = tree_unflatten(list(mx.load(str(latest / "optimizer.safetensors")).items()))
        self.step, self.tokens, self.elapsed_before = state["step"], state["tokens"], state["elapsed"]
        self.best_val, self.last_good = state.get("best_val_loss"), latest
        self.evals_since_best = state.get("evals_since_best", 0)
        mx.eval(self.model.parameters(), self.optimizer.state)

    def share(self) -> None:
        """Every process continues from rank 0's model, optimizer and counters: its checkpoint (which
        the others need not be able to read) or its freshly built model."""
        g = self.group
        if g.size == 1:
            return
        self.model.update(g.broadcast(self.model.parameters()))
        self.optimizer.state = g.broadcast(self.optimizer.state)
        counts = g.broadcast(mx.array([self.step, self.tokens, self.evals_since_best], dtype=mx.int64)).tolist()
        best = math.nan if self.best_val is None else self.best_val
        elapsed, best = g.broadcast(mx.array([self.elapsed_before, best], dtype=mx.float32)).tolist()
        self.step, self.tokens, self.evals_since_best, self.elapsed_before = *map(int, counts), elapsed
        self.best_val = None if math.isnan(best) else best

    def save(self, val: dict[str, float]) -> None:
        # A step evaluated again (a finished run resumed) is not one more evaluation without improvement.
        if val and self.step != self.last_eval_step:
            self.last_eval_step = self.step
            if self.best_val is None or val["val_loss"] < self.best_val:
                self.best_val, self.evals_since_best = val["val_loss"], 0
            else:
                self.evals_since_best += 1
        if not self.group.primary:
            return
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed(),
            "seed": self.cfg.seed,
            "data": self.data.directory.name,
            "val_loss": val.get("val_loss"),
            "val_bpb": val.get("val_bpb"),
            "best_val_loss": self.best_val,
            "evals_since_best": self.evals_since_best,
            "quantization": self.quantization,
        }
        extra_files = [self.run_dir / "config.toml", *sorted(self.run_dir.glob("tokenizer*"))]
        weights, opt_state = dict(tree_flatten(self.model.parameters())), dict(tree_flatten(self.optimizer.state))
        self.last_good = ckpt.save_checkpoint(self.run_dir, self.step, weights, opt_state, state, extra_files)
        ckpt.prune(self.run_dir, self.cfg.keep_last)

    def early_stop(self) -> str | None:
        """Why the run stops here, when train.early_stop_patience evaluations in a row have not lowered
        the best validation loss (the line that says so); else None."""
        patience = self.cfg.early_stop_patience
        if not patience or self.evals_since_best < patience:
            return None
        best = ckpt.best_checkpoint(self.run_dir) if self.group.primary else None
        return (
            f"Stopped early at step {self.step}: the validation loss has not improved on {self.best_val:.4f} for "
            f"{self.evals_since_best} evaluations (train.early_stop_patience = {patience}); the best checkpoint"
            + (f", {best.name}," if best else "")
            + " is kept, and generate and export use it."
        )


def memory(
    run: RunConfig,
    seq_len: int,
    group: Group = Group(),
    where: Layout | None = None,
    quantization: dict | None = None,
) -> dict[str, float]:
    """The estimate for this process's device: each process that shares it (the layout's `sharing`: this
    machine's processes on a Mac or the CPU, one under NCCL on CUDA) holds the model, optimizer state and
    the activations of its rows. where: the group's layout (default: as `group` runs on this device).
    quantization: the frozen base's (a QLoRA run), counted at its size."""
    t = run.train
    trainable = lora.trainable_params(run.model, t.lora_rank) if t.lora_rank else None
    est = estimate_memory(
        run.model,
        t.batch_size // group.size,
        seq_len,
        held_dtype(t.dtype, backend()),
        t.grad_accum,
        trainable,
        quantization,
        t.grad_checkpoint,
    )
    sharing = (where or layout(group, backend())).sharing
    return {k: v * sharing for k, v in est.items()}


def _pretrained(run: RunConfig, latest: Path | None) -> Pretrained | None:
    """The model a run starts from (train.init_from); when resuming, as its own checkpoint holds it."""
    if not run.train.init_from:
        if run.tokenizer.kind == "hf":
            raise MlxllmError(
                "tokenizer.kind = hf means a pretrained model's own tokenizer: set train.init_from "
                "(--init-from PATH) to that model, or choose tokenizer.kind = bpe or byte."
            )
        return None
    source = pretrained.find(latest or run.train.init_from)
    if source.quantization and not run.train.lora_rank:
        raise MlxllmError(
            f"{source.source} is quantized ({quant.describe(source.quantization)}), and quantized weights cannot "
            "be trained themselves: only LoRA adapters over them can (QLoRA). Set train.lora_rank (for example "
            "--set train.lora_rank=8), or start from an unquantized copy of the model (`mlx_lm.convert "
            "--dequantize`, or the run it was exported from). Nothing was written."
        )
    return source


def _with_source(run: RunConfig, latest: Path | None) -> tuple[RunConfig, Pretrained | None]:
    """The run with its starting model's shape and tokenizer (train.init_from), checked."""
    source = _pretrained(run, latest)
    if source is not None:  # its shape and tokenizer; the device's attention as configured here
        run = replace(
            run, model=replace(source.config, attention=run.model.attention), tokenizer=source.tokenizer_config
        )
    seq_len = run.train.seq_len or run.model.max_seq_len
    if seq_len > run.model.max_seq_len:
        raise MlxllmError(
            f"train.seq_len ({seq_len}) exceeds model.max_seq_len ({run.model.max_seq_len}); "
            "raise max_seq_len or shorten seq_len."
        )
    return run, source


def _attention(run: RunConfig, device: str | None = None) -> str:
    """The attention the model trains with: model.attention for this device (device: its device_name(), by
    default this one's), dtype and head dim, checked (kernels.choose): 'auto' whose recorded choice cannot
    run here says so and uses 'fast'; an explicit 'flash' that cannot is refused before anything is written."""
    m = run.model
    shape = kernels.Shape(device or device_name(), run.train.dtype, m.head_dim, training=True)
    return kernels.choose(m.attention, shape, groups=m.n_heads // m.kv_heads)


def _check_split(cfg: TrainConfig, g: Group) -> None:
    if cfg.batch_size % g.size:
        fits = [
            n
            for n in (cfg.batch_size - cfg.batch_size % g.size, cfg.batch_size + g.size - cfg.batch_size % g.size)
            if n
        ]
        raise MlxllmError(
            f"train.batch_size ({cfg.batch_size}) is the global batch and must split evenly over the {g.size} "
            f"processes of the group: use a multiple of {g.size} (e.g. {' or '.join(map(str, fits))}), or start "
            "a number of processes that divides it. Nothing was written."
        )


def _prepare_data(run: RunConfig, source: Pretrained | None, quiet: bool) -> TokenData:
    cfg = run.train
    return data_mod.prepare(
        cfg.data,
        run.tokenizer,
        val_fraction=cfg.val_fraction,
        quiet=quiet,
        tokenizer=source.tokenizer if source else None,
        val_spec=cfg.val_data,
        mask_prompt=cfg.mask_prompt,
    )


def _claim(run_dir: Path, resume: bool, overwrite: bool) -> tuple[IO[str], Path | None]:
    """The run directory's lock, and the checkpoint the run resumes (None: a new run)."""
    lock = rundir.lock_run_dir(run_dir, resume, overwrite)
    try:
        latest = ckpt.latest_good(run_dir) if resume and not overwrite else None
        if resume and not overwrite and latest is None:  # said even when quiet: the user asked for a resume
            print(f"Note: --resume: {run_dir} holds no checkpoint to resume; starting a new run.", file=sys.stderr)
        return lock, latest
    except BaseException:
        lock.close()
        raise


def _write_settings(run_dir: Path, run: RunConfig, latest: Path | None, data: TokenData) -> None:
    """The run's tokenizer and config.toml, once the checkpoint it resumes (if any) is shown to match."""
    if latest is not None:
        rundir.check_resume(latest, run, data.directory.name)
    (run_dir / "config.toml").write_text(dump_toml(run))  # first: from here on the directory holds a run
    data.tokenizer.save(run_dir)


def _quantization(source: Pretrained | None, latest: Path | None) -> dict | None:
    """How the run's frozen base is quantized (QLoRA): as the checkpoint it resumes records it, or as
    the model it starts from was saved; None when it is not."""
    if latest is not None:
        return ckpt.read_state(latest).get("quantization")
    return source.quantization if source is not None else None


def _model(
    run: RunConfig, source: Pretrained | None, latest: Path | None, quantization: dict | None, attention: str
) -> tuple[Transformer, optim.Optimizer, dict | None]:
    """The starting model (the pretrained one, or a fresh one from train.seed; a resumed run's weights
    come from its checkpoint after) with the attention implementation chosen for it, its LoRA adapters
    (train.lora_rank), its optimizer, and the layout of its quantized base (quantization: _quantization's)."""
    cfg = run.train
    mx.random.seed(cfg.seed)
    if source is not None and latest is None:
        model = pretrained.build(source, attention=attention)
    elif quantization:  # a resumed QLoRA run: placeholders, never evaluated, that its checkpoint replaces
        model = Transformer(replace(run.model, attention=attention))
    else:
        model = build_model(replace(run.model, attention=attention), seed=cfg.seed)
    if cfg.lora_rank:
        lora.apply(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
    if quantization and latest is not None:
        quant.apply(model, quantization)  # its layers packed as the checkpoint holds them
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    return model, optimizer, quant.layout(model, quantization) if quantization else None


def _build(
    run: RunConfig,
    source: Pretrained | None,
    latest: Path | None,
    data: TokenData | None,
    quiet: bool,
    g: Group,
    attention: str,
) -> Run:
    """The run from its checked settings (attention: the implementation chosen for its model): data,
    memory check, MLX settings, model, restore."""
    cfg, run_dir = run.train, Path(run.train.out_dir)
    seq_len = cfg.seq_len or run.model.max_seq_len
    if data is None:
        with g.in_turn("tokenizing the corpus"):  # once per machine, into its cache
            data = _prepare_data(run, source, quiet or not g.primary)
        g.check_same(data.directory.name, "tokenized data (corpus and tokenizer)")
    quantization = _quantization(source, latest)
    with g.together("checking the memory"):
        data_mod.check_length(data, seq_len)
        data_mod.eval_batches(data, cfg.batch_size, seq_len, cfg.eval_batches)  # refuses windows with no target
        if source is None:
            run = replace(run, model=replace(run.model, vocab_size=data.tokenizer.vocab_size))
    with g.together("fitting the batch in the memory"):
        if cfg.micro_batch == "auto":  # the largest micro-batches that fit, said in one line
            run = microbatch.fit(run, lambda r: memory(r, seq_len, g, quantization=quantization), g)
        fits = memory(run, seq_len, g, quantization=quantization)
        check_fits(fits, run.train.batch_size // g.size, seq_len)  # refuses, with a suggestion
    with g.together("checking the disk space"):
        if g.primary:
            start = ckpt.read_state(latest)["step"] if latest is not None else 0
            diskspace.check_space(run_dir, run, start, ckpt.list_checkpoints(run_dir))
    set_wired_limit()  # Apple silicon: keep the working set wired, as mlx-lm does
    configure_cache()  # CPU: reuse freed activation buffers instead of page-faulting them back every step
    with g.together("checking the run directory"):
        if g.primary:
            _write_settings(run_dir, run, latest, data)
    with g.together("building the model"):
        model, optimizer, qlayout = _model(run, source, latest, quantization, attention)
        r = Run(run, run_dir, data, seq_len, model, optimizer, group=g, quantization=qlayout)
        if latest is not None:  # rank 0; the others take its state next
            r.restore(latest)
    r.share()
    r.last_eval_step = r.step  # a checkpoint's step was evaluated before it was saved
    if g.primary:
        rundir.keep_metrics_until(run_dir, r.step)  # rows logged after that checkpoint come again
    return r


def open_run(
    run: RunConfig, resume: bool, overwrite: bool, data: TokenData | None, quiet: bool, g: Group = Group()
) -> Run:
    """Set a run up, in order: the settings, the model it starts from and the attention implementation
    that model runs (`_attention`), the run directory's lock,
    then (_build) the data, the memory check, the process-wide MLX settings, the model with its
    LoRA adapters, and the checkpoint it resumes. Nothing is written (or replaced) before the settings
    pass their checks.

    Every process of a group calls it; the group agrees on each step that can fail (`g.together`)
    before the next, so that a failure on one rank stops them all. Rank 0 alone touches the run
    directory; the others take its model, optimizer and counters (Run.share)."""
    run_dir, source, lock, latest = Path(run.train.out_dir), None, None, None
    _check_split(run.train, g)
    dtype, why = compute_dtype(run.train.dtype, backend())
    if why and g.primary:
        print(why, file=sys.stderr, flush=True)
    run = replace(run, train=replace(run.train, dtype=dtype))
    try:
        if not resume:  # a new run: checked before its directory is made
            with g.together("checking the settings"):
                run, source = _with_source(run, None)
                attention = _attention(run)
        with g.together("opening the run directory"):
            if g.primary:
                lock, latest = _claim(run_dir, resume, overwrite)
        if resume:  # rank 0 from its checkpoint; the others from the settings, then rank 0's state
            with g.together("checking the settings"):
                run, source = _with_source(run, latest)
                attention = _attention(run)
        if overwrite and g.primary:
            rundir.clear(run_dir)
        r = _build(run, source, latest, data, quiet, g, attention)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    r.lock = lock
    return r
