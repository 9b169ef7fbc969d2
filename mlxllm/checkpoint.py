"""Checkpoints: one directory per step, written under a temporary name, flushed to the disk, and
renamed into place, with a checksum of every file, so that neither a crash nor a power cut leaves a
checkpoint that looks complete but is not.

step_00000100/
  model.safetensors      weights (fp32 master copy)
  optimizer.safetensors  optimizer state (moments, step count, learning rate)
  state.json             step, tokens seen, elapsed time, data seed, validation loss, files' SHA-256
  config.toml            the resolved run config
  tokenizer*             the tokenizer the model was trained with
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from mlxllm import diskspace
from mlxllm.errors import MlxllmError

import mlx.core as mx

PREFIX = "step_"
DAMAGED = ".damaged-"  # a checkpoint that failed its checksums, set aside (not deleted) at resume


def crash_point(where: str, step: int) -> None:
    """Tests' hook: MLXLLM_CRASH_AT=where:step kills this process here with SIGKILL, at an exact point,
    as a power cut or the OOM killer would."""
    if os.environ.get("MLXLLM_CRASH_AT") == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def pause_point(where: str) -> None:
    """Tests' hook: MLXLLM_PAUSE_AT=where:seconds sleeps here, so that a test can act while a
    checkpoint is half written (send a second signal, say)."""
    at, _, seconds = os.environ.get("MLXLLM_PAUSE_AT", "").partition(":")
    if at == where:
        time.sleep(float(seconds))


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    d = checkpoint_dir(run_dir)
    try:  # a directory removed under the run lists as empty; the next save says it is gone
        names = os.listdir(d)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(d / n for n in names if n.startswith(PREFIX) and (d / n / "state.json").exists())


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "state.json").read_text())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def damaged_file(ckpt: Path) -> str | None:
    """The first file of the checkpoint that is missing or fails its recorded checksum, else None."""
    try:
        sums = read_state(ckpt).get("files", {})
    except (OSError, ValueError):
        return "state.json"
    for name, want in sums.items():
        if not (ckpt / name).is_file() or _sha256(ckpt / name) != want:
            return name
    return None


def check(ckpt: Path) -> None:
    """Refuse a damaged checkpoint, naming the file."""
    bad = damaged_file(ckpt)
    if bad is not None:
        raise MlxllmError(
            f"The checkpoint {ckpt} is damaged: {bad} is missing or does not match the checksum recorded when it "
            "was written (a crash or a disk problem). Use another checkpoint (--checkpoint latest, or one of "
            f"{ckpt.parent}), or resume the run, which falls back to the last good one."
        )


def best_checkpoint(run_dir: Path) -> Path | None:
    scored = [(read_state(p).get("val_loss"), p) for p in list_checkpoints(run_dir)]
    scored = [(v, p) for v, p in scored if v is not None]
    return min(scored, key=lambda vp: vp[0])[1] if scored else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1] if cks else None


def choose(path: Path, which: str = "best") -> Path:
    """The checkpoint directory path names: itself, or a run directory's best (or latest) one."""
    path = Path(path)
    if (path / "model.safetensors").exists() and (path / "state.json").exists():
        return path
    if not path.is_dir():
        raise MlxllmError(f"{path} is not a run directory. Pass the --out directory of a finished `mlxllm train`.")
    chosen = (best_checkpoint(path) if which == "best" else None) or latest_checkpoint(path)
    if chosen is None:
        raise MlxllmError(
            f"{path} holds no checkpoint yet. Train first (`mlxllm train --out {path}`), or check the path."
        )
    return chosen


def latest_good(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes its checksums; damaged newer ones are set aside, with a warning."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        bad = damaged_file(ckpt)
        if bad is None:
            return ckpt
        aside = ckpt.with_name(DAMAGED + ckpt.name)
        shutil.rmtree(aside, ignore_errors=True)
        ckpt.rename(aside)
        print(
            f"Warning: checkpoint {ckpt.name} is damaged ({bad} fails its checksum); it was moved to {aside.name} "
            "and training resumes from the one before.",
            file=sys.stderr,
        )
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, mx.array],
    optimizer_state: dict[str, mx.array],
    state: dict[str, Any],
    extra_files: list[Path],
) -> Path:
    """Write a checkpoint atomically; on failure nothing already on disk is touched. A write that
    fails (a full disk, a read-only or vanished directory, an I/O error) removes its partial files and
    raises the paragraph of diskspace.save_failed."""
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    old = root / f".old-{final.name}-{os.getpid()}"
    mx.eval(weights, optimizer_state)  # computed first: a failure below is the disk's, not the computation's
    try:
        root.mkdir(exist_ok=True)  # not the run directory: one that vanished is not made again elsewhere
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        crash_point("checkpoint", step)
        pause_point("checkpoint")
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), optimizer_state)
        for f in extra_files:
            shutil.copy2(f, tmp / f.name)
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            _fsync(tmp / name)
        state = {**state, "files": {name: _sha256(tmp / name) for name in names}}
        with open(tmp / "state.json", "w") as fh:  # written last: a checkpoint without it is ignored
            json.dump(state, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync(tmp)
        if final.exists():  # the same step saved again (a resumed run that stopped at once)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(root)  # the rename itself reaches the disk
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError, ValueError) as e:  # MLX reports a failed write as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            with contextlib.suppress(OSError):  # else put back at the next start (rundir._clear_leftovers)
                os.rename(old, final)
        size = sum(a.nbytes for a in (*weights.values(), *optimizer_state.values()))
        prev = latest_checkpoint(run_dir) if Path(run_dir).is_dir() else None
        left = tmp if tmp.exists() else None  # on a read-only disk it cannot be removed
        raise diskspace.save_failed(step, e, Path(run_dir), prev, size, left) from None
    return final


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints and the best one."""
    cks = list_checkpoints(run_dir)
    try:
        best = best_checkpoint(run_dir)
    except FileNotFoundError:  # removed under the run: nothing to prune, and the next save says so
        return
    for p in cks[: max(0, len(cks) - keep_last)]:
        if p != best:
            shutil.rmtree(p, ignore_errors=True)


def copy_checkpoint(source: Path, run_dir: Path, replaced: dict[str, bytes], note: dict[str, Any]) -> Path:
    """Copy a checkpoint into another run directory, atomically, as save_checkpoint writes one: its
    files, checked against the checksums recorded with it, except those named in `replaced` (name:
    new content), and its state with `note` added and every file's checksum recorded anew. The
    source is only read; a source that another process prunes while it is copied is refused."""
    check(source)
    state = read_state(source)
    final = checkpoint_dir(run_dir) / source.name
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in state["files"]:
            if name not in replaced:
                shutil.copy2(source / name, tmp / name)
        if any(_sha256(tmp / n) != want for n, want in state["files"].items() if n not in replaced):
            raise MlxllmError(f"The checkpoint {source} changed while it was copied. Copy it again.")
        for name, content in replaced.items():
            (tmp / name).write_bytes(content)
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            _fsync(tmp / name)
        state = {**state, **note, "files": {name: _sha256(tmp / name) for name in names}}
        with open(tmp / "state.json", "w") as fh:  # written last, as save_checkpoint does
            json.dump(state, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise MlxllmError(
                f"Could not copy the checkpoint {source} into {run_dir}: {e}. If the run it belongs to is still "
                "training, it may have pruned that checkpoint (raise its train.keep_last); else free some space."
            ) from None
        raise
    return final
