"""The run a search optimises for ([target]): its length in seconds, steps or tokens; the rungs a trial is
trained to, fractions of that length, in the pruner's unit (TickUnit); and what the search's own budget
(--search-seconds) affords.

A trial trains with the target run's own schedule (the warm-up, then the cosine over the whole target), so
each rung is the first part of the run the user will train, not a shorter run of its own. On a time target
the rungs are in seconds of that run: a slower architecture reaches each rung in fewer steps, as it would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

from mlxllm.config import TrainConfig
from mlxllm.errors import MlxllmError

TARGET_KINDS = ("seconds", "steps", "tokens")
# How the search predicts the loss at the target: "curves" extrapolates each trial's own learning curve
# from rungs of the target run (this module's Plan); "fit" fits a scaling law across trials' finished WSD
# runs (mlxllm_search.plan_search); "auto" chooses (Target.planner_for).
PLANNERS = ("auto", "fit", "curves")
RUNG_SETTINGS = ("min_fraction", "max_fraction", "confirm_top", "confirm_fraction")
ETA = 3  # each rung is 3x the one before, as the pruner's reduction factor
HUGE_STEPS = 10**9  # "no step limit": the time or token budget ends the run
# A search budget of 6 full targets affords rungs up to the target itself; less, and the longest rung
# is the power of 1/3 that fits six times, and the best few are continued to confirm the prediction.
FULL_RUNS_PER_BUDGET = 6
DEFAULT_LEVELS = 3  # rungs below the longest: 1/27 of it is the first
CONFIRM_MARGIN = 1.2  # set-up and evaluations on top of a confirmation's training time
MIN_RUNG_S = 1.0  # a default first rung is at least this long: shorter, and set-up and compilation are all it holds
# The fit planner's trials each cost a few seconds of set-up and compilation, and the fit needs three.
MIN_FIT_TRIAL_S, MIN_FIT_TRIALS = 2.0, 3


@dataclass(frozen=True)
class Target:
    kind: str  # seconds | steps | tokens
    amount: float  # how many of them
    min_fraction: float | None = None  # the first rung; None: DEFAULT_LEVELS rungs below the longest
    max_fraction: float | None = None  # the longest exploration rung; None: what the search budget affords
    confirm_top: int = 2  # when the longest rung is short of the target: how many are trained further
    confirm_fraction: float | None = None  # ... and to what fraction; None: the next rung up (at most 1)
    planner: str = "auto"  # one of PLANNERS
    rungs_set: bool = False  # whether the spec set any of RUNG_SETTINGS (they configure the curves planner)
    # The fit planner acts on its pick only when the pick's 2 sd at the target is at most this (nats): a
    # wider one cannot be told from its neighbours, and best.toml stays the base, with what S would do.
    max_2sd: float = 0.5
    # ... and replaces the base architecture with it only when the pick is predicted better by this many sd of
    # the difference: the user's default stands until a search shows something better (0: the pick as it is).
    switch_sd: float = 2.0

    def planner_for(self, search_seconds: float | None) -> str:
        """The planner this search uses: the one named, or for "auto" the fit when the search may spend less
        than FULL_RUNS_PER_BUDGET targets on a time target (below that the curves extrapolate rungs far
        shorter than the target), else the curves; rung settings in the spec ask for the curves."""
        if self.planner != "auto":
            return self.planner
        short = (
            self.kind == "seconds"
            and search_seconds is not None
            and search_seconds < FULL_RUNS_PER_BUDGET * self.amount
        )
        return "fit" if short and not self.rungs_set else "curves"

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
        """The target in words, e.g. "300 s" or "2,000 steps"."""
        return f"{self.amount:g} s" if self.kind == "seconds" else f"{int(self.amount):,} {self.kind}"


class TickUnit(Enum):
    """The unit of a target-aware search's pruner resource, its "ticks": Optuna's pruners compare trials at
    whole-number resources, so a time target counts milliseconds of the target run (a slower architecture
    reaches each rung in fewer steps, as it would) and a step or token target counts optimizer steps."""

    MS = "ms"  # milliseconds of the target run
    STEPS = "steps"  # optimizer steps

    @classmethod
    def of(cls, kind: str) -> TickUnit:
        """The unit of a target of `kind` (seconds, steps or tokens)."""
        return cls.MS if kind == "seconds" else cls.STEPS

    def at(self, step: float, seconds_at: Callable[[float], float]) -> float:
        """Ticks at optimizer step `step`; `seconds_at(step)` is the target run's clock there (asked in MS only)."""
        return 1000 * seconds_at(step) if self is TickUnit.MS else step


@dataclass(frozen=True)
class Plan:
    """The rungs of a target-aware search, as fractions of the target and in ticks (the pruner's resource)."""

    fractions: tuple[float, ...]  # exploration rungs, shortest first; a trial trains at most to the last
    total_ticks: int  # the target itself, in `unit`
    unit: TickUnit  # what a tick is: a millisecond of the target run or an optimizer step
    confirm_top: int = 0  # how many explored trials are trained further to confirm their prediction
    confirm_fraction: float = (
        0.0  # ... and to what fraction of the target; 0: no confirmation (the longest rung is the target)
    )
    reserve_s: float = 0.0  # search seconds kept back for the confirmations

    def ticks(self, fraction: float) -> int:
        """The rung at `fraction` of the target, in ticks (at least one)."""
        return max(1, round(fraction * self.total_ticks))

    @property
    def confirm_fractions(self) -> tuple[float, ...]:
        """The rungs a confirmation trains through, after the longest exploration rung."""
        out, f = [], self.fractions[-1]
        while self.confirm_fraction and f < self.confirm_fraction - 1e-9:
            f = min(self.confirm_fraction, f * ETA)
            out.append(f)
        return tuple(out)


def check_fit_budget(search_seconds: float | None) -> None:
    """Refuse a search budget in which the fit planner cannot train its three trials at all."""
    need = MIN_FIT_TRIAL_S * MIN_FIT_TRIALS
    if search_seconds is not None and search_seconds < need:
        raise MlxllmError(
            f"A search budget of {search_seconds:g} s is too short to train even one trial of the three a fit across "
            f"trials needs (each takes a few seconds to set up and compile): give --search-seconds {need:g} or more."
        )


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
            f"A search budget of {S:g} s affords rungs of at most {f_max * T:.2g} s of the {T:g} s target: too short "
            "to train even one trial (setting it up takes about a second). Raise --search-seconds."
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
    # The target in ticks: its milliseconds, or its optimizer steps (a token target's at tokens_per_step).
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
            f"{T:g} s target{f', with {reserve:.0f} s kept for confirmations' if reserve else ''}). Raise "
            "--search-seconds, or lower [target] min_fraction or confirm_top."
        )
    if total < len(fractions) or _collide(fractions, total):
        raise MlxllmError(
            f"The target ({target.describe()}) is too short for {len(fractions)} rungs from {fractions[0]:.3g} to "
            f"{fractions[-1]:.3g} of it: raise the target or [target] min_fraction."
        )
    return Plan(fractions, total, TickUnit.of(target.kind), top, f_c, reserve)


def _collide(fractions: tuple[float, ...], total_ticks: int) -> bool:
    """Whether two rungs round to the same tick (a target too short for them)."""
    ticks = [max(1, round(f * total_ticks)) for f in fractions]
    return len(set(ticks)) != len(ticks)
