"""Checkpoints: one directory per step, written under a temporary name and renamed into place.

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
from typing import Any

import mlx.core as mx

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
