"""The fit planner of a target-aware search: trials designed across the space's sizes (design.py), each a WSD
run and its cooldown branches (branches.py), and when the run is data-limited the repetition trial on a part
of the corpus (repetition.py); then the scaling law fitted across them and the plan for the target it makes
(forecast.py): plan.json, best.toml (the pick for T, trained with the schedule the points were measured
with), and the plan printed; or, when the points cannot pin the law, the pick is too loose to trust or no
better than the base as far as the fit can tell (plan_gates.py), the paragraph that says so, and best.toml
the base config.

Trials run one at a time in this process, each enqueued in the study (so it lives there, in a journal or a
shared PostgreSQL storage, like any other trial) just before it trains: the design of the next trial uses
the speeds the last ones measured. A resumed search reuses the points of the trials it already holds.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mlxllm.config import ModelConfig, dump_toml, load_config
from mlxllm.data import TokenData
from mlxllm.device import peak_flops
from mlxllm.errors import MlxllmError

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from mlxllm_search.branches import PlanTrial
from mlxllm_search.deadlines import Deadlines
from mlxllm_search.design import (
    GOOD_LEVELS,
    MAX_TRIALS,
    Choice,
    Measured,
    Speeds,
    choose,
    first_unit,
    floor_unit,
)
from mlxllm_search.forecast import Forecast, make_forecast, render
from mlxllm_search.law_points import MIN_TRIALS, Point, first_step, in_law, refusal
from mlxllm_search.pair_floor import pair_floor
from mlxllm_search.plan_gates import no_better, too_loose
from mlxllm_search.plan_lines import say, trial_line, trial_plan, unaffordable
from mlxllm_search.records import TrialRecord, record_of
from mlxllm_search.regularisers import held
from mlxllm_search.repetition import repetition_choice, target_epochs
from mlxllm_search.space import Choice as ChoiceDim
from mlxllm_search.space import Sample, SearchSpec, Space, run_config
from mlxllm_search.target_search import spent
from mlxllm_search.throughput import RunLength, fit_throughput, model_key
from mlxllm_search.warmup import WarmUp

PLAN_NAME = "plan.json"
FIT_RESERVE_S = 3.0  # of the search's seconds, kept for the fit, plan.json and best.toml after the trials


def architecture(spec: SearchSpec, model: ModelConfig, vocab_size: int) -> ModelConfig | None:
    """A run config's architecture as the space builds it (so that it is one of plan_candidates), or None if
    the space does not hold it (with the plan's learning rate, dropout and weight decay)."""
    if spec.space.params_of(run_config(spec, plan_sample(spec, model), spec.base.train.out_dir)) is None:
        return None
    built = Space.build(
        spec.base.model, model.n_layers, model.head_dim, model.n_heads, model.n_heads // model.kv_heads, model.mlp_ratio
    )
    return replace(built, vocab_size=vocab_size, dropout=plan_sample(spec, built).model.dropout)


def plan_candidates(spec: SearchSpec, vocab_size: int) -> list[ModelConfig]:
    """Every architecture of the space's grid within the parameter cap whose shape the law holds for
    (law_points.in_law; all of them where none is, and the base architecture always), with the tokenizer's
    vocabulary (and the plan's dropout): the trials' and the pick's."""
    cap = spec.settings.caps.params
    out: dict[str, ModelConfig] = {}
    for m in spec.space.grid(spec.base.model):
        m = replace(plan_sample(spec, m).model, vocab_size=vocab_size)
        if cap is None or m.num_params() <= cap:
            out.setdefault(model_key(m), m)
    base = architecture(spec, spec.base.model, vocab_size)
    keep = {model_key(base)} if base is not None else set()
    shaped = [m for k, m in out.items() if in_law(m) or k in keep]
    return shaped if any(in_law(m) for m in shaped) else list(out.values())


def plan_learning_rate(spec: SearchSpec) -> float:
    """Every plan trial's learning rate: the base's (the law is over size and length), or the space's value
    nearest it when the space's learning rates leave it out."""
    lr, dim = spec.base.train.learning_rate, spec.space.learning_rate
    if dim is None or dim.contains(lr):
        return lr
    if isinstance(dim, ChoiceDim):
        return min(dim.values, key=lambda v: abs(math.log(v / lr)))
    return min(max(lr, dim.low), dim.high)


def plan_sample(spec: SearchSpec, model: ModelConfig) -> Sample:
    """What a plan trial of `model` trains with: the plan's learning rate, and dropout and weight decay held as it
    (the law is over size and length, not regularisation): the base's, or the space's values nearest them."""
    dropout = held(spec.space.dropout, spec.base.model.dropout)
    decay = held(spec.space.weight_decay, spec.base.train.weight_decay)
    return Sample(replace(model, dropout=dropout), plan_learning_rate(spec), decay)


def held_regularisers(spec: SearchSpec) -> dict[str, float] | None:
    """The regularisers the space searches and the plan holds, with the values it holds them at (None: none)."""
    sample = plan_sample(spec, spec.base.model)
    values = {"dropout": sample.model.dropout, "weight_decay": sample.weight_decay}
    out = {k: v for k, v in values.items() if getattr(spec.space, k) is not None}
    return out or None


def trial_params(spec: SearchSpec, model: ModelConfig) -> dict[str, Any]:
    """The Optuna parameters of a plan trial of `model` (the space's suggest returns them)."""
    params = spec.space.params_of(run_config(spec, plan_sample(spec, model), spec.base.train.out_dir))
    assert params is not None, "plan candidates are built by the space"
    return params


def plan_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials of the fit planner (enqueued with their branch steps)."""
    return [t for t in study.get_trials(deepcopy=False) if record_of(t).branch_steps]


def _model(r: TrialRecord, vocab_size: int) -> ModelConfig:
    return ModelConfig(**{**(r.model or {}), "vocab_size": vocab_size})


def measured(study: optuna.Study, vocab_size: int) -> list[tuple[ModelConfig, TrialRecord]]:
    """The plan trials that finished with points, and what they measured."""
    out = []
    for t in plan_trials(study):
        r = record_of(t)
        if t.state == TrialState.COMPLETE and r.law_points and r.tokens_per_sec and r.model:
            out.append((_model(r, vocab_size), r))
    return out


def speeds(
    spec: SearchSpec, done: list[tuple[ModelConfig, TrialRecord]], peak: float, timed: tuple[Measured, ...] = ()
) -> Speeds:
    """The design's speeds: the trials' measurements, and `timed` (the warm-up's speed of the base)."""
    train = spec.base.train
    seen = tuple(Measured(m, r.tokens_per_sec or 0.0, r.eval_s or 0.0, r.overhead_s or 0.0) for m, r in done)
    return Speeds(
        train.seq_len or spec.base.model.max_seq_len, spec.tokens_per_step, train.eval_batches, peak, seen + timed
    )


def _next_trials(
    spec: SearchSpec,
    candidates: list[ModelConfig],
    first: list[ModelConfig],
    sized: list[ModelConfig],
    tried: list[ModelConfig],
    rates: Speeds,
    left: float,
    epochs: float | None,
    unique_tokens: int,
    unit: int,
    unusable: int = 0,
) -> tuple[list[Choice], int | None]:
    """(the trials still to run, the first one next; the tokens of its part of the corpus when it is the
    repetition trial, else None). With `epochs` (the plan wants a repetition trial), the sizes are designed in
    the time left less a share for it, or in all of it when that leaves them fewer than GOOD_LEVELS branch
    points (or none affordable) or the share would not afford it; once MIN_TRIALS of them have usable points,
    the repetition trial gets what is left, or where it cannot, one more size. `unit`: the first branch step
    (design.floor_unit); `unusable`: the sized trials with no point the fit takes (design.choose)."""
    train = spec.base.train

    def design(seconds: float) -> list[Choice]:
        return choose(
            candidates, first, sized, rates, seconds, unit, train.cooldown_fraction, train.warmup_steps, tried, unusable
        )

    f, to_run = train.cooldown_fraction, max(1, MAX_TRIALS - len(tried))
    if epochs is not None and len(sized) - unusable >= MIN_TRIALS:
        rep = repetition_choice(sized, rates, left, unit, f, epochs, unique_tokens)
        return ([rep[0]], rep[1]) if rep else (design(left), None)  # unaffordable: the time goes to the sizes
    choices = design(left * to_run / (to_run + 1)) if epochs else []
    # The share is kept only where the sizes still get GOOD_LEVELS beside it (a tight search needs their
    # points for any fit at all; without the trial R* is assumed) and the repetition trial of them affords it.
    rep_share = left / (to_run + 1)
    if choices and (
        min(c.ladder.levels for c in choices) < GOOD_LEVELS
        or not repetition_choice([c.model for c in choices], rates, rep_share, unit, f, epochs or 1, 1)
    ):
        choices = []
    return choices or design(left), None


def run_trials(
    study: optuna.Study,
    spec: SearchSpec,
    search_dir: Path,
    data: TokenData,
    deadlines: Deadlines,
    first: list[ModelConfig],
    console: Console | None,
    timed: tuple[Measured, ...] = (),
    floor: float | None = None,
) -> None:
    """Design, enqueue and train plan trials one by one until the design has none left in the search's time:
    the sizes, then, when the plan is data-limited, the repetition trial (repetition.py) with the share kept
    for it. `timed`: speeds measured before the trials (the warm-up's of the base); `floor`: the pairs level a
    point must end below for the fit to take it (a trial with none such is replaced while time allows)."""
    vocab, train = data.tokenizer.vocab_size, spec.base.train
    candidates = plan_candidates(spec, vocab)
    peak, shortest = peak_flops(train.dtype)[0], first_unit(train.warmup_steps, train.cooldown_fraction)
    objective = PlanTrial(spec, search_dir, data, deadlines, lambda: speeds(spec, measured(study, vocab), peak, timed))
    assert spec.target is not None
    length = RunLength(spec.target.kind, float(spec.target.amount), spec.tokens_per_step)
    while deadlines.left() > 0:
        trials = [record_of(t) for t in plan_trials(study)]
        tried = [_model(r, vocab) for r in trials if r.model and r.unique_tokens is None]
        done = measured(study, vocab)
        sized = [m for m, r in done if r.unique_tokens is None]
        runs = [r.law_points or () for _, r in done if r.unique_tokens is None]
        unusable = sum(all(refusal(p, floor=floor) for p in ps) for ps in runs)
        unit = floor_unit(shortest, train.cooldown_fraction, runs, floor)
        rates, left = speeds(spec, done, peak, timed), deadlines.left()
        epochs = None
        if not any(r.unique_tokens is not None for r in trials):
            epochs = target_epochs(candidates, rates, length, float(len(data.train)))
        choices, part = _next_trials(
            spec, candidates, first, sized, tried, rates, left, epochs, len(data.train), unit, unusable
        )
        if not choices:
            return
        keys = {model_key(c.model) for c in choices}
        if console is not None and first and not tried and model_key(first[0]) not in keys:
            say(console, unaffordable(first[0], rates, choices[0], left, unit, train.cooldown_fraction))
        if console is not None:
            what = f"next: {trial_plan(choices[0])}"
            if part is not None:
                what = (
                    f"the repetition trial, on {part:,} tokens of the corpus' {len(data.train):,} (its longest run "
                    f"{choices[0].ladder.lengths[-1] * spec.tokens_per_step / part:.3g} passes over them, as the run "
                    f"at T would make about {epochs:.3g} over the corpus): {trial_plan(choices[0])}"
                )
            say(console, f"Plan: {len(choices)} more trial(s) in {left:.0f} s; {what}.")
        c = choices[0]
        attrs = TrialRecord(share_s=c.share_s, branch_steps=list(c.ladder.steps), unique_tokens=part).to_attrs()
        study.enqueue_trial(trial_params(spec, c.model), user_attrs=attrs)
        study.optimize(objective, n_trials=1, catch=(MlxllmError,), gc_after_trial=True)
        if console is not None:
            say(console, trial_line(plan_trials(study)[-1]))


def forecast(
    study: optuna.Study, spec: SearchSpec, data: TokenData, search_seconds: float, floor: float | None = None
) -> Forecast:
    """The plan from every plan trial's points, for every candidate architecture (`floor`: pair_floor's level,
    below which a point must end to count)."""
    vocab, train, target = data.tokenizer.vocab_size, spec.base.train, spec.target
    assert target is not None
    done = measured(study, vocab)
    points: list[Point] = [p for _, r in done for p in r.law_points or ()]
    seq_len = train.seq_len or spec.base.model.max_seq_len
    # The target run's own speed: training steps and its evaluations every eval_interval (compilation aside).
    rates = [
        (
            m,
            spec.tokens_per_step
            / (spec.tokens_per_step / (r.tokens_per_sec or 1.0) + (r.eval_s or 0.0) / train.eval_interval),
        )
        for m, r in done
    ]
    if not rates:  # nothing measured: a forecast without points is the shortfall paragraph alone
        rates = [(replace(spec.base.model, vocab_size=vocab), 1.0)]
    length = RunLength(target.kind, float(target.amount), spec.tokens_per_step)
    return make_forecast(
        points,
        float(len(data.train)),
        plan_candidates(spec, vocab),
        fit_throughput(rates, seq_len),
        length,
        search_seconds,
        held=held_regularisers(spec),
        floor=floor,
    )


def _comment(text: str, wrap: bool = True) -> str:
    """`text` as TOML comment lines: each paragraph wrapped (`wrap`), else each line as it is (a table)."""
    lines = [w for para in text.splitlines() for w in (textwrap.wrap(para, 116) if wrap else [para]) or [""]]
    return "".join(f"# {line}\n" for line in lines)


def write_plan(
    study: optuna.Study, spec: SearchSpec, search_dir: Path, plan: Forecast, path: Path, loose: str | None = None
) -> Path:
    """plan.json, and best.toml at `path`: the pick for the target with the WSD schedule its prediction is
    of; or the base config, the reason as its header, when there is no fit or `loose` says why not to act on
    it (plan_gates)."""
    (search_dir / PLAN_NAME).write_text(json.dumps({**plan.to_dict(), "loose": loose}, indent=2))
    best = plan.pick(1.0)
    if best is None or loose:
        run = run_config(spec, Sample.of(spec.base), search_dir / "best")
        why = plan.shortfall if best is None else loose
        header = (
            f"Search {study.study_name!r} planned no run: {why}\nThis is the base config, unchanged. "
            f"Train it: mlxllm train --config {path}"
        )
        table = "" if best is None else _comment("The plan it did not act on:\n" + render(plan), wrap=False)
        path.write_text(_comment(header) + table + "\n" + dump_toml(run))
        return path
    run = run_config(spec, plan_sample(spec, best.model), search_dir / "best")
    run = replace(run, train=replace(run.train, schedule="wsd"))
    law = plan.law
    assert law is not None
    header = (
        f"Plan of search {study.study_name!r} for a run of {plan.length.describe()}: a law L(N, D) fitted to "
        f"{law.points} finished WSD runs of {law.trials} trials (see {PLAN_NAME}). This config is the pick for "
        f"that run, trained with the WSD schedule (cooldown_fraction {run.train.cooldown_fraction:g}) the "
        "prediction is of; predictions are +- 2 sd."
    )
    tail = f"law: {law.describe()}\nTrain it: mlxllm train --config {path}"
    path.write_text(_comment(header) + _comment(render(plan), wrap=False) + _comment(tail) + "\n" + dump_toml(run))
    return path


def plan_search(
    study: optuna.Study,
    spec: SearchSpec,
    search_dir: Path,
    data: TokenData,
    seed_configs: list[Path],
    started: float,
    best_path: Path,
    show: bool,
    warm: WarmUp | None = None,
) -> Forecast:
    """The whole fit planner after set-up (begun at `started`, time.time()): trials, fit, plan.json and best.toml
    at `best_path`, the plan printed (`show`). `seed_configs`: run configs whose architectures are trained first,
    after the base's; `warm`: the warm-up, whose speed of the base the first trial is designed on."""
    console = Console(width=160) if show else None
    deadlines = Deadlines.start(spec.settings.seconds, FIT_RESERVE_S, since=started)
    vocab = data.tokenizer.vocab_size
    first = [m for m in (architecture(spec, load_config(p).model, vocab) for p in seed_configs) if m is not None]
    base = architecture(spec, spec.base.model, vocab)
    cap = spec.settings.caps.params
    if base is not None and (cap is None or base.num_params() <= cap):
        first.insert(0, base)
    elif console is not None:
        say(console, "The base architecture is not in the search space (or over its caps): it is not trial 0.")
    if console is not None:
        train = spec.base.train
        unit = first_unit(train.warmup_steps, train.cooldown_fraction)
        say(
            console,
            f"Planner: fit. Each trial is a WSD run (cooldown {train.cooldown_fraction:g}) with cooldown branches; "
            f"the shortest finished run the fit admits is {first_step(train.warmup_steps)} steps "
            f"(warm-up {train.warmup_steps}), a branch from step {unit}.",
        )
    floor = pair_floor(data)
    timed = ()
    if warm is not None and warm.tokens_per_sec and base is not None:
        timed = (Measured.timed(base, warm.tokens_per_sec, spec.tokens_per_step, spec.base.train.eval_batches),)
    run_trials(study, spec, search_dir, data, deadlines, first, console, timed, floor)
    plan = forecast(study, spec, data, time.time() - started, floor)
    assert spec.target is not None
    loose = too_loose(plan, spec.target.max_2sd, time.time() - started) or no_better(plan, base, spec.target.switch_sd)
    write_plan(study, spec, search_dir, plan, best_path, loose)
    if console is not None:
        say(console, render(plan))
        if loose:
            say(console, loose + " best.toml is the base config.")
        say(console, f"Best config: {best_path} (mlxllm train --config {best_path})")
        say(console, spent(study, spec, time.time() - started))
    return plan
