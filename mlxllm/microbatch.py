"""train.micro_batch = "auto": the micro-batches a run trains in when its batch does not fit the memory.

The global batch (batch_size x grad_accum rows per optimizer step) stays what it is, and so do its
rows: data.train_batch draws a step's rows as one list and then splits it into micro-batches, so a
run split into more, smaller micro-batches is the same run to float rounding, and exactly the run
those batch_size and grad_accum settings give. The largest micro-batch that fits without gradient
checkpointing is taken first (it costs no compute); if none does, the largest that fits with it (a
third more compute); a run that fits neither way is refused. Validation then runs in batches of the
micro-batch, as many more of them as keep its windows.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import replace

from mlxllm.config import RunConfig
from mlxllm.device import backend
from mlxllm.distributed import Group
from mlxllm.errors import MlxllmError
from mlxllm.memory import HEADROOM, describe, device_memory, format_bytes

import mlx.core as mx
import numpy as np

# The memory estimate of a run on this machine (runstate.memory, for the run's seq_len and group).
Estimate = Callable[[RunConfig], dict[str, float]]


def candidates(run: RunConfig, processes: int) -> list[RunConfig]:
    """The ways to train the run's global batch, in the order they are preferred: the run as given,
    then smaller micro-batches without, then any micro-batch with gradient checkpointing. Each
    micro-batch divides the global batch and splits evenly over the processes (and train.cpu_streams)."""
    t = run.train
    rows = t.batch_size * t.grad_accum
    streams = t.cpu_streams or 1
    sizes = [
        b
        for b in range(t.batch_size, 0, -1)
        if rows % b == 0 and b % processes == 0 and b % streams == 0 and (b // processes) % streams == 0
    ]
    out = [run]
    for checkpointed in (False, True) if not t.grad_checkpoint else (True,):
        for b in sizes:
            if b == t.batch_size and checkpointed == t.grad_checkpoint:
                continue  # the run as given, first
            cfg = replace(
                t,
                batch_size=b,
                grad_accum=rows // b,
                grad_checkpoint=checkpointed,
                eval_batches=t.eval_batches * math.ceil(t.batch_size / b),
            )
            out.append(replace(run, train=cfg))
    return out


def _agreed(index: int, group: Group) -> int:
    """The choice of the process with the least room (the latest in the order), on every process."""
    if group.size == 1:
        return index
    mine = mx.array([index], dtype=mx.int32)
    return int(np.asarray(mx.distributed.all_gather(mine, group=group.handle)).max())


def describe_choice(given: RunConfig, chosen: RunConfig, estimate: Estimate, available: float, where: str) -> str:
    """The one line that says how a run that did not fit is trained instead."""
    a, b = given.train, chosen.train
    how = []
    if b.batch_size != a.batch_size:
        how.append(f"as {b.grad_accum} micro-batches of {b.batch_size} rows (train.grad_accum = {b.grad_accum})")
    if b.grad_checkpoint and not a.grad_checkpoint:
        how.append("with gradient checkpointing (train.grad_checkpoint: each block recomputed in the backward)")
    return (
        f"Memory: micro-batches of {a.batch_size} rows need about {format_bytes(estimate(given)['total'])}, more "
        f"than the {HEADROOM:.0%} of {format_bytes(available)} ({where}) a run may use; training the same global "
        f"batch of {a.batch_size * a.grad_accum} rows " + " and ".join(how) + f", about "
        f"{format_bytes(estimate(chosen)['total'])}."
    )


def fit(run: RunConfig, estimate: Estimate, group: Group) -> RunConfig:
    """The run as it is trained with train.micro_batch = auto: as given when it fits (or when the
    device's memory is unknown), else the first of `candidates` that fits, said in one line (rank 0);
    refused in one paragraph when none fits. In a group, every process takes the choice of the one
    with the least room."""
    available, where = device_memory()
    options = candidates(run, group.size)
    index = 0
    if available is not None:
        fits = [i for i, o in enumerate(options) if estimate(o)["total"] <= HEADROOM * available]
        index = fits[0] if fits else len(options)
    index = _agreed(index, group)
    if index == len(options):
        smallest = estimate(options[-1])
        raise MlxllmError(
            f"This run does not fit in the {format_bytes(HEADROOM * (available or 0))} usable here ({where}) even "
            f"as micro-batches of {options[-1].train.batch_size} row(s) with gradient checkpointing: that needs "
            f"about {format_bytes(smallest['total'])} ({describe(smallest)}). Try a shorter train.seq_len, "
            + ("" if backend() == "cpu" else "train.dtype=bfloat16 ")
            + "or a smaller model (fewer layers or a smaller d_model)."
        )
    if index and group.primary:
        print(describe_choice(run, options[index], estimate, available or 0.0, where), file=sys.stderr, flush=True)
    return options[index]
