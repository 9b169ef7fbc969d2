"""One trial of the fit planner: its architecture trained once as a warmup-stable-decay run at the base's
learning rate, with a checkpoint at each of its branch steps, and from each a cooldown branch
(mlxllm.branch) that finishes the WSD run whose stable phase ends there; every finished run is a point
of the law L(N, D) (law_points.Point), measured at the cost of its cooldown alone.

The main run's own cooldown is the last point; it evaluates (and checkpoints) at every branch step, and evenly
between them, and stops early, at one of those checkpoints, when the trial's share of the search would not
cover going on and the branches still to train. Its steady training speed (windows without compilation),
evaluation and set-up costs are kept on the trial for the throughput fit and the design of the next trials.
Branch directories are removed once evaluated, the main run once its branches are.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mlxllm.branch import branch
from mlxllm.config import RunConfig
from mlxllm.data import TokenData
from mlxllm.schedule import length_for_stable
from mlxllm.trainer import TrainResult, train

import optuna

from mlxllm_search.deadlines import Deadlines
from mlxllm_search.design import Cost, Speeds, checkpoint_interval
from mlxllm_search.law_points import Point
from mlxllm_search.records import record_of, store
from mlxllm_search.repetition import part_of
from mlxllm_search.scaling import law_params
from mlxllm_search.space import Sample, SearchSpec, run_config
from mlxllm_search.storage import owner

SHARE_SLACK = 1.1  # a trial may run this much past its share before it stops going on


def train_run(run: RunConfig, data: TokenData, resume: bool, callback: Callable[[dict], bool] | None = None):
    """The fit planner's one call of the trainer (quiet, on the search's prepared tokens)."""
    return train(
        run,
        resume=resume,
        overwrite=not resume,
        callback=callback,
        show_progress=False,
        data=data,
    )


def main_run(spec: SearchSpec, sample: Sample, steps: list[int], out_dir: Path) -> RunConfig:
    """The trial's main run: WSD whose stable phase ends at the last branch step (its cooldown is the last
    point), evaluated and checkpointed at every branch step (and evenly between), each kept until branched."""
    run = run_config(spec, sample, out_dir)
    unit, total = checkpoint_interval(steps), length_for_stable(steps[-1], spec.base.train.cooldown_fraction)
    train_cfg = replace(
        run.train,
        schedule="wsd",
        max_steps=total,
        max_tokens=None,
        max_seconds=None,
        eval_interval=unit,
        log_interval=max(1, unit // 4),  # each evaluation's speed is then its window's last quarter, compiled
        keep_last=math.ceil(total / unit) + 1,
    )
    return replace(run, train=train_cfg)


@dataclass
class _Measures:
    """What the trial measured so far: (step, elapsed, tokens/s) of the main run's evaluations, the set-up
    seconds of each training call, and the finished points."""

    tokens_per_step: int
    prior: Cost
    evals: list[tuple[int, float, float]] = field(default_factory=list)
    overheads: list[float] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    compile_s: float = 0.0  # the main run's first call beyond its estimate: MLX compiling kernels new here

    def cost(self) -> Cost:
        """The trial's cost rates: measured where it has them, else the design's estimate."""
        if not self.evals:
            return self.prior
        step_s = self.tokens_per_step / statistics.median(e[2] for e in self.evals)
        gaps = [
            b[1] - a[1] - (b[0] - a[0]) * step_s for a, b in zip(self.evals, self.evals[1:]) if b[1] > a[1]
        ]  # the wall between two evaluations, less its training: the evaluation and checkpoint
        eval_s = max(0.0, statistics.median(gaps)) if gaps else self.prior.eval_s
        return Cost(step_s, eval_s, statistics.median(self.overheads) if self.overheads else self.prior.call_s)


@dataclass
class _Deadline:
    """When a trial stops going on (`at`, time.time()): its share of the search, moved later by what MLX's
    first compile of a kernel took in its first call (a new shape on this machine), never past the search's."""

    at: float
    search_end: float

    def __post_init__(self) -> None:
        self.at = min(self.at, self.search_end)

    def forgive(self, seconds: float) -> None:
        self.at = min(self.at + max(0.0, seconds), self.search_end)


