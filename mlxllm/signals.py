"""Stopping a run on a signal. SIGTERM (kill, systemd, SLURM, Kubernetes, a laptop's shutdown), SIGINT
(Ctrl-C) and SIGHUP (a closed terminal) end training after the step in flight: a checkpoint of that
step is written (unless its evaluation has just written one), the metrics are flushed, and the run
raises `Stopped`, which the CLI prints as one line and turns into exit code 128 + the signal's
number. A second signal while it stops waits for the save, saying so; a third ends the process at
once, by that signal (the checkpoint being written is then discarded; the ones before are intact).

In a data-parallel group a signal may reach one process only, or each at a different step, and
every process must stop after the same step: they share each step's all-reduce, and rank 0 saves.
So after each step every process adds its flag to a small all-sum that waits for the step's loss,
and reads the sum from LAG steps before. That step has finished by then, so the read does not wait
for the steps queued after it: reading this step's sum at once would wait out its work each step,
and the host would no longer prepare the next batch while the device trains. Every process reads
the same sums at the same steps, so all stop after the same step, at most LAG steps after the
signal; the cost is one three-element all-reduce per step beside the step's own, of every gradient.

Handlers are set only in the main thread (Python's rule); elsewhere training ends as it did before.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections import deque
from pathlib import Path
from types import FrameType
from typing import Any

from mlxllm.distributed import Group

import mlx.core as mx
import numpy as np

SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)
LAG = 2  # steps between a group's flag and its read


class Stopped(KeyboardInterrupt):
    """Training ended on a signal, after saving; `signum` says which (the CLI exits 128 + signum).

    A KeyboardInterrupt, so that what handles Ctrl-C (a search's workers) handles it too, and no
    `except Exception` swallows it."""

    def __init__(self, message: str, signum: int):
        """message: the one line to print (empty on the processes that print nothing); signum: the signal."""
        super().__init__(message)
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopOnSignal:
    """While open (`with`), the signals above ask training to stop after the step in flight. The
    training loop calls `poll` after each step and stops once `agreed` is set (every process of the
    group at the same step), then saves; a second signal only says the save goes on, a third ends
    the process at once."""

    def __init__(self, group: Group = Group()):
        """group: the training group whose processes must agree on the step to stop after."""
        self.group = group
        self.signum: int | None = None  # the first signal this process received
        self._agreed: int | None = None  # in a group: the signal it stops for, once every process knows it
        self._count = 0
        self._sums: deque[mx.array] = deque()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # None: not set from Python
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._count += 1
        if self._count == 1:
            self.signum = signum
        elif self._count == 2:
            print(
                f"{signal_name(signum)}: still stopping; the checkpoint is being saved (a third signal ends at once, "
                "without it).",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(
                f"{signal_name(signum)} again: ending at once. The checkpoint being written is discarded; the ones "
                "before are intact (continue with --resume).",
                file=sys.stderr,
                flush=True,
            )
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    @property
    def agreed(self) -> int | None:
        """The signal training stops for, once every process of the group knows it (alone: at once)."""
        return self.signum if self.group.size == 1 else self._agreed

    def poll(self, after: mx.array) -> None:
        """After each step (`after`: an output of it, such as its loss): in a group, the flags' sum of
        LAG steps before, which sets `agreed` on every process at the same step."""
        if self.group.size == 1 or self._agreed is not None:
            return
        flags = np.zeros(len(SIGNALS), np.int32)
        if self.signum is not None:
            flags[SIGNALS.index(self.signum)] = 1
        total = self.group.sum(mx.depends([mx.array(flags)], [after])[0])  # ordered after the step's collectives
        mx.async_eval(total)
        self._sums.append(total)
        if len(self._sums) > LAG:
            summed = np.asarray(self._sums.popleft())
            if summed.any():
                self._agreed = SIGNALS[int(np.flatnonzero(summed)[0])]

    def stopped(self, step: int, saved: Path | None) -> Stopped | None:
        """The exception to end the run with, once training stopped at `step` (`saved`: the checkpoint
        rank 0 wrote for it); None when no signal came."""
        signum = self.agreed or self.signum
        if signum is None:
            return None
        name = signal_name(signum)
        if not self.group.primary:
            return Stopped(f"Rank {self.group.rank} stopped with the group at step {step} ({name}).", signum)
        what = "Interrupted" if signum == signal.SIGINT else f"Stopped by {name}"
        where = f"its checkpoint is saved ({saved})" if saved is not None else "no checkpoint could be saved"
        return Stopped(f"{what} at step {step}: {where} and the metrics are flushed; continue with --resume.", signum)
