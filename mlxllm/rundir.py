"""A run directory and the rules that keep it whole: one trainer at a time (a lock that dies with its
process), an earlier run replaced only with overwrite (and never a directory of other files) and
continued only with resume (with the same corpus, tokenizer and shape), and after a crash the
leftovers of a half-written checkpoint cleared and the metrics rows past the checkpoint a run resumes
from dropped.

run_dir/
  .lock          held (flock) by the live trainer; it holds the trainer's pid
  config.toml    the resolved run config
  tokenizer*     the tokenizer
  metrics.jsonl  one row per logged step
  checkpoints/   see checkpoint.py
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import fields
from pathlib import Path
from typing import IO

from mlxllm import checkpoint as ckpt
from mlxllm.config import RunConfig, load_config
from mlxllm.errors import MlxllmError

LOCK = ".lock"


def _lock(run_dir: Path) -> IO[str]:
    """Hold run_dir's lock (released when the process ends, however it ends) or refuse."""
    handle = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "unknown"
        handle.close()
        raise MlxllmError(
            f"Another mlxllm process (pid {pid}) is training in {run_dir} right now. Wait for it to finish or stop "
            "it (its checkpoints are kept), or train into another --out."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _clear_leftovers(run_dir: Path) -> None:
    """What a process killed while saving a checkpoint left: its temporary directory, or (killed
    between the two renames of a checkpoint saved again) the earlier copy, which goes back."""
    root = ckpt.checkpoint_dir(run_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".old-"):
            final = root / p.name[len(".old-") :].rsplit("-", 1)[0]
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.rename(final)


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / n).exists() for n in ("config.toml", "checkpoints", "metrics.jsonl"))


def lock_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> IO[str]:
    """Make and lock run_dir, refusing an earlier run in it unless it is to be continued (resume) or
    replaced (overwrite, then `clear`). Returns the lock, held until it is closed."""
    if run_dir.exists() and not run_dir.is_dir():
        raise MlxllmError(f"{run_dir} is a file, not a directory. Choose another --out.")
    if holds_run(run_dir) and not (resume or overwrite):
        raise MlxllmError(
            f"{run_dir} already holds a training run. Pass --resume to continue it, --overwrite to replace it, "
            "or choose another directory with --out."
        )
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in (LOCK, ".DS_Store")) if run_dir.is_dir() else []
    if overwrite and others and not holds_run(run_dir):
        raise MlxllmError(
            f"{run_dir} is not empty and holds no training run ({', '.join(others[:3])}"
            + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            + "): --overwrite replaces only a run, so nothing was touched. Choose a new or empty --out."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(run_dir)
    _clear_leftovers(run_dir)
    return lock


def clear(run_dir: Path) -> None:
    """Remove the earlier run in a locked run_dir (train --overwrite); a directory that holds no run
    (the user's own files, which lock_run_dir refuses to overwrite) is left as it is."""
    if not holds_run(run_dir):
        return
    for p in run_dir.iterdir():
        if p.name != LOCK:  # the lock stays: another process must keep seeing it
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def keep_metrics_until(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl's rows past `step` (logged after the checkpoint a resumed run continues
    from, so logged again), and a torn last line."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept, lines = [], path.read_text().splitlines()
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def check_resume(checkpoint: Path, run: RunConfig, data_key: str) -> None:
    """Refuse to resume the checkpoint with another corpus, tokenizer or model shape than it was trained with."""
    run_dir = checkpoint.parent.parent
    saved = load_config(checkpoint / "config.toml")
    # The token cache key covers the corpus content and the tokenizer settings.
    if saved.tokenizer != run.tokenizer or ckpt.read_state(checkpoint).get("data") != data_key:
        raise MlxllmError(
            f"Cannot resume {run_dir}: its tokenizer or corpus differs from this one "
            f"(checkpoint: {saved.tokenizer}, data={saved.train.data!r}; "
            f"now: {run.tokenizer}, data={run.train.data!r}). Resume with the same --data (unchanged) and "
            "tokenizer settings, or start a new run with --out or --overwrite."
        )
    lora_then, lora_now = (saved.train.lora_rank, saved.train.lora_alpha), (run.train.lora_rank, run.train.lora_alpha)
    if lora_then != lora_now:  # the checkpoint's weights are named and shaped by its adapters
        raise MlxllmError(
            f"Cannot resume {run_dir}: it was trained with train.lora_rank = {lora_then[0]} and lora_alpha = "
            f"{lora_then[1]}, and this config has {lora_now[0]} and {lora_now[1]}. Resume with the run's own "
            "config (it is saved as config.toml in the run directory), or start a new run with --out or --overwrite."
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
