"""The run a search optimises for ([target]): its length in seconds, steps or tokens; the rungs a trial is
trained to, fractions of that length; what the search's own budget (--search-seconds) affords; and a
trial's measured speed, which turns its steps into the target run's seconds.

A trial trains with the target run's own schedule (the warm-up, then the cosine over the whole target), so
each rung is the first part of the run the user will train, not a shorter run of its own. On a time target
the rungs are in seconds of that run: a slower architecture reaches each rung in fewer steps, as it would.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace
from typing import NamedTuple

from mlxllm.config import TrainConfig
from mlxllm.errors import MlxllmError

TARGET_KINDS = ("seconds", "steps", "tokens")
ETA = 3  # each rung is 3x the one before, as the pruner's reduction factor
HUGE_STEPS = 10**9  # "no step limit": the time or token budget ends the run
# A search budget of 6 full targets affords rungs up to the target itself; less, and the longest rung
# is the power of 1/3 that fits six times, and the best few are continued to confirm the prediction.
FULL_RUNS_PER_BUDGET = 6
DEFAULT_LEVELS = 3  # rungs below the longest: 1/27 of it is the first
CONFIRM_MARGIN = 1.2
MIN_RUNG_S = 1.0  # a default first rung is at least this long: shorter, and set-up and compilation are all it holds  # set-up and evaluations on top of a confirmation's training time


@dataclass(frozen=True)
class Target:
    kind: str  # seconds | steps | tokens
    amount: float
    min_fraction: float | None = None  # the first rung; None: DEFAULT_LEVELS rungs below the longest
    max_fraction: float | None = None  # the longest exploration rung; None: what the search budget affords
    confirm_top: int = 2  # when the longest rung is short of the target: how many are trained further
    confirm_fraction: float | None = None  # ... and to what fraction; None: the next rung up (at most 1)

    def apply(self, train: TrainConfig) -> TrainConfig:
        """The run config's budget and schedule for the target; nothing else ends the run."""
        return replace(
            train,
            max_steps=int(self.amount) if self.kind == "steps" else HUGE_STEPS,
            max_tokens=int(self.amount) if self.kind == "tokens" else None,
            max_seconds=float(self.amount) if self.kind == "seconds" else None,
        )

    def key(self) -> dict[str, object]:
        """What makes two studies' predictions comparable (the rungs do not: every trial predicts the target)."""
        return {"kind": self.kind, "amount": self.amount}

    def describe(self) -> str:
        return f"{self.amount:g} s" if self.kind == "seconds" else f"{int(self.amount):,} {self.kind}"


@dataclass(frozen=True)
class Plan:
    """The rungs of a target-aware search, as fractions of the target and as the pruner's integer resource
    ("ticks": milliseconds of the target run on a time target, optimizer steps otherwise)."""

    fractions: tuple[float, ...]  # exploration rungs, shortest first; a trial trains at most to the last
    total_ticks: int  # the target itself
    confirm_top: int = 0
    confirm_fraction: float = 0.0  # 0: no confirmation (the longest rung is the target)
    reserve_s: float = 0.0  # search seconds kept back for the confirmations

    def ticks(self, fraction: float) -> int:
        return max(1, round(fraction * self.total_ticks))

    @property
    def confirm_fractions(self) -> tuple[float, ...]:
        """The rungs a confirmation trains through, after the longest exploration rung."""
        out, f = [], self.fractions[-1]
        while self.confirm_fraction and f < self.confirm_fraction - 1e-9:
            f = min(self.confirm_fraction, f * ETA)
            out.append(f)
        return tuple(out)


