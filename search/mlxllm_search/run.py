"""Run a search: open (or resume) the study, seed it, run workers (WorkerArgs) until it holds the requested trials,
write the best config."""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlxllm import data as data_mod
from mlxllm.config import load_config
from mlxllm.errors import MlxllmError

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from mlxllm_search.best import BEST_NAME, write_best
from mlxllm_search.deadlines import Deadlines
from mlxllm_search.display import LiveTrials, leaderboard, objective_names
from mlxllm_search.objective import Objective
from mlxllm_search.plan_search import plan_search
from mlxllm_search.records import StudyRecord
from mlxllm_search.space import SearchSpec
from mlxllm_search.spec import UNLIMITED_TRIALS, load_spec, make_target, with_target
from mlxllm_search.storage import (
    POLL_S,
    beats,
    counts,
    default_url,
    next_step,
    open_storage,
    sweep,
    taken_over,
    trial_gate,
)
from mlxllm_search.target import ETA, Target
from mlxllm_search.target_search import (
    confirm,
    describe_plan,
    spent,
    time_for_a_trial,
    too_many_free,
    uncounted,
)
from mlxllm_search.warmup import before_the_clock

META_NAME = "search.json"


@dataclass(frozen=True)
class SearchResult:
    study: optuna.Study
    search_dir: Path
    best_config: Path | None  # best.toml, ready for `mlxllm train --config`
    best_trials: list[FrozenTrial]  # the Pareto front (the one best trial for a single objective)
    requeued: list[int] = field(default_factory=list)  # trials of dead workers that were queued again
    seconds: float = 0.0  # wall clock this call spent
    confirmed: list[int] = field(default_factory=list)  # trials continued towards the target to confirm them


def make_sampler(spec: SearchSpec, seed: int | None) -> optuna.samplers.BaseSampler:
    if spec.settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.settings.startup_trials)


def make_pruner(spec: SearchSpec) -> optuna.pruners.BasePruner:
    """Pruners compare trials at the same step; resources are optimizer steps, first rung at the first evaluation."""
    name = spec.settings.pruner
    if name == "none" or spec.settings.multi:  # Optuna cannot prune on several objectives
        return optuna.pruners.NopPruner()
    first = spec.budget.eval_interval
    plan = spec.plan
    if plan is not None:  # rungs of the target: their resource is ms of the target run (or steps), as reported
        first = plan.ticks(plan.fractions[0])
        if name == "hyperband":
            return optuna.pruners.HyperbandPruner(
                min_resource=first, max_resource=plan.ticks(plan.fractions[-1]), reduction_factor=ETA
            )
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    steps = spec.budget.steps(spec.tokens_per_step)
    return optuna.pruners.HyperbandPruner(
        min_resource=first, max_resource=steps if steps is not None else "auto", reduction_factor=3
    )


def open_study(
    spec: SearchSpec, search_dir: Path, storage: str | None, study_name: str, seed: int | None, create: bool = True
) -> optuna.Study:
    """Create the study or load it; a study of the same name over another space is refused."""
    store = open_storage(storage, search_dir)
    kwargs: dict[str, Any] = dict(
        study_name=study_name, storage=store, sampler=make_sampler(spec, seed), pruner=make_pruner(spec)
    )
    if create:
        study = optuna.create_study(directions=spec.settings.directions, load_if_exists=True, **kwargs)
    else:
        study = optuna.load_study(**kwargs)
    want = spec.space_hash()
    have = StudyRecord.from_attrs(study.user_attrs)
    if have.space_hash is None and create:
        if study.get_trials(deepcopy=False):
            raise MlxllmError(
                f"The storage already holds a study named {study_name!r} that was not made by `mlxllm search`. "
                "Choose another --study-name or --storage."
            )
        made = StudyRecord(space_hash=want, spec=spec.source, objectives=list(spec.settings.objectives))
        for key, value in made.to_attrs().items():
            study.set_user_attr(key, value)
    elif have.space_hash != want:
        raise MlxllmError(
            f"The study {study_name!r} in {storage or default_url(search_dir)} was made with a different search "
            f"space, budget or objectives (from {have.spec or 'another spec'}), so its trials cannot be compared "
            "with this one's. Resume it with its own spec unchanged, or start a new study with --study-name or --out."
        )
    return study


@dataclass(frozen=True)
class WorkerArgs:
    """What a worker process is given (picklable: spawned workers receive it)."""

    spec: SearchSpec
    search_dir: Path
    storage: str | None  # the study's storage URL or journal path; None: the journal in search_dir
    study_name: str
    trials: int  # the trials the study should hold when the workers stop (rejections and confirmations aside)
    seed: int | None  # the sampler seed: the user's, which _run_workers turns into one per worker
    data_dir: Path  # the token data prepared once for every worker
    deadlines: Deadlines  # of the search's own time budget


