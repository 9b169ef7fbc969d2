"""One trial of a target-aware search: trained rung by rung as the first part of the target run (its
schedule, batch and context), its loss at each rung reported to the pruner, and the loss it would reach
at the target predicted from its learning curve, or measured when it got there.

Each rung is one training call that resumes the last one's checkpoint, evaluating a few times
(EVALS_PER_RUNG) at an interval chosen from the speed measured so far, so a trial evaluates about as
often at every rung and about as often in all as the final run does.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlxllm import checkpoint as ckpt
from mlxllm.config import RunConfig
from mlxllm.data import TokenData
from mlxllm.device import peak_flops
from mlxllm.trainer import TrainResult, train

import optuna
from optuna.trial import FrozenTrial

from mlxllm_search.deadlines import Deadlines
from mlxllm_search.predict import predict, typical_exponent
from mlxllm_search.records import record_of, store
from mlxllm_search.space import SearchSpec
from mlxllm_search.speed import Point, Speed
from mlxllm_search.target import Plan, TickUnit

EVALS_PER_RUNG = 5
# Before a trial has measured its own speed: an assumed model FLOPs utilisation and a per-step cost of
# dispatch, both on the slow side, so the first rung is evaluated too often rather than overshot.
ASSUMED_MFU = 0.2
STEP_OVERHEAD_S = 0.002
ENDED_BY_TARGET = ("max_seconds", "max_steps", "max_tokens")


@dataclass
class RungTrainer:
    spec: SearchSpec  # a target-aware one
    plan: Plan  # its rungs
    data: TokenData  # the prepared corpus every trial trains on
    deadlines: Deadlines  # of the search's own time budget
    on_eval: Callable[[dict[str, Any]], None]  # each evaluation's metrics (caps, live display); may prune

    def train(self, trial: optuna.Trial, run: RunConfig) -> float:
        """Train the trial's rungs; return its loss at the target (measured, else predicted)."""
        source = self._confirms(trial)
        confirming = source is not None
        points: list[Point] = []
        fractions = self.plan.fractions
        if source is not None:
            explored = record_of(source)
            src_dir = Path(explored.run_dir)
            if ckpt.latest_good(src_dir) is not None:  # continue its run where the exploration left it
                run = replace(run, train=replace(run.train, out_dir=str(src_dir)))
                points = list(explored.points)
                fractions = self.plan.confirm_fractions
            else:  # another machine explored it: train it again from the start
                fractions = fractions + self.plan.confirm_fractions
        store(trial, run_dir=run.train.out_dir)
        ended, reached = False, 0.0  # ended: trained to the target, so its loss there is measured
        for f in fractions:
            until = self.plan.ticks(f)
            if points and self.ticks(points, points[-1].step) >= until:
                reached = f
                continue
            if self.deadlines.left(confirming) <= 0:
                break
            result = self._segment(trial, run, points, until, resume=bool(points), confirming=confirming)
            by_trainer = result.stopped_by in ENDED_BY_TARGET
            if not by_trainer and self.ticks(points, points[-1].step) < until:
                break  # the search's budget ran out within this rung
            ended = by_trainer or f >= 1
            reached = 1.0 if ended else f
            # The trainer's own clock (which also counts the trial's extra evaluations) may end it first.
            value = points[-1].loss if by_trainer else self.loss_at(points, until)
            self._record(trial, points, reached, value if ended else None)
            if not confirming and not self.spec.settings.multi:
                trial.report(value, until)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"validation loss {value:.4f} at {f:.3g} of the target")
            if ended:
                break
        if not points or (reached == 0 and not confirming):
            store(trial, cut="the search budget ended before the first rung")
            raise optuna.TrialPruned("the search's time budget ended before the first rung")
        if reached < fractions[-1]:
            store(trial, cut=f"search budget spent at {self.fraction(points):.3g} of the target")
        return self._record(trial, points, reached, record_of(trial).actual if ended else None)

    def _confirms(self, trial: optuna.Trial) -> FrozenTrial | None:
        """The explored trial this one confirms (continues towards the target), if it is a confirmation."""
        number = record_of(trial).confirms
        if number is None:
            return None
        return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == number)

    # --- the clock of the target run -------------------------------------------------------------------

    def speed(self, points: list[Point]) -> Speed:
        """The trial's speed, measured from its evaluations so far."""
        return Speed.measure(points, self.spec.tokens_per_step)

    def ticks(self, points: list[Point], step: float) -> float:
        """The pruner's resource at `step`, in the plan's TickUnit (the target run's ms, or steps)."""
        eval_interval = self.spec.base.train.eval_interval
        return self.plan.unit.at(step, lambda s: self.speed(points).seconds_at(s, eval_interval))

    def steps_at_target(self, points: list[Point]) -> float:
        """The optimizer steps the target run reaches: at the trial's speed on a time target, else the plan's."""
        target = self.spec.target
        assert target is not None
        if self.plan.unit is TickUnit.MS:
            return self.speed(points).steps_at(target.amount, self.spec.base.train.eval_interval)
        return float(self.plan.total_ticks)  # ticks are steps

    def fraction(self, points: list[Point]) -> float:
        """How far towards the target the trial has trained."""
        return self.ticks(points, points[-1].step) / self.plan.total_ticks

    def loss_at(self, points: list[Point], ticks: int) -> float:
        """The loss at exactly `ticks`, between the evaluations either side (from the untrained model's
        ln(vocab) before the first), so every trial is compared at the same point of the target run."""
        xs = [0.0] + [self.ticks(points, p.step) for p in points]
        ys = [math.log(self.data.tokenizer.vocab_size)] + [p.loss for p in points]
        for i in range(1, len(xs)):
            if xs[i] >= ticks:
                w = (ticks - xs[i - 1]) / max(xs[i] - xs[i - 1], 1e-9)
                return ys[i - 1] + w * (ys[i] - ys[i - 1])
        return ys[-1]

    # --- training ------------------------------------------------------------------------------------

    def _interval(self, trial: optuna.Trial, run: RunConfig, points: list[Point], until: int) -> int:
        """Steps between evaluations so that this rung holds about EVALS_PER_RUNG of them."""
        if points:
            now = self.ticks(points, points[-1].step)
            per_step = self.ticks(points, points[-1].step + 1) - now
            evals = EVALS_PER_RUNG
        else:
            step_s, known = self._guess_step_s(trial, run)
            now, evals = 0.0, EVALS_PER_RUNG if known else 2 * EVALS_PER_RUNG  # a guessed speed: evaluate more often
            per_step = self.plan.unit.at(1.0, lambda s: s * step_s)
        return max(1, math.ceil((until - now) / max(per_step, 1e-9) / evals))

    def _flops_per_step(self, run: RunConfig) -> float:
        return (
            run.model.flops_per_token(self.spec.base.train.seq_len or run.model.max_seq_len) * self.spec.tokens_per_step
        )

    def _guess_step_s(self, trial: optuna.Trial, run: RunConfig) -> tuple[float, bool]:
        """A step's seconds before this trial measured it: the study's measured steps scaled by FLOPs (True),
        or an assumed utilisation of the machine's peak (False); the slower of the two, so as not to overshoot."""
        flops = self._flops_per_step(run)
        store(trial, flops_per_step=flops)
        assumed = STEP_OVERHEAD_S + flops / (ASSUMED_MFU * peak_flops(run.train.dtype)[0])
        records = [record_of(t) for t in trial.study.get_trials(deepcopy=False)]
        seen = [r.speed.step_s * flops / r.flops_per_step for r in records if r.speed and r.flops_per_step]
        return (max(assumed, statistics.median(seen)), True) if seen else (assumed, False)

    def _segment(
        self, trial: optuna.Trial, run: RunConfig, points: list[Point], until: int, resume: bool, confirming: bool
    ) -> TrainResult:
        """One training call, from the last checkpoint (resume) up to the first evaluation at or past `until`."""
        interval = self._interval(trial, run, points, until)
        cfg = replace(run.train, eval_interval=interval, log_interval=interval, keep_last=1)
        first = [True]

        def callback(metrics: dict[str, Any]) -> bool:
            points.append(
                Point(metrics["step"], metrics["elapsed"], metrics["tokens_per_sec"], metrics["val_loss"], first[0])
            )
            first[0] = False
            self.on_eval(metrics)
            return self.ticks(points, points[-1].step) >= until or self.deadlines.left(confirming) <= 0

        result = train(
            replace(run, train=cfg),
            resume=resume,
            overwrite=not resume,
            callback=callback,
            show_progress=False,
            data=self.data,
        )
        if result.val_loss is not None and (not points or result.step > points[-1].step):
            # The run ended between evaluations (its target): the trainer evaluated its last step itself.
            # With no log before the end (a target shorter than the first step's compilation, on a busy
            # machine), the speed is the whole call's, compilation included: slow, so rungs are not overshot.
            tps = result.tokens_per_sec or (
                points[-1].tokens_per_sec
                if points
                else result.step * self.spec.tokens_per_step / max(result.elapsed, 1e-9)
            )
            points.append(Point(result.step, result.elapsed, tps, result.val_loss, True))
        return result

    # --- the prediction ------------------------------------------------------------------------------

    def _record(self, trial: optuna.Trial, points: list[Point], reached: float, actual: float | None) -> float:
        """Fit the curve, predict the loss at the target, and keep it all on the trial; returns the
        measured loss at the target (`actual`) when the run got there, else the prediction."""
        speed = self.speed(points)
        s_target = self.steps_at_target(points)
        trials = trial.study.get_trials(deepcopy=False)
        mean, std, fit = predict(
            points,
            self.spec.base.train.warmup_steps,
            s_target,
            typical_exponent(trials),
            self.data.tokenizer.vocab_size,
        )
        if fit is not None:
            store(trial, fit=fit)
        if actual is not None:
            mean, std = actual, 0.0
            store(trial, actual=actual)
        predictions = {**(record_of(trial).predictions or {}), reached: (mean, std)}
        store(
            trial,
            points=tuple(points),
            speed=speed,
            fraction=1.0 if actual is not None else self.fraction(points),
            steps_at_target=s_target,
            predicted=mean,
            predicted_std=std,
            predictions=predictions,
            rung=reached,
            steps=points[-1].step,
        )
        return mean