def make_plan(target: Target, search_seconds: float | None, tokens_per_step: int) -> Plan:
    """The rungs for this target and search budget; a budget that cannot reach the first rung is refused."""
    T, S = target.amount, search_seconds
    timed = target.kind == "seconds"
    if target.max_fraction is not None:
        f_max = target.max_fraction
    elif timed and S is not None and S < FULL_RUNS_PER_BUDGET * T:
        f_max = ETA ** -math.ceil(math.log(FULL_RUNS_PER_BUDGET * T / S, ETA) - 1e-9)
    else:
        f_max = 1.0
    if timed and S is not None and target.max_fraction is None and f_max * T < MIN_RUNG_S:
        raise MlxllmError(
            f"A search budget of {S:g} s affords rungs of at most {f_max * T:.2g} s of the {T:g} s target: too short to "
            "train even one trial (setting it up takes about a second). Raise --search-seconds."
        )
    if target.min_fraction is not None:
        f_min = target.min_fraction
    else:  # DEFAULT_LEVELS rungs below the longest, or fewer if the first would be shorter than MIN_RUNG_S
        levels = (
            DEFAULT_LEVELS if not timed else min(DEFAULT_LEVELS, max(0, int(math.log(f_max * T / MIN_RUNG_S, ETA))))
        )
        f_min = f_max / ETA**levels
    if f_min > f_max:
        raise MlxllmError(
            f"[target] min_fraction ({f_min:g}) is above the longest rung ({f_max:g}): lower it, or raise max_fraction."
        )
    levels = max(0, round(math.log(f_max / f_min, ETA)))
    fractions = tuple(f_max / ETA**k for k in range(levels, -1, -1))
    total = {"seconds": round(1000 * T), "steps": int(T), "tokens": math.ceil(T / tokens_per_step)}[target.kind]
    top, f_c, reserve = 0, 0.0, 0.0
    if f_max < 1 and target.confirm_top:
        top, f_c = target.confirm_top, target.confirm_fraction or min(1.0, ETA * f_max)
        if timed and S is not None:
            reserve = min(S / 2, top * (f_c - f_max) * T * CONFIRM_MARGIN)
        elif S is not None:
            reserve = S / 4  # a step or token target's seconds are known only once trials ran
    if timed and S is not None and fractions[0] * T > S - reserve:
        raise MlxllmError(
            f"A search budget of {S:g} s cannot train even one trial to the first rung ({fractions[0]:.3g} of the "
            f"{T:g} s target{f', with {reserve:.0f} s kept for confirmations' if reserve else ''}). Raise --search-seconds, "
            "or lower [target] min_fraction or confirm_top."
        )
    if total < len(fractions) or _collide(fractions, total):
        raise MlxllmError(
            f"The target ({target.describe()}) is too short for {len(fractions)} rungs from {fractions[0]:.3g} to "
            f"{fractions[-1]:.3g} of it: raise the target or [target] min_fraction."
        )
    return Plan(fractions, total, top, f_c, reserve)


def _collide(fractions: tuple[float, ...], total: int) -> bool:
    ticks = [max(1, round(f * total)) for f in fractions]
    return len(set(ticks)) != len(ticks)


class Point(NamedTuple):
    """One evaluation of a trial: its step, the trainer's clock, the speed since the evaluation before, the
    validation loss, and whether it was the first of a training call (whose window holds compilation)."""

    step: int
    elapsed: float
    tokens_per_sec: float
    loss: float
    first: bool


@dataclass(frozen=True)
class Speed:
    step_s: float  # a training step, evaluations left out
    eval_s: float  # one evaluation with its checkpoint
    start_s: float  # compilation and set-up of the first step

    @classmethod
    def measure(cls, points: list[Point], tokens_per_step: int) -> Speed:
        """Medians over the windows between evaluations; the first window of each training call holds its
        compilation, so it counts only towards start_s."""
        steady, evals, firsts = [], [], []
        for i, p in enumerate(points):
            steps = p.step - (points[i - 1].step if i else 0)
            if steps <= 0 or p.tokens_per_sec <= 0:
                continue
            train_s = steps * tokens_per_step / p.tokens_per_sec
            if p.first:
                firsts.append((steps, train_s))
            else:
                steady.append(train_s / steps)
                evals.append(max(0.0, p.elapsed - points[i - 1].elapsed - train_s))
        if not steady and not firsts:
            raise ValueError("no training window measured")
        step_s = statistics.median(steady) if steady else firsts[0][1] / firsts[0][0]
        start_s = max(0.0, firsts[0][1] - firsts[0][0] * step_s) if firsts else 0.0
        return cls(step_s, statistics.median(evals) if evals else 0.0, start_s)

    def seconds_at(self, step: float, eval_interval: int) -> float:
        """The target run's clock at `step`, evaluating every eval_interval steps as the final run does."""
        return self.start_s + step * (self.step_s + self.eval_s / eval_interval)

    def steps_at(self, seconds: float, eval_interval: int) -> float:
        return max(0.0, seconds - self.start_s) / (self.step_s + self.eval_s / eval_interval)


@dataclass(frozen=True)
class Deadlines:
    """Wall-clock ends (epoch seconds, so that spawned workers agree) of the exploration and of the search."""

    explore: float | None = None
    end: float | None = None

    @classmethod
    def start(cls, search_seconds: float | None, reserve_s: float, since: float | None = None) -> Deadlines:
        """Deadlines `search_seconds` after `since` (time.time(); default now), the last reserve_s kept back."""
        if search_seconds is None:
            return cls()
        now = time.time() if since is None else since
        return cls(now + search_seconds - reserve_s, now + search_seconds)

    def left(self, confirming: bool = False) -> float:
        end = self.end if confirming else self.explore
        return math.inf if end is None else end - time.time()