def _work(args: WorkerArgs, live: LiveTrials | None = None) -> None:
    """One worker: take trials until the study holds `args.trials` of them (finished or running; rejections
    before training and confirmations not counted) or the search's time is up, each trained on the token
    data prepared once in args.data_dir. `live`: the table to refresh (in the main process only)."""
    spec, deadlines = args.spec, args.deadlines
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = open_study(spec, args.search_dir, args.storage, args.study_name, args.seed, create=False)
    sweep(study)
    gate = trial_gate(args.storage, args.search_dir, args.study_name)
    refresh = (lambda: live.update(study)) if live else None
    objective = Objective(
        spec,
        args.search_dir,
        data_mod.open_prepared(args.data_dir),
        on_trial_start=gate.release,
        on_eval=refresh,
        deadlines=deadlines,
    )
    beating = beats(args.storage)
    while True:
        if not time_for_a_trial(spec, deadlines) or too_many_free(study, args.trials):
            return
        with gate:
            step = next_step(study, args.trials + uncounted(study), beating)
            if step == "done":
                return
            try:
                if step == "run":
                    # A diverged trial (MlxllmError from the trainer) is recorded as FAIL and the search goes on.
                    study.optimize(objective, n_trials=1, catch=(MlxllmError,), gc_after_trial=True)
            except Exception:
                if not taken_over(study):  # Optuna refuses a late trial's results with assorted errors
                    raise
        if step == "wait":
            time.sleep(POLL_S)
        if refresh:
            refresh()


def _worker_main(args: WorkerArgs) -> None:
    """Entry point of a spawned worker process."""
    try:
        _work(args)
    except MlxllmError as e:
        print(f"Error in search worker: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def _sampler_seed(seed: int | None, n_trials: int, worker: int) -> int | None:
    """A seed per (user seed, study length, worker): a resumed study does not replay the samples it already has."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, n_trials, worker]).generate_state(1)[0])


def _seed_params(spec: SearchSpec, seed_configs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Trial parameters for the base config (when the space holds it) and each named config (which it must)."""
    base = spec.space.params_of(spec.base)
    out = [base] if base is not None else []
    for path in seed_configs:
        p = spec.space.params_of(load_config(path))
        if p is None:
            raise MlxllmError(
                f"The seed config {path} is not in the search space (its layers, head_dim, heads, KV heads, "
                "mlp_ratio, learning rate, dropout or weight decay is not among the space's values), so it cannot "
                "start the study. Widen [space] or leave it out."
            )
        out.append(p)
    return out


def _set_up(
    spec: SearchSpec, search_dir: Path, storage: str | None, name: str, seed: int | None, seeds: list[dict[str, Any]]
) -> tuple[optuna.Study, list[int]]:
    """Open the study, queue the lost trials of dead workers again and the seed trials, write search.json;
    returns the study and the requeued trials' numbers."""
    with trial_gate(storage, search_dir, name):  # one setup at a time, on every machine: seeds are queued once
        study = open_study(spec, search_dir, storage, name, seed)
        requeued = sweep(study)
        for params in seeds:
            study.enqueue_trial(params, skip_if_exists=True)
    objectives = list(spec.settings.objectives)
    meta = {"study_name": name, "storage": storage, "spec": spec.source, "objectives": objectives}
    (search_dir / META_NAME).write_text(json.dumps(meta, indent=2))
    return study, requeued


def _announce(
    console: LiveTrials,
    study: optuna.Study,
    spec: SearchSpec,
    storage: str | None,
    search_dir: Path,
    target: int,
    workers: int,
    requeued: list[int],
    n_fits: int,
) -> None:
    finished, running = counts(study)
    console.console.print(
        f"Study [bold]{study.study_name}[/] in {storage or default_url(search_dir)}: {finished} trials done"
        + (f", {len(requeued)} lost trial(s) of dead workers queued again" if requeued else "")
        + (
            f"; running until it holds {target} ({max(0, target - finished - running)} more)"
            if target < UNLIMITED_TRIALS
            else f"; running for {spec.settings.seconds:g} s"
        )
        + f" with {workers} worker(s). "
        f"Objectives: {objective_names(spec.settings.objectives)}; "
        + (
            describe_plan(spec, workers)
            if spec.target
            else f"budget {spec.budget.amount:g} {spec.budget.kind} per trial"
        )
        + f"; {n_fits} architectures within the caps.",
        highlight=False,
    )
    if spec.space.params_of(spec.base) is None:
        console.console.print(
            "The [base] config's architecture is not in the search space, so it does not seed the study.",
            highlight=False,
            markup=False,  # "[base]" is the spec's table, not a style
        )


def _run_workers(console: LiveTrials, study: optuna.Study, args: WorkerArgs, workers: int) -> None:
    """Run `workers` workers (in this process for one) until the study holds `args.trials` trials; each gets
    its own sampler seed from `args.seed`, the user's."""
    n_before = len(study.get_trials(deepcopy=False))
    per_worker = [replace(args, seed=_sampler_seed(args.seed, n_before, i)) for i in range(workers)]
    if workers == 1:
        _work(per_worker[0], console)
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(a,)) for a in per_worker]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        console.update(study)
        time.sleep(1.0)
    for p in procs:
        p.join()
    console.update(study)
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise MlxllmError(
            f"{len(bad)} search worker(s) exited with an error (exit codes {bad}); their message is above. "
            "Finished trials are kept in the study: fix the cause and run the same command again to resume."
        )


