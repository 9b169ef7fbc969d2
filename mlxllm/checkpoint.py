"""A run directory on disk: its checkpoints, one directory per step, written under a temporary name
and renamed into place, and the checks that guard it (overwriting, resuming with other settings).

step_00000100/
  model.safetensors      weights (fp32 master copy)
  optimizer.safetensors  optimizer state (moments, step count, learning rate)
  state.json             step, tokens seen, elapsed time, data seed, validation loss
  config.toml            the resolved run config
  tokenizer.*            the tokenizer the model was trained with
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from dataclasses import fields
from typing import Any

import mlx.core as mx

from mlxllm.config import RunConfig, load_config
from mlxllm.errors import MlxllmError

PREFIX = "step_"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").exists())


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "state.json").read_text())


def best_checkpoint(run_dir: Path) -> Path | None:
    scored = [(read_state(p).get("val_loss"), p) for p in list_checkpoints(run_dir)]
    scored = [(v, p) for v, p in scored if v is not None]
    return min(scored, key=lambda vp: vp[0])[1] if scored else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1] if cks else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, mx.array],
    optimizer_state: dict[str, mx.array],
    state: dict[str, Any],
    extra_files: list[Path],
) -> Path:
    """Write a checkpoint atomically; on failure nothing already on disk is touched."""
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), optimizer_state)
        for f in extra_files:
            shutil.copy2(f, tmp / f.name)
        with open(tmp / "state.json", "w") as fh:
            json.dump(state, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # the same step saved again (a resumed run that stopped at once)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "the disk is full" if e.errno == errno.ENOSPC else str(e)
        prev = latest_checkpoint(run_dir)
        kept = f"The previous checkpoint {prev} is intact" if prev else "No earlier checkpoint exists"
        raise MlxllmError(
            f"Could not save the checkpoint for step {step}: {why}. {kept}. "
            "Free some space (or lower train.keep_last) and rerun with --resume."
        ) from None
    return final


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints and the best one."""
    cks = list_checkpoints(run_dir)
    best = best_checkpoint(run_dir)
    for p in cks[: max(0, len(cks) - keep_last)]:
        if p != best:
            shutil.rmtree(p, ignore_errors=True)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Make run_dir; an earlier run in it is replaced only with overwrite, continued only with resume."""
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


def check_resume(ckpt: Path, run: RunConfig, data_key: str) -> None:
    """Refuse to resume the checkpoint with another corpus, tokenizer or model shape than it was trained with."""
    run_dir = ckpt.parent.parent
    saved = load_config(ckpt / "config.toml")
    # The token cache key covers the corpus content and the tokenizer settings.
    if saved.tokenizer != run.tokenizer or read_state(ckpt).get("data") != data_key:
        raise MlxllmError(
            f"Cannot resume {run_dir}: its tokenizer or corpus differs from this one "
            f"(checkpoint: {saved.tokenizer}, data={saved.train.data!r}; now: {run.tokenizer}, data={run.train.data!r}). "
            "Resume with the same --data (unchanged) and tokenizer settings, or start a new run with --out or --overwrite."
        )
    if saved.model != run.model:
        diff = [
            f"{f.name}: checkpoint {getattr(saved.model, f.name)!r}, now {getattr(run.model, f.name)!r}"
            for f in fields(saved.model)
            if getattr(saved.model, f.name) != getattr(run.model, f.name)
        ]
        raise MlxllmError(
            f"Cannot resume {run_dir}: the model shape does not match the checkpoint ({'; '.join(diff)}). "
            "Resume with the run's own config (it is saved as config.toml in the run directory), "
            "or start a new run with --out or --overwrite."
        )
