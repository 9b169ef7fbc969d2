"""What a target-aware search adds around its trials: which trials count towards --trials, whether there is
time for another, the confirmation of its best few, the choice of the winner, best.toml's header, and
the account of what the search spent."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from mlxllm.errors import MlxllmError
from mlxllm_search.objective import FREE, Objective
from mlxllm_search.space import SearchSpec
from mlxllm_search.storage import LOST, retried_numbers
from mlxllm_search.target import Deadlines

CONFIRMS = "confirms"  # user attr of a confirmation: the number of the trial it continues
TRIAL_START_S = 1.0  # building, compiling and evaluating a trial on top of its first rung's training
FREE_PER_TRIAL = 20  # a sampler that keeps proposing over-cap architectures is stopped after this many per trial


def _extra(t: FrozenTrial) -> bool:
    return bool(t.user_attrs.get(FREE)) or CONFIRMS in t.user_attrs


def uncounted(study: optuna.Study) -> int:
    """Trials that do not count towards --trials: rejected before training, and confirmations (lost ones, which
    storage.counts leaves out too, aside)."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    n = 0
    for t in trials:
        lost = t.state == TrialState.FAIL and (t.user_attrs.get(LOST) or t.number in retried)
        if _extra(t) and t.state != TrialState.WAITING and not lost:
            n += 1
    return n


def too_many_free(study: optuna.Study, target: int) -> bool:
    free = sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get(FREE))
    return free > FREE_PER_TRIAL * min(target, 1000) + 100


def time_for_a_trial(spec: SearchSpec, deadlines: Deadlines) -> bool:
    """Whether the exploration has time left for a trial's first rung (on a time target, its seconds)."""
    left = deadlines.left()
    plan = spec.plan
    if plan is None or spec.target is None or spec.target.kind != "seconds":
        return left > 0
    return left > TRIAL_START_S + 1.5 * plan.fractions[0] * spec.target.amount


def describe_plan(spec: SearchSpec, workers: int) -> str:
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
    done = {t.user_attrs[CONFIRMS] for t in study.get_trials(deepcopy=False) if CONFIRMS in t.user_attrs}
    explored = [
        t
        for t in _done(study)
        if CONFIRMS not in t.user_attrs
        and not t.user_attrs.get("cut")
        and t.user_attrs.get("rung", 0) >= plan.fractions[-1] * 0.999
    ]
    explored.sort(key=lambda t: t.values[0])
    out = []
    for t in explored[: plan.confirm_top]:
        cost = (plan.confirm_fraction - plan.fractions[-1]) * spec.target.amount if spec.target.kind == "seconds" else 0
        if t.number in done or deadlines.left(confirming=True) <= min(cost, 1.0):
            continue
        study.enqueue_trial(t.params, user_attrs={CONFIRMS: t.number})
        study.optimize(objective, n_trials=1, catch=(MlxllmError,), gc_after_trial=True)
        out.append(t.number)
    return out


def target_best(study: optuna.Study) -> FrozenTrial | None:
    """The winner: among the trials trained furthest towards the target (measured at it, or confirmed), the one
    with the lowest loss at the target; a prediction from a shorter run does not outrank a longer one."""
    done = [t for t in _done(study) if not t.user_attrs.get(FREE)]
    if not done:
        return None
    deepest = max(t.user_attrs.get("rung", 0) for t in done)
    return min((t for t in done if t.user_attrs.get("rung", 0) >= deepest * 0.999), key=lambda t: t.values[0])


def _loss_at_target(t: FrozenTrial) -> str:
    if t.user_attrs.get("actual") is not None:
        return f"measured {t.user_attrs['actual']:.4f}"
    return (
        f"predicted {t.user_attrs['predicted']:.4f} +- {t.user_attrs['predicted_std']:.4f} "
        f"(from {t.user_attrs['fraction']:.3g} of it)"
    )


def target_header(study: optuna.Study, spec: SearchSpec, t: FrozenTrial, path: object) -> str:
    target = spec.target
    assert target is not None
    cost = sum(x.user_attrs.get("seconds", 0.0) for x in study.get_trials(deepcopy=False))
    until = {"seconds": "train.max_seconds", "steps": "train.max_steps", "tokens": "train.max_tokens"}[target.kind]
    return (
        f"# Best configuration of search {study.study_name!r} for the target ({target.describe()} of training"
        f"{' on the machine that searched' if target.kind == 'seconds' else ''}): trial {t.number}, validation loss at the "
        f"target {_loss_at_target(t)}.\n"
        f"# The search's trials took {cost:,.0f} s in all. Train it: mlxllm train --config {path}\n"
        f"# It trains for the target ({until} = {target.amount:g}), with the schedule (warm-up, then cosine decay over "
        "the whole target), batch and context its trials were trained with.\n\n"
    )


def spent(study: optuna.Study, spec: SearchSpec, wall_s: float) -> str:
    """What the search cost: its wall clock against its budget, and its trials by outcome."""
    trials = study.get_trials(deepcopy=False)
    free = sum(1 for t in trials if t.user_attrs.get(FREE))
    confirms = sum(1 for t in trials if CONFIRMS in t.user_attrs and t.state == TrialState.COMPLETE)
    cut = sum(1 for t in trials if t.user_attrs.get("cut"))
    by = {
        s: sum(1 for t in trials if t.state == s and not _extra(t))
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    train_s = sum(t.user_attrs.get("seconds", 0.0) for t in trials)
    budget = f" of its {spec.settings.seconds:,.0f} s budget" if spec.settings.seconds else ""
    return (
        f"Search cost: {wall_s:,.0f} s wall clock{budget} in this run; the study's trials took {train_s:,.0f} s: "
        f"{by[TrialState.COMPLETE]} completed, {by[TrialState.PRUNED]} pruned, {by[TrialState.FAIL]} failed, "
        f"{confirms} confirmation(s), {cut} cut short by the time budget; {free} over the parameter cap, rejected "
        "before training (not counted as trials)."
    )
