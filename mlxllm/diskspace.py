"""A run's disk: the space its checkpoints need, checked before training, and the paragraph a
checkpoint that could not be written (a full disk, a read-only or vanished directory, an I/O error)
ends the run with.

Up to keep_last + 2 checkpoints are on the disk at once: the newest keep_last, the best one (kept
even when older) and the one being written, before the oldest is pruned.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from mlxllm import lora
from mlxllm.config import RunConfig
from mlxllm.errors import MlxllmError
from mlxllm.memory import format_bytes

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]

FULL = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def checkpoint_bytes(run: RunConfig) -> int:
    """About the bytes of one checkpoint: the fp32 weights (with LoRA, the frozen model and its
    adapters), AdamW's two fp32 moments per trained parameter, and a margin for the config, the
    tokenizer and the files' headers."""
    n, t = run.model.num_params(), run.train
    trainable = lora.trainable_params(run.model, t.lora_rank) if t.lora_rank else None
    weights = 4 * (n + (trainable or 0))
    moments = 8 * (trainable if trainable is not None else n)
    return weights + moments + 64 * 1024 + 100 * run.model.vocab_size


def checkpoints_at_once(keep_last: int, start: int, max_steps: int, eval_interval: int) -> int:
    """How many checkpoints can be on the disk at once in a run from step `start` to at most
    `max_steps`: keep_last + 2 (see the module docstring), or fewer when the run writes fewer."""
    saves = max_steps // eval_interval - start // eval_interval + (max_steps % eval_interval != 0)
    return max(1, min(keep_last + 2, saves))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_space(run_dir: Path, run: RunConfig, start: int, kept: list[Path]) -> None:
    """Refuse, in one paragraph, a run whose checkpoints do not fit in the free space of run_dir's
    disk (with the space of its checkpoints already there, `kept`, which the run replaces)."""
    t, each = run.train, checkpoint_bytes(run)
    at_once = checkpoints_at_once(t.keep_last, start, t.max_steps, t.eval_interval)
    free = shutil.disk_usage(run_dir).free
    have = free + sum(_size(p) for p in kept)
    if at_once * each <= have:
        return
    fewer = ", ".join(
        f"keep_last = {k} needs {format_bytes(min(k + 2, at_once) * each)}" for k in (1, 2) if k < t.keep_last
    )
    raise MlxllmError(
        f"Not enough free space for this run's checkpoints in {run_dir}: each takes about {format_bytes(each)} "
        f"(fp32 weights and optimizer state), and up to {at_once} are on the disk at once (the newest "
        f"train.keep_last = {t.keep_last}, the best one and the one being written), so it needs about "
        f"{format_bytes(at_once * each)}, but {format_bytes(free)} is free"
        + (f" (and {format_bytes(have - free)} in its checkpoints already there)" if have > free else "")
        + ". Free some space, train into an --out on a larger disk, "
        + (f"lower train.keep_last ({fewer}), " if fewer else "")
        + "or train a smaller model (each checkpoint is 12 bytes per parameter). Nothing was trained."
    )


def _fsize_limit() -> int | None:
    """This process's file size limit (ulimit -f) in bytes, None when unlimited."""
    if resource is None:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY) or not os.access(path, os.W_OK)
    except OSError:
        return False


def _reason(error: BaseException, run_dir: Path, size: int) -> tuple[str, str]:
    """(what went wrong, what to do) for an OSError, or an MLX write error, which has no errno."""
    code = getattr(error, "errno", None)
    resume = "then rerun the same command with --resume: it continues from the last good checkpoint"
    if not run_dir.is_dir():
        return (
            f"the run directory {run_dir} is gone (deleted, or its disk unmounted)",
            "Bring it back and rerun the same command with --resume, or start again with another --out",
        )
    free = shutil.disk_usage(run_dir).free
    if code in FULL or (code is None and free < size):
        return (
            f"the disk is full ({format_bytes(free)} free; a checkpoint takes about {format_bytes(size)})",
            f"Free at least {format_bytes(size)} on that disk, or lower train.keep_last (fewer checkpoints kept), "
            + resume,
        )
    if code in READ_ONLY or (code is None and _read_only(run_dir)):
        return (
            f"{run_dir / 'checkpoints'} cannot be written ({os.strerror(code) if code else 'read-only'})",
            f"Make it writable again (a disk remounted read-only after errors needs checking first), {resume}",
        )
    limit = _fsize_limit()
    if code == errno.EFBIG or (code is None and limit is not None and limit < size):
        return (
            f"a file reached this process's file size limit ({format_bytes(limit) if limit else 'ulimit -f'})",
            f"Raise the limit (ulimit -f unlimited), {resume}",
        )
    if code == errno.EIO:
        return (
            "the disk reported an I/O error",
            "Check the disk (dmesg on Linux, Disk Utility on a Mac) before trusting it; --resume verifies each "
            "checkpoint's checksums and passes over a damaged one",
        )
    return f"the write failed ({error})", f"Fix what it says, {resume}"


def save_failed(
    step: int, error: BaseException, run_dir: Path, last_good: Path | None, size: int, left: Path | None = None
) -> MlxllmError:
    """The paragraph a run ends with when the checkpoint of `step` could not be written: `error`, what
    failed; `last_good`, the newest complete checkpoint; `size`, the checkpoint's bytes; `left`, its
    partial write when it could not be removed (None: removed)."""
    why, fix = _reason(error, Path(run_dir), size)
    partial = (
        f"its partial files ({left}) could not be removed; the next run removes them"
        if left is not None
        else "the partial checkpoint was removed"
    )
    if last_good is not None:
        kept = f"The last good checkpoint {last_good} is intact"
    elif not Path(run_dir).is_dir():
        kept = "Its earlier checkpoints went with it"
    else:
        kept = "No earlier checkpoint of this run was saved"
    return MlxllmError(
        f"Could not save the checkpoint of step {step}: {why}. Training stopped, and {partial}. {kept}. {fix}."
    )
