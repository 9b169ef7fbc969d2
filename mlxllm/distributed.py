"""Data-parallel training over `mx.distributed`: which process of the group this one is, its rows
of each global batch, and the few collectives the trainer needs, each failing with a clear error
instead of hanging when another process is gone.

Started plainly, a process is a group of one and nothing here communicates. Started under
`mlx.launch` (ring, JACCL, MPI or NCCL, as MLX chooses), every process trains the same model on
its slice of the same global batch and the gradients are averaged inside the compiled step.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mlxllm.errors import MlxllmError

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

# Set by mlx.launch (or by hand) for each backend; without any of them a process trains alone.
_LAUNCH_ENV = {
    "MLX_HOSTFILE": "ring",
    "MLX_JACCL_COORDINATOR": "jaccl",
    "MLX_IBV_DEVICES": "jaccl",
    "OMPI_COMM_WORLD_SIZE": "mpi",
    "PMI_SIZE": "mpi",
    "MLX_WORLD_SIZE": "nccl",
}
# No step for this long (seconds) means a peer stalled without closing its connection.
STALL_ENV, STALL_DEFAULT = "MLXLLM_STALL_TIMEOUT", 600.0


def _launched_backend() -> str | None:
    for var, name in _LAUNCH_ENV.items():
        if os.environ.get(var):
            return name
    return None


@dataclass(frozen=True)
class Group:
    """This process's place in the training group; a group of one when not launched."""

    rank: int = 0
    size: int = 1
    backend: str = "none"
    local_rank: int = 0  # among the group's processes on this machine
    local_size: int = 1
    handle: Any = None  # mx.distributed.Group

    @property
    def primary(self) -> bool:
        """The process that writes: checkpoints, metrics and the progress display."""
        return self.rank == 0

    @property
    def machines(self) -> int:
        return max(1, self.size // self.local_size)

    def describe(self) -> str:
        if self.size == 1:
            return "one process"
        return (
            f"{self.size} processes ({self.backend}) on {self.machines} machine(s); this is rank {self.rank}, "
            f"{self.local_size} on this machine"
        )

    # Collectives. Each is a no-op in a group of one.

    def sum(self, x: mx.array) -> mx.array:
        return x if self.size == 1 else mx.distributed.all_sum(x, group=self.handle)

    def mean(self, x: mx.array) -> mx.array:
        return x if self.size == 1 else self.sum(x) / self.size

    def broadcast(self, tree: Any) -> Any:
        """Rank 0's arrays on every rank (a sum to which the others add zeros)."""
        if self.size == 1:
            return tree
        out = tree_map(lambda a: self.sum(a if self.primary else mx.zeros_like(a)), tree)
        mx.eval(out)
        return out

    def decide(self, flag: bool) -> bool:
        """Rank 0's decision, on every rank: where the ranks must agree (a clock, a callback)."""
        if self.size == 1:
            return flag
        return bool(self.broadcast(mx.array(int(flag))).item())

    def rows(self, batch: np.ndarray, axis: int = 0) -> np.ndarray:
        """This rank's equal share of a global batch (along `axis`): rows rank*k .. (rank+1)*k. A
        batch that does not split evenly (a short last validation batch) is taken whole by every rank:
        the mean of equal means is still its mean."""
        if self.size == 1 or batch.shape[axis] % self.size:
            return batch
        k = batch.shape[axis] // self.size
        return np.take(batch, np.arange(self.rank * k, (self.rank + 1) * k), axis=axis)

    @contextmanager
    def together(self, what: str) -> Iterator[None]:
        """Within: work this rank does (or none), then the whole group waits for it. If it failed on
        any rank, every rank stops: the failed one with its own error, the others saying which rank
        failed, instead of waiting forever for it."""
        try:
            yield
        except BaseException as e:  # reported to the group first, then raised
            self._agree(e, what)
            raise
        self._agree(None, what)

    def _agree(self, failure: BaseException | None, what: str) -> None:
        """Tell the group whether this rank failed; raise if another one did."""
        if self.size == 1:
            return
        failed = np.asarray(self.sum(mx.array(np.eye(self.size, dtype=np.int32)[self.rank] * (failure is not None))))
        if failure is None and failed.any():
            ranks = ", ".join(str(i) for i in np.flatnonzero(failed))
            raise MlxllmError(
                f"Rank {ranks} of the training group failed while {what} (its message is above); "
                "this rank stops too. Fix what it says and start the whole group again."
            )

    @contextmanager
    def in_turn(self, what: str) -> Iterator[None]:
        """Within: work on every rank, first by one process per machine, then by the others, which
        then find what it made in the machine's cache (token files, a measurement) instead of making
        it twice at the same path. Failures stop every rank, as `together`."""
        if self.local_rank != 0:
            with self.together(what):  # the first process of each machine works
                pass
        with self.together(what):
            yield
        if self.local_rank == 0:
            with self.together(what):  # the others work
                pass

    def check_same(self, value: str, what: str) -> None:
        """Stop every rank unless all hold the same `value` (e.g. the tokenized data's fingerprint)."""
        if self.size == 1:
            return
        mine = zlib.crc32(value.encode()) & 0x7FFFFFFF
        ours = np.asarray(mx.distributed.all_gather(mx.array([mine], dtype=mx.int32), group=self.handle))
        if (ours != ours[0]).any():
            raise MlxllmError(
                f"The processes of the training group do not have the same {what} (rank 0: {value!r}). "
                "Every machine needs the same corpus, config and mlxllm version at the same paths."
            )

    @contextmanager
    def watch(self, timeout: float | None = None) -> Iterator[Callable[[], None]]:
        """Within: a stalled peer (no step for `timeout` seconds) ends this process with a message,
        where a peer that stopped answering without closing its connection would block it forever.
        Yields the function to call after each step."""
        if self.size == 1:
            yield lambda: None
            return
        limit = float(os.environ.get(STALL_ENV, timeout or STALL_DEFAULT))
        last, done = [time.monotonic()], threading.Event()

        def beat() -> None:
            last[0] = time.monotonic()

        def watchdog() -> None:
            while not done.wait(min(5.0, limit / 4)):
                if time.monotonic() - last[0] > limit:
                    print(
                        f"Error: rank {self.rank} made no progress for {limit:.0f} s: another process of the "
                        f"training group stalled or its machine went away. Stopping; resume the run with "
                        f"--resume once every machine is back ({STALL_ENV} sets this limit).",
                        file=sys.stderr,
                        flush=True,
                    )
                    os._exit(1)

        thread = threading.Thread(target=watchdog, daemon=True)
        thread.start()
        try:
            yield beat
        finally:
            done.set()

    def is_lost(self, error: BaseException) -> bool:
        """Whether a RuntimeError from MLX is a collective's: a peer gone, not (say) memory running out."""
        text = str(error).lower()
        return self.size > 1 and any(w in text for w in ("[ring]", "[jaccl]", "[mpi]", "[nccl]", "peer", "connection"))

    def lost(self, error: BaseException, step: int) -> MlxllmError:
        """The error to raise when a collective failed because a peer is gone."""
        return MlxllmError(
            f"Rank {self.rank} lost its connection to the training group near step {step} ({error}): another process "
            "stopped or its machine went away. Checkpoints are written by rank 0; start the group again with "
            "--resume to continue from the last one (the same or a different number of processes)."
        )


_group: Group | None = None


def current() -> Group:
    """The group joined so far (a group of one before `group()` is called); never communicates."""
    return _group or Group()


def group() -> Group:
    """This process's group, joined on the first call (under mlx.launch), else a group of one."""
    global _group
    if _group is None:
        _group = _join()
    return _group


def _join() -> Group:
    backend = _launched_backend()
    if backend is None:
        return Group()
    try:
        handle = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise MlxllmError(
            f"This process was started as part of an MLX {backend} group, but joining it failed: {e}. "
            "Start every process with mlx.launch (see the README, 'Training on several Macs'), "
            "or unset the MLX_* variables to train in one process."
        ) from None
    size, rank = handle.size(), handle.rank()
    if size == 1:
        return Group(backend=backend, handle=handle)
    host = zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF
    hosts = np.asarray(mx.distributed.all_gather(mx.array([host], dtype=mx.int32), group=handle))
    local = np.flatnonzero(hosts == host)
    return Group(
        rank=rank,
        size=size,
        backend=backend,
        local_rank=int(np.searchsorted(local, rank)),
        local_size=len(local),
        handle=handle,
    )