class PlanTrial:
    """Callable for `study.optimize` on a trial the planner enqueued (its share_s and branch_steps set)."""

    def __init__(
        self,
        spec: SearchSpec,
        search_dir: Path,
        data: TokenData,
        deadlines: Deadlines,
        speeds: Callable[[], Speeds],
        on_eval: Callable[[], None] | None = None,
    ):
        """`speeds`: the design's speed estimates now (from the trials measured so far); `on_eval`: called
        at each evaluation (the live display)."""
        self.spec, self.search_dir, self.data, self.deadlines = spec, search_dir, data, deadlines
        self.speeds, self.on_eval = speeds, on_eval

    def __call__(self, trial: optuna.Trial) -> float:
        store(trial, worker=owner())  # before anything else: a sweep finds this trial if we die
        store(trial, lost=None)
        sample = self.spec.space.suggest(trial, self.spec.base)
        sample = replace(sample, model=replace(sample.model, vocab_size=self.data.tokenizer.vocab_size))
        model = sample.model
        record = record_of(trial)
        steps = sorted(record.branch_steps or [])
        if not steps or record.share_s is None:
            raise optuna.TrialPruned("not a trial of the plan (no branch steps): the fit planner enqueues its own")
        trial_dir = self.search_dir / "trials" / f"{trial.number:04d}"
        store(
            trial,
            model={k: v for k, v in asdict(model).items() if k != "vocab_size"},
            learning_rate=sample.learning_rate,
            weight_decay=sample.weight_decay,
            params=model.num_params(),
            run_dir=str(trial_dir),
        )
        deadline = _Deadline(time.time() + record.share_s * SHARE_SLACK, time.time() + self.deadlines.left())
        measures = _Measures(self.spec.tokens_per_step, self.speeds().cost(model))
        data = self.data
        if record.unique_tokens is not None:  # the repetition trial: its runs repeat a part of the corpus
            data = part_of(data, record.unique_tokens, self.spec.base.train.seq_len or model.max_seq_len)
        start = time.perf_counter()
        try:
            run = main_run(self.spec, sample, steps, trial_dir / "main")
            self._train(trial, run, steps, deadline, measures, data)
        except KeyboardInterrupt:
            store(trial, lost="interrupted")  # retried when the search resumes
            raise
        finally:
            store(trial, seconds=time.perf_counter() - start)
            shutil.rmtree(trial_dir, ignore_errors=True)  # its points are on the trial; the runs are spent
        points = sorted(measures.points, key=lambda p: p.step)
        cost = measures.cost()
        store(
            trial,
            law_points=tuple(points),
            tokens_per_sec=self.spec.tokens_per_step / cost.step_s,
            eval_s=cost.eval_s,
            overhead_s=cost.call_s,
        )
        if not points:
            store(trial, cut="the search budget ended before the first branch")
            raise optuna.TrialPruned("no finished run within the trial's share of the search")
        store(trial, val_loss=points[-1].loss, steps=points[-1].step)
        return points[-1].loss

    def _point(self, trial: optuna.Trial, run: RunConfig, result: TrainResult, data: TokenData) -> Point:
        """The finished run `result` of `run` (the main run or a branch, trained on `data`) as a point of
        the law."""
        if result.val_loss is None or not math.isfinite(result.val_loss):
            raise optuna.TrialPruned(f"trial {trial.number}'s run of {result.step} steps ended without a finite loss")
        n = law_params(replace(run.model, vocab_size=self.data.tokenizer.vocab_size))
        tokens = float(result.step * self.spec.tokens_per_step)
        unique = None if data is self.data else float(len(data.train))
        return Point(
            trial.number, n, tokens, result.val_loss, result.step, run.train.warmup_steps, unique_tokens=unique
        )

    def _train(
        self, trial: optuna.Trial, run: RunConfig, steps: list[int], deadline: _Deadline, m: _Measures, data: TokenData
    ) -> None:
        """The main run, then its branches, longest first, while the trial's time lasts (trained on `data`)."""
        f, every = run.train.cooldown_fraction, checkpoint_interval(steps)
        began = time.perf_counter()

        def on_eval(metrics: dict[str, Any]) -> bool:
            m.evals.append((metrics["step"], metrics["elapsed"], metrics["tokens_per_sec"]))
            if self.on_eval:
                self.on_eval()
            step = metrics["step"]
            if len(m.evals) == 1:  # the set-up and first steps beyond their estimate were the compiler's
                cost = m.cost()
                m.compile_s = max(0.0, time.perf_counter() - began - m.prior.call_s - step * cost.step_s - cost.eval_s)
                deadline.forgive(m.compile_s)
            if step >= steps[-1]:
                return False  # the last cooldown is under way: finish it
            cost, nxt = m.cost(), next(s for s in steps if s > step)
            ahead = (nxt - step) * cost.step_s + (nxt - step) / every * cost.eval_s
            if nxt == steps[-1]:
                ahead += (run.train.max_steps - nxt) * (cost.step_s + cost.eval_s / every)
            ahead += sum(cost.branch_s(s, f) for s in steps if s < nxt and s != steps[-1])
            return time.time() + ahead > deadline.at

        result = train_run(run, data, resume=False, callback=on_eval)
        cost = m.cost()
        evals = math.ceil(result.step / every)
        wall = time.perf_counter() - began - m.compile_s  # the set-up of a call, not the compiler's first pass
        m.overheads.append(max(0.0, wall - result.step * cost.step_s - evals * cost.eval_s))
        if result.step >= run.train.max_steps:
            m.points.append(self._point(trial, run, result, data))
            todo = steps[:-1]
        else:  # stopped early at a checkpoint: branch from it too
            todo = sorted({s for s in steps if s <= result.step} | {result.step})
        main_dir = Path(run.train.out_dir)
        for s in sorted(todo, reverse=True):
            if time.time() + m.cost().branch_s(s, f) > deadline.at:
                continue
            b = branch(main_dir, s, main_dir.parent / f"branch-{s:06d}", overwrite=True)
            k = b.train.max_steps  # evaluated once, at its end
            b = replace(b, train=replace(b.train, eval_interval=k, log_interval=max(1, (k - s) // 2)))
            began = time.perf_counter()
            result = train_run(b, data, resume=True)
            cost = m.cost()
            m.overheads.append(max(0.0, time.perf_counter() - began - (k - s) * cost.step_s - cost.eval_s))
            m.points.append(self._point(trial, b, result, data))
            shutil.rmtree(main_dir.parent / f"branch-{s:06d}", ignore_errors=True)
