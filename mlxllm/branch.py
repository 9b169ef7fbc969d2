"""Cooldown branches of a warmup-stable-decay run: a new run directory that resumes one of the run's
checkpoints from its stable phase with the total length whose cooldown starts there, so that
training it (`mlxllm train --config BRANCH/config.toml --resume`) finishes the WSD run of that
length, the same run as one trained from scratch to it. One long run then measures the finished
loss at several shorter lengths (Hägele et al. 2024).

A branch equals the fresh run because nothing a step computes before the cooldown depends on the
run's length: the learning rate there is warmup and peak only (mlxllm.schedule), a batch is a pure
function of (seed, step), and evaluation and checkpoints only read the model.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from mlxllm import checkpoint as ckpt
from mlxllm import rundir, schedule
from mlxllm.config import RunConfig, TrainConfig, dump_toml, load_config
from mlxllm.errors import MlxllmError


def _stable_through(cfg: TrainConfig, state: dict) -> bool:
    """Whether every step before this checkpoint (its state) ran at a learning rate that does not
    depend on the run's length: in its warmup or stable phase."""
    step, f = state["step"], cfg.cooldown_fraction
    if cfg.max_tokens is None and cfg.max_seconds is None:
        return step <= schedule.stable_steps(cfg.max_steps, f)
    total = cfg.max_steps
    if cfg.max_tokens is not None:
        total = min(total, -(-cfg.max_tokens * step // state["tokens"]))  # the trainer's ceil(tokens / per step)
    progress = step / total
    if cfg.max_seconds is not None:
        progress = max(progress, state["elapsed"] / cfg.max_seconds)
    return progress <= 1 - f  # the progress when saved, past that of the steps before it


def _checkpoint_at(run_dir: Path, step: int) -> Path:
    found = {ckpt.read_state(p)["step"]: p for p in ckpt.list_checkpoints(run_dir)}
    if step not in found:
        have = ", ".join(map(str, sorted(found))) or "none"
        raise MlxllmError(
            f"{run_dir} has no checkpoint at step {step} (it has: {have}). Branch from one of those, or train the "
            "run with a train.eval_interval that divides the step and a train.keep_last that keeps it."
        )
    return found[step]


def branchable_steps(run_dir: Path) -> list[int]:
    """The steps of the run's checkpoints that a branch can start from: past the warmup, in the
    stable phase of a WSD run (none for a cosine run)."""
    steps = []
    for p in ckpt.list_checkpoints(Path(run_dir)):
        cfg, state = load_config(p / "config.toml").train, ckpt.read_state(p)
        if cfg.schedule == "wsd" and state["step"] >= cfg.warmup_steps and _stable_through(cfg, state):
            steps.append(state["step"])
    return steps


def _branch_config(checkpoint: Path, step: int, out_dir: Path) -> RunConfig:
    """The source checkpoint's config as a step budget whose stable phase ends at `step`; refused
    where that would not be a finished WSD run."""
    run = load_config(checkpoint / "config.toml")  # as it was when that checkpoint was saved
    cfg = run.train
    if cfg.schedule != "wsd":
        raise MlxllmError(
            f"{checkpoint} is from a run with schedule = {cfg.schedule!r}: only a wsd run's checkpoints can be "
            "branched (a cosine run's learning rate depends on its length from the first step). Train the "
            "source with --set train.schedule=wsd."
        )
    if step < cfg.warmup_steps:
        raise MlxllmError(
            f"Step {step} is inside the warmup (train.warmup_steps = {cfg.warmup_steps}): a run that short never "
            f"reaches its peak learning rate. Branch from a checkpoint at step {cfg.warmup_steps} or later."
        )
    if not _stable_through(cfg, ckpt.read_state(checkpoint)):
        raise MlxllmError(
            f"The checkpoint at step {step} of {checkpoint.parent.parent} is in its cooldown (the last "
            f"train.cooldown_fraction = {cfg.cooldown_fraction} of the run), not its stable phase. Branch from an "
            "earlier checkpoint."
        )
    total = schedule.length_for_stable(step, cfg.cooldown_fraction)
    return replace(run, train=replace(cfg, out_dir=str(out_dir), max_steps=total, max_tokens=None, max_seconds=None))


def branch(source: Path, step: int, out_dir: Path, overwrite: bool = False) -> RunConfig:
    """Make `out_dir` a run that resumes `source`'s checkpoint at `step` as the WSD run whose stable
    phase ends there: max_steps = schedule.length_for_stable(step, cooldown_fraction), the same
    cooldown fraction, every other setting the source's. Returns its config (train it with resume);
    the source is only read.

    `source`: a WSD run directory; `step`: one of its checkpoints' steps (see branchable_steps);
    `out_dir`: the new run directory; `overwrite`: replace a run already in `out_dir`."""
    source, out_dir = Path(source), Path(out_dir)
    if out_dir.resolve() == source.resolve():
        raise MlxllmError(f"A branch of {source} needs a run directory of its own: choose another one.")
    checkpoint = _checkpoint_at(source, step)
    run = _branch_config(checkpoint, step, out_dir)
    text = dump_toml(run)
    lock = rundir.lock_run_dir(out_dir, resume=False, overwrite=overwrite)
    try:
        if overwrite:
            rundir.clear(out_dir)
        for p in sorted(checkpoint.glob("tokenizer*")):
            shutil.copy2(p, out_dir / p.name)
        (out_dir / "config.toml").write_text(text)
        if (source / "metrics.jsonl").exists():  # the rows up to the checkpoint, as a resumed run keeps them
            shutil.copy2(source / "metrics.jsonl", out_dir / "metrics.jsonl")
            rundir.keep_metrics_until(out_dir, step)
        # Last: until the checkpoint is in place the branch holds nothing to resume.
        ckpt.copy_checkpoint(checkpoint, out_dir, {"config.toml": text.encode()}, {"branch_of": str(checkpoint)})
    finally:
        lock.close()
    return run
