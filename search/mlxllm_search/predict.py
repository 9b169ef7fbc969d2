"""The loss a trial would reach at the target, from its evaluations so far: which evaluations the learning
curve is fitted to, and which exponent it takes (its own, or with fewer than FIT_MIN_POINTS evaluations the
study's typical one).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from optuna.trial import FrozenTrial

from mlxllm_search.curve import fit_curve
from mlxllm_search.records import record_of
from mlxllm_search.speed import Point
from mlxllm_search.target import ETA

FIT_MIN_POINTS = 5  # fewer, and the curve's exponent is the study's typical one


def fit_window(points: Sequence[Point], warmup_steps: int) -> list[Point]:
    """The points the curve is fitted to: the last rung's (a factor ETA in steps), or the last
    FIT_MIN_POINTS if that holds fewer, after the warm-up. The first steps' fast fall (learning the
    characters' frequencies) is no power law, and a fit that includes it extrapolates far too low."""
    after = [p for p in points if p.step > warmup_steps] or list(points)
    tail = [p for p in after if p.step * ETA >= after[-1].step]
    return tail if len(tail) >= FIT_MIN_POINTS else after[-FIT_MIN_POINTS:]


def free_fit(t: FrozenTrial) -> list[float] | None:
    """The trial's last fit [a, b, c, points, free] if its exponent was its own, else None."""
    fit = record_of(t).fit
    if not fit or fit[3] < FIT_MIN_POINTS or (len(fit) > 4 and not fit[4]):
        return None
    return fit


def typical_exponent(trials: Sequence[FrozenTrial]) -> float | None:
    """The median exponent of the study's free fits (None: the curve module's prior)."""
    cs = [fit[2] for t in trials if (fit := free_fit(t))]
    return statistics.median(cs) if cs else None


def predict(
    points: Sequence[Point],
    warmup_steps: int,
    steps_at_target: float,
    typical_c: float | None,
    vocab_size: int,
    c: float | None = None,
) -> tuple[float, float, list[float] | None]:
    """(loss at the target, its sd, the fit [a, b, c, points, free] or None with a single evaluation); `c`
    fixes the exponent."""
    fit = fit_window(points, warmup_steps)
    if len(fit) < 2:  # one evaluation: no curve, and the whole drop to come is unknown
        return points[-1].loss, abs(math.log(vocab_size) - points[-1].loss), None
    free = c is None and len(fit) >= FIT_MIN_POINTS
    curve = fit_curve(
        [p.step for p in fit], [p.loss for p in fit], None if free else (c if c is not None else typical_c)
    )
    mean, std = curve.predict(max(steps_at_target, fit[-1].step))
    return mean, std, [curve.a, curve.b, curve.c, len(fit), free]
