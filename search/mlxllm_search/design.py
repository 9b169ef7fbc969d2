"""The design of the fit planner's trials: which architectures to train, and how long, within the search's
seconds. Not a sampler: the law L(N, D) wants sizes spread over log N and several finished lengths of each,
so the space is enumerated (Space.grid), the base architecture first, then the sizes farthest in log N from
those already measured; each trial's length is a ladder of stable-phase steps, every one of them a cooldown
branch whose finished run ends past the warm-up (law_points.first_step).

A trial's cost is estimated from its steps (FLOPs-based before any trial ran, this machine's measured speeds
after), its evaluations and the set-up of each training call; fewer trials that reach usable lengths are
preferred to many that would not.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from mlxllm.config import ModelConfig
from mlxllm.schedule import length_for_stable, stable_steps

from mlxllm_search.law_points import DISTINCT, MIN_TRIALS, Point, first_step
from mlxllm_search.scaling import law_params
from mlxllm_search.throughput import fit_throughput, model_key

# Branch points as multiples of a trial's unit (an even step, so that each is a whole step): finished lengths
# 1.33-1.5x apart, up to 8x the first. A trial's first three already span the lengths the fit needs (three of
# them, 2x apart: law_points), so that a search with time for three short trials can fit the law at all.
LADDER = (1, 1.5, 2, 3, 4, 6, 8)
GOOD_LEVELS, MIN_LEVELS = 4, 3  # a trial is planned to 4 branch points (lengths 3x apart), at least 3
# At S = T/10 every trial is far shorter than the run it plans, and the extrapolation in tokens is the
# larger one: each size more makes every trial shorter still, and a spare trial's points from early in
# training loosen the fit more than its size pins it. So the fit's minimum, each trial as long as it can be.
MAX_TRIALS = MIN_TRIALS
# Before this machine measured a trial: an assumed utilisation and per-step dispatch (both on the slow
# side, as rungs.py assumes), a checkpoint write, and a training call's set-up and compilation.
ASSUMED_MFU, STEP_OVERHEAD_S, CHECKPOINT_S, CALL_S = 0.2, 0.002, 0.05, 1.5
EVAL_FORWARD = 1 / 3  # an evaluation batch costs about a third of a training step (forward only)


def even(step: int) -> int:
    """`step`, or the next step up where it is odd (a ladder's unit)."""
    return step + step % 2


def first_unit(warmup_steps: int, fraction: float) -> int:
    """The smallest (even) stable-phase step whose cooldown branch (a WSD run of length_for_stable) the fit
    admits."""
    u = even(max(2, warmup_steps))
    while length_for_stable(u, fraction) < first_step(warmup_steps):
        u += 2
    return u


def floor_unit(unit: int, fraction: float, runs: Sequence[Sequence[Point]], floor: float | None) -> int:
    """The first branch step of the trials still to design, given the points of the trials that ran (`runs`,
    one sequence each) and the pairs level `floor` that a point must end below for the fit to take it:
    `unit`, raised to the stable step of the shortest run that ended below `floor` (in each trial; the latest
    of them), since a later trial's branch ending sooner would be refused and its seconds spent for nothing;
    with no run below it yet, twice the longest measured. Sizes that cross the level later than the ones
    measured then miss their first branch at worst; the short ones were missed by all."""
    if floor is None:
        return unit
    crossed = [min(p.step for p in ps if p.loss < floor) for ps in runs if any(p.loss < floor for p in ps)]
    if crossed:
        return max(unit, even(stable_steps(max(crossed), fraction)))
    longest = max((p.step for ps in runs for p in ps), default=0)
    return max(unit, 2 * stable_steps(longest, fraction)) if longest else unit


def checkpoint_interval(steps: Sequence[int]) -> int:
    """The main run's evaluation (and checkpoint) interval for branches at `steps`: each is a multiple of it."""
    return math.gcd(*steps)


@dataclass(frozen=True)
class Ladder:
    """A trial's branch points: `unit` (even) times the first `levels` of LADDER; the last is the main run's
    own cooldown, the others are branched from its checkpoints."""

    unit: int
    levels: int
    fraction: float  # the WSD cooldown fraction

    def __post_init__(self) -> None:
        if self.unit < 2 or self.unit % 2 or not 1 <= self.levels <= len(LADDER):
            raise ValueError(f"a ladder's unit is an even step and its levels 1-{len(LADDER)} (got {self!r})")

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(int(self.unit * m) for m in LADDER[: self.levels])

    @property
    def interval(self) -> int:
        return checkpoint_interval(self.steps)

    @property
    def lengths(self) -> tuple[int, ...]:
        """The finished runs' lengths in steps."""
        return tuple(length_for_stable(s, self.fraction) for s in self.steps)


@dataclass(frozen=True)
class Cost:
    """What a trial of one architecture costs on this machine, in seconds."""

    step_s: float  # one training step
    eval_s: float  # one evaluation with its checkpoint
    call_s: float  # set-up and compilation of one training call (the main run, each branch)

    def branch_s(self, step: int, fraction: float) -> float:
        """One cooldown branch from `step`."""
        return self.call_s + (length_for_stable(step, fraction) - step) * self.step_s + self.eval_s

    def seconds(self, ladder: Ladder) -> float:
        """The whole trial: the main run through its last cooldown (evaluating every interval), then the branches."""
        end = ladder.lengths[-1]
        main = self.call_s + end * self.step_s + math.ceil(end / ladder.interval) * self.eval_s
        return main + sum(self.branch_s(s, ladder.fraction) for s in ladder.steps[:-1])


def longest_ladder(
    cost: Cost, share_s: float, unit: int, fraction: float, min_levels: int = MIN_LEVELS
) -> Ladder | None:
    """The ladder a trial can afford in `share_s`: the most levels (at least `min_levels`) from `unit` (made
    even), then the unit stretched so that the trial fills its share: a trial's time is spent, and sizes of
    different speeds end at different lengths, which the fit needs as much as sizes."""
    unit = even(unit)
    for levels in range(len(LADDER), min_levels - 1, -1):
        if cost.seconds(Ladder(unit, levels, fraction)) <= share_s:
            break
    else:
        return None
    lo, hi = unit // 2, unit  # in halves of the unit, which is even
    while cost.seconds(Ladder(2 * hi, levels, fraction)) <= share_s:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the cost grows with the unit: the largest one that fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost.seconds(Ladder(2 * mid, levels, fraction)) <= share_s else (lo, mid)
    return Ladder(2 * lo, levels, fraction)


@dataclass(frozen=True)
class Measured:
    """What a finished plan trial measured of its architecture's speed (or, `priced` False, the warm-up: its
    tokens/s alone, with the evaluation and set-up as estimated)."""

    model: ModelConfig
    tokens_per_sec: float
    eval_s: float
    overhead_s: float
    priced: bool = True

    @classmethod
    def timed(cls, model: ModelConfig, tokens_per_sec: float, tokens_per_step: int, eval_batches: int) -> Measured:
        """An architecture whose training speed alone was measured."""
        step_s = tokens_per_step / tokens_per_sec
        return cls(model, tokens_per_sec, eval_batches * EVAL_FORWARD * step_s + CHECKPOINT_S, CALL_S, priced=False)


@dataclass(frozen=True)
class Speeds:
    """Trial costs of any architecture: from the measured trials (a speed line over FLOPs, throughput.py),
    or before any, from FLOPs at an assumed utilisation of the machine's peak."""

    seq_len: int
    tokens_per_step: int
    eval_batches: int
    peak_flops: float  # this machine's, for the guess
    measured: tuple[Measured, ...] = ()

    def cost(self, model: ModelConfig) -> Cost:
        if not self.measured:
            step_s = STEP_OVERHEAD_S + model.flops_per_token(self.seq_len) * self.tokens_per_step / (
                ASSUMED_MFU * self.peak_flops
            )
            return Cost(step_s, self.eval_batches * EVAL_FORWARD * step_s + CHECKPOINT_S, CALL_S)
        line = fit_throughput([(m.model, m.tokens_per_sec) for m in self.measured], self.seq_len)
        step_s = self.tokens_per_step / line.tokens_per_second(model)[0]
        priced = [m for m in self.measured if m.priced] or self.measured
        eval_share = statistics.median(m.eval_s * m.tokens_per_sec / self.tokens_per_step for m in priced)
        return Cost(step_s, eval_share * step_s, statistics.median(m.overhead_s for m in priced))


@dataclass(frozen=True)
class Choice:
    """A trial to run: its architecture, ladder, the seconds it is given and is estimated to take."""

    model: ModelConfig
    ladder: Ladder
    share_s: float
    cost_s: float


def _log_gap(n: int, others: Sequence[int]) -> float:
    return min((abs(math.log(n / o)) for o in others), default=math.inf)


def _representatives(pool: Sequence[ModelConfig], first: Sequence[ModelConfig]) -> list[ModelConfig]:
    """One architecture per size (N within DISTINCT): one of `first`, else the one shaped like the first of
    them (its MLP ratio and KV grouping), else the cheapest, so that sizes differ in width and depth rather
    than in details."""
    keys = {model_key(m) for m in first}
    prefer = first[0] if first else None

    def rank(m: ModelConfig) -> tuple[bool, bool, float]:
        alike = prefer is not None and (m.mlp_ratio, m.n_heads // m.kv_heads) == (
            prefer.mlp_ratio,
            prefer.n_heads // prefer.kv_heads,
        )
        return (model_key(m) not in keys, not alike, m.flops_per_token(1))

    out: list[ModelConfig] = []
    for m in sorted(pool, key=rank):
        if _log_gap(law_params(m), [law_params(o) for o in out]) >= math.log(DISTINCT):
            out.append(m)
    return out


def _spread(pool: Sequence[ModelConfig], first: Sequence[ModelConfig], measured: Sequence[int], n: int) -> list:
    """n architectures: those of `first` in the pool, then greedily the size farthest in log N from every one
    measured or chosen (the largest first, when nothing is)."""
    chosen = [m for m in first if any(model_key(m) == model_key(p) for p in pool)][:n]
    rest = [m for m in pool if all(model_key(m) != model_key(c) for c in chosen)]
    while len(chosen) < n and rest:
        sizes = list(measured) + [law_params(c) for c in chosen]
        best = max(rest, key=lambda m: (_log_gap(law_params(m), sizes), law_params(m)))
        if _log_gap(law_params(best), sizes) < math.log(DISTINCT):
            break
        chosen.append(best)
        rest.remove(best)
    return chosen


def choose(
    candidates: Sequence[ModelConfig],
    first: Sequence[ModelConfig],
    measured: Sequence[ModelConfig],
    speeds: Speeds,
    seconds: float,
    unit: int,
    fraction: float,
    warmup_steps: int,
    exclude: Sequence[ModelConfig] = (),
    unusable: int = 0,
) -> list[Choice]:
    """The trials still to run in `seconds`: `first` (the base, seed configs) where affordable, then sizes
    spread over log N; as many as MAX_TRIALS allows at GOOD_LEVELS branch points each, else at MIN_LEVELS,
    else none (until MIN_TRIALS trials ran, the cheapest sizes with the longest ladders below `unit` they
    afford: the fit is likely to refuse their points, and the shortfall it reports is measured). `measured`: the
    architectures trained; `unit`: the first usable branch step (first_unit, or floor_unit's once trials ran),
    `fraction`: the cooldown's, `warmup_steps`: the trials';
    `exclude`: architectures tried already (measured or not), not tried again; `unusable`: how many of the
    measured trials have no point the fit takes (all above the pairs level): once the design's trials ran,
    as many more are designed in the time left, so that MIN_TRIALS trials can pin the law, or one more size
    where the time left affords it."""
    done = {model_key(m) for m in (*measured, *exclude)}
    sizes = [law_params(m) for m in measured]
    pool = [m for m in candidates if model_key(m) not in done]
    costs = {model_key(m): speeds.cost(m) for m in pool}
    need = max(1, MIN_TRIALS - len(measured))
    slots = MAX_TRIALS - len(measured)
    if slots <= 0:  # all designed trials ran: those without a usable point are replaced while time allows, and
        # time they left (finishing under their estimates, or a repetition trial unaffordable) buys one more size
        slots, need = max(1, min(unusable, MIN_TRIALS - (len(measured) - unusable))), 1
    firsts = {model_key(m) for m in first}
    for levels in (GOOD_LEVELS, MIN_LEVELS):
        # The base (and the seed configs) at the fewest levels it affords: a trial of it beats one more size.
        least = {k: MIN_LEVELS if k in firsts else levels for k in costs}
        for n in range(slots, need - 1, -1):
            share = seconds / n
            fits = [m for m in pool if longest_ladder(costs[model_key(m)], share, unit, fraction, least[model_key(m)])]
            picks = _spread(_representatives(fits, first), first, sizes, n)
            if len(picks) == n:
                return [_choice(m, costs[model_key(m)], share, unit, fraction, least[model_key(m)]) for m in picks]
    if len(measured) >= MIN_TRIALS or not pool:
        return []
    share = seconds / need  # nothing reaches a usable length: measure the shortfall on the cheapest sizes
    cheap = sorted(_representatives(pool, first), key=lambda m: costs[model_key(m)].step_s)[:need]
    out = []
    for m in cheap:
        c = costs[model_key(m)]
        short = next(
            (
                u
                for u in range(even(unit) - 2, even(max(2, warmup_steps)) - 1, -2)
                if c.seconds(Ladder(u, MIN_LEVELS, fraction)) <= share
            ),
            None,
        )
        if short is not None:
            ladder = Ladder(short, MIN_LEVELS, fraction)
            out.append(Choice(m, ladder, share, c.seconds(ladder)))
    return out


def _choice(m: ModelConfig, cost: Cost, share: float, unit: int, fraction: float, levels: int) -> Choice:
    ladder = longest_ladder(cost, share, unit, fraction, levels)
    assert ladder is not None
    return Choice(m, ladder, share, cost.seconds(ladder))
