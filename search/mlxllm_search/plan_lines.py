"""The fit planner's lines on the console as it goes: each trial designed, the base when it is not among
them, and each trial trained; and how they are printed (`say`)."""

from __future__ import annotations

from mlxllm.config import ModelConfig

from optuna.trial import FrozenTrial
from rich.console import Console

from mlxllm_search.design import MIN_LEVELS, Choice, Ladder, Speeds
from mlxllm_search.plan_gates import shape
from mlxllm_search.records import record_of
from mlxllm_search.scaling import law_params


def say(console: Console, text: str) -> None:
    """Print one of the planner's lines as it is: its paragraphs name settings such as "[target] max_2sd",
    which Rich's markup would take for a style and drop."""
    console.print(text, highlight=False, markup=False)


def trial_plan(c: Choice) -> str:
    """A designed trial: its architecture, finished lengths and seconds."""
    m = c.model
    lengths = ", ".join(map(str, c.ladder.lengths))
    return (
        f"{shape(m)} ({law_params(m) / 1e6:.3g}M law parameters): finished runs of {lengths} steps, "
        f"about {c.cost_s:.0f} s of its {c.share_s:.0f} s share"
    )


def unaffordable(m: ModelConfig, rates: Speeds, c: Choice, seconds: float, unit: int, fraction: float) -> str:
    """Why the base architecture is not among the trials designed (`c` the first of them, `seconds` left):
    its shortest usable trial against a trial's share."""
    ladder = Ladder(unit, MIN_LEVELS, fraction)
    need = rates.cost(m).seconds(ladder)
    return (
        f"The base architecture ({shape(m)}, {m.num_params() / 1e6:.3g}M parameters) is not among the trials "
        f"designed: its shortest usable trial (finished runs of {' and '.join(map(str, ladder.lengths))} steps) "
        f"would take about {need:.0f} s at the speed estimated, more than a trial's share ({c.share_s:.0f} s of "
        f"{seconds:.0f} s left). Unless a later design affords it, its loss at the target is predicted by the fit."
    )


def trial_line(t: FrozenTrial) -> str:
    """A trained trial: its finished runs' losses, speed and seconds."""
    r = record_of(t)
    m = r.model or {}
    pts = r.law_points or ()
    losses = ", ".join(f"{p.step}: {p.loss:.4f}" for p in pts)
    return (
        f"trial {t.number} {t.state.name.lower()}: {shape(m) if m else '-'}, "
        f"{len(pts)} finished runs ({losses or 'none'}), {r.tokens_per_sec or 0:,.0f} tokens/s, "
        + (f"on {r.unique_tokens:,} tokens of the corpus, " if r.unique_tokens else "")
        + f"{r.seconds or 0:.1f} s"
        + (f" ({r.cut})" if r.cut else "")
    )