def _show_result(console: LiveTrials, study: optuna.Study, spec: SearchSpec, best: Path | None) -> None:
    console.console.print(leaderboard(study, spec.settings.objectives, console.objectives))
    if spec.settings.multi:
        front = sorted(study.best_trials, key=lambda t: t.number)
        console.console.print(f"Pareto front: trials {', '.join(str(t.number) for t in front)}")
    console.console.print(
        f"Best config: {best} (mlxllm train --config {best})"
        if best
        else "No trial finished within the caps, so there is no best config yet. Add trials or relax [search.caps].",
        highlight=False,
    )


def search(
    spec: str | Path | SearchSpec,
    *,
    out: str | Path | None = None,
    trials: int | None = None,
    workers: int = 1,
    storage: str | None = None,
    study_name: str | None = None,
    seed: int | None = None,
    seed_configs: Sequence[str | Path] = (),
    data: str | None = None,
    show: bool = True,
    target: Target | tuple[str, float] | None = None,
    search_seconds: float | None = None,
    planner: str | None = None,
) -> SearchResult:
    """Search architectures as `mlxllm search run` does; a second call with the same arguments resumes the study.

    `trials` is the total the study should hold when this returns (finished trials, not counting ones cut off by
    a dead worker, which are retried, nor architectures over the parameter cap, rejected before training), so
    re-running with a larger number adds the difference. `target`, e.g. ("seconds", 300), overrides the spec's
    [target]: the search then optimises the loss at the end of that run. `search_seconds` bounds the search's
    own wall clock (then `trials`, if given, bounds it too). `planner` (fit, curves, auto) overrides the
    [target]'s: how the loss at the target is predicted (target.Target.planner_for).
    """
    started = time.time()
    if not isinstance(spec, SearchSpec):
        spec = load_spec(spec, data=data)
    elif data is not None:
        spec = replace(spec, base=replace(spec.base, train=replace(spec.base.train, data=str(Path(data).resolve()))))
    if isinstance(target, tuple):
        target = make_target(*target)
    if target is not None or search_seconds is not None or planner is not None:
        spec = with_target(spec, target, search_seconds, planner)
    total = trials if trials is not None else spec.settings.trials
    seed = seed if seed is not None else spec.settings.seed
    if total < 1 or workers < 1:
        raise MlxllmError(f"--trials and --workers must be at least 1 (got {total} and {workers}).")
    search_dir = Path(out) if out is not None else Path("searches") / spec.name
    search_dir.mkdir(parents=True, exist_ok=True)
    name = study_name or spec.name
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    # The corpus is tokenized (and hashed) once here; every trial, in every worker, reuses these tokens.
    train = spec.base.train
    split = {"val_fraction": train.val_fraction, "val_spec": train.val_data, "mask_prompt": train.mask_prompt}
    prepared = data_mod.prepare(train.data, spec.base.tokenizer, quiet=not show, **split)
    data_mod.check_length(prepared, train.seq_len or spec.base.model.max_seq_len)
    fits = spec.check(prepared.tokenizer.vocab_size)  # caps no architecture can meet fail here, before any training
    warm = before_the_clock(spec, prepared, search_dir, show)
    started += warm.seconds
    fit = spec.planner == "fit"  # the fit planner designs its own trials, the seed configs' first
    study, requeued = _set_up(spec, search_dir, storage, name, seed, [] if fit else _seed_params(spec, seed_configs))
    console = LiveTrials(spec.settings.objectives + tuple(k for k, _ in spec.settings.caps.items()), show)
    if fit:  # the fit planner's trials, fit and plan (plan_search.py)
        if workers > 1 and show:  # each trial's speed is a point of the throughput fit: measured alone
            console.console.print("The fit planner trains its trials one at a time: --workers is not used.")
        best = search_dir / BEST_NAME
        plan_search(study, spec, search_dir, prepared, list(map(Path, seed_configs)), started, best, show, warm)
        return SearchResult(study, search_dir, best, [], requeued, time.time() - started)
    if show:
        _announce(console, study, spec, storage, search_dir, total, workers, requeued, len(fits))
    plan = spec.plan
    deadlines = Deadlines.start(spec.settings.seconds, plan.reserve_s if plan else 0.0, since=started)
    with console:
        args = WorkerArgs(spec, search_dir, storage, study.study_name, total, seed, prepared.directory, deadlines)
        _run_workers(console, study, args, workers)
        confirmed = confirm(
            study,
            spec,
            Objective(spec, search_dir, prepared, on_eval=lambda: console.update(study), deadlines=deadlines),
            deadlines,
        )
    best = write_best(study, spec, search_dir)
    if show:
        _show_result(console, study, spec, best)
        console.console.print(spent(study, spec, time.time() - started), highlight=False)
    return SearchResult(study, search_dir, best, study.best_trials, requeued, time.time() - started, confirmed)
