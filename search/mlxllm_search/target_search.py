"""What a target-aware search adds around its trials: which trials count towards --trials, whether there is
time for another, the confirmation of its best few, the choice of the winner, best.toml's header, and
the account of what the search spent."""

from __future__ import annotations

from mlxllm.errors import MlxllmError

import optuna
from optuna.trial import FrozenTrial, TrialState

from mlxllm_search.deadlines import Deadlines
from mlxllm_search.objective import Objective
from mlxllm_search.records import TrialRecord, record_of
from mlxllm_search.space import SearchSpec
from mlxllm_search.storage import retried_numbers

TRIAL_START_S = 1.0  # building, compiling and evaluating a trial on top of its first rung's training
FREE_PER_TRIAL = 20  # a sampler that keeps proposing over-cap architectures is stopped after this many per trial


def _extra(r: TrialRecord) -> bool:
    """Whether a trial is one of those --trials does not count: rejected before training, or a confirmation."""
    return bool(r.free) or r.confirms is not None


def uncounted(study: optuna.Study) -> int:
    """Trials that do not count towards --trials: rejected before training, and confirmations (lost ones, which
    storage.counts leaves out too, aside)."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    n = 0
    for t in trials:
        r = record_of(t)
        lost = t.state == TrialState.FAIL and (r.lost or t.number in retried)
        if _extra(r) and t.state != TrialState.WAITING and not lost:
            n += 1
    return n


def too_many_free(study: optuna.Study, target: int) -> bool:
    """Whether the sampler has proposed too many over-cap architectures for a study of `target` trials."""
    free = sum(1 for t in study.get_trials(deepcopy=False) if record_of(t).free)
    return free > FREE_PER_TRIAL * min(target, 1000) + 100


def time_for_a_trial(spec: SearchSpec, deadlines: Deadlines) -> bool:
    """Whether the exploration has time left for a trial's first rung (on a time target, its seconds)."""
    left = deadlines.left()
    plan = spec.plan
    if plan is None or spec.target is None or spec.target.kind != "seconds":
        return left > 0
    return left > TRIAL_START_S + 1.5 * plan.fractions[0] * spec.target.amount


def describe_plan(spec: SearchSpec, workers: int) -> str:
    """The rungs and confirmations of a target-aware search, in words (`workers` on this machine)."""
    plan, target = spec.plan, spec.target
    assert plan is not None and target is not None
    rungs = ", ".join(f"{f:.3g}" for f in plan.fractions)
    text = f"target {target.describe()}, trials trained to rungs at {rungs} of it"
    if plan.confirm_top:
        text += (
            f", the best {plan.confirm_top} then to {plan.confirm_fraction:.3g} ({plan.reserve_s:,.0f} s kept for that)"
        )
    if workers > 1 and target.kind == "seconds":
        text += (
            " (several workers share this machine's cores: each measures the speed it gets while sharing, "
            "so the steps a trial reaches by a rung are those of a shared machine)"
        )
    return text


def _done(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials within the caps."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not any(v > 0 for v in t.constraints.values())
    ]


def confirm(study: optuna.Study, spec: SearchSpec, objective: Objective, deadlines: Deadlines) -> list[int]:
    """Continue the best few explored trials (by predicted loss at the target) from their longest rung to the
    confirmation fraction, in this process, while the search's time lasts; returns the trials confirmed."""
    plan = spec.plan
    if plan is None or not plan.confirm_top:
        return []
    done = {r.confirms for t in study.get_trials(deepcopy=False) if (r := record_of(t)).confirms is not None}
    explored = [
        t
        for t in _done(study)
        if (r := record_of(t)).confirms is None and not r.cut and (r.rung or 0) >= plan.fractions[-1] * 0.999
    ]
    explored.sort(key=lambda t: t.values[0])
    out = []
    for t in explored[: plan.confirm_top]:
        cost = (plan.confirm_fraction - plan.fractions[-1]) * spec.target.amount if spec.target.kind == "seconds" else 0
        if t.number in done or deadlines.left(confirming=True) <= min(cost, 1.0):
            continue
        study.enqueue_trial(t.params, user_attrs=TrialRecord(confirms=t.number).to_attrs())
        study.optimize(objective, n_trials=1, catch=(MlxllmError,), gc_after_trial=True)
        out.append(t.number)
    return out


def target_best(study: optuna.Study) -> FrozenTrial | None:
    """The winner: among the trials trained furthest towards the target (measured at it, or confirmed), the one
    with the lowest loss at the target; a prediction from a shorter run does not outrank a longer one."""
    done = [t for t in _done(study) if not record_of(t).free]
    if not done:
        return None
    deepest = max(record_of(t).rung or 0 for t in done)
    return min((t for t in done if (record_of(t).rung or 0) >= deepest * 0.999), key=lambda t: t.values[0])


def _loss_at_target(r: TrialRecord) -> str:
    if r.actual is not None:
        return f"measured {r.actual:.4f}"
    return f"predicted {r.predicted:.4f} +- {r.predicted_std:.4f} (from {r.fraction:.3g} of it)"


def target_header(study: optuna.Study, spec: SearchSpec, t: FrozenTrial, path: object) -> str:
    """best.toml's header for the winner `t` of a target-aware search, written to `path`."""
    target = spec.target
    assert target is not None
    cost = sum(record_of(x).seconds or 0.0 for x in study.get_trials(deepcopy=False))
    until = {"seconds": "train.max_seconds", "steps": "train.max_steps", "tokens": "train.max_tokens"}[target.kind]
    return (
        f"# Best configuration of search {study.study_name!r} for the target ({target.describe()} of training"
        f"{' on the machine that searched' if target.kind == 'seconds' else ''}): trial {t.number}, validation loss "
        f"at the target {_loss_at_target(record_of(t))}.\n"
        f"# The search's trials took {cost:,.0f} s in all. Train it: mlxllm train --config {path}\n"
        f"# It trains for the target ({until} = {target.amount:g}), with the schedule (warm-up, then cosine decay over "
        "the whole target), batch and context its trials were trained with.\n\n"
    )


def spent(study: optuna.Study, spec: SearchSpec, wall_s: float) -> str:
    """What the search cost: its wall clock against its budget, and its trials by outcome."""
    trials = study.get_trials(deepcopy=False)
    records = [record_of(t) for t in trials]
    free = sum(1 for r in records if r.free)
    confirms = sum(1 for t, r in zip(trials, records) if r.confirms is not None and t.state == TrialState.COMPLETE)
    cut = sum(1 for r in records if r.cut)
    by = {
        s: sum(1 for t, r in zip(trials, records) if t.state == s and not _extra(r))
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    train_s = sum(r.seconds or 0.0 for r in records)
    budget = f" of its {spec.settings.seconds:,.0f} s budget" if spec.settings.seconds else ""
    return (
        f"Search cost: {wall_s:,.0f} s wall clock{budget} in this run; the study's trials took {train_s:,.0f} s: "
        f"{by[TrialState.COMPLETE]} completed, {by[TrialState.PRUNED]} pruned, {by[TrialState.FAIL]} failed, "
        f"{confirms} confirmation(s), {cut} cut short by the time budget; {free} over the parameter cap, rejected "
        "before training (not counted as trials)."
    )
