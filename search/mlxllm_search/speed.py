"""A trial's evaluations (Point) and the speed measured from them (Speed), which turns its optimizer steps into
the seconds of the target run: each evaluation's window holds training and, from the second on, the
evaluation and checkpoint before it; the first window of a training call also holds its compilation.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import NamedTuple


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
