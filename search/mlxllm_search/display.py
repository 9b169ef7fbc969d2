"""Trials as a table: live while the search runs (plain lines when not a terminal), a leaderboard at the end."""

from __future__ import annotations

import sys
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from mlxllm_search.records import record_of
from mlxllm_search.space import OBJECTIVES

LIVE_ROWS = 20


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def describe(t: FrozenTrial) -> dict[str, str]:
    """One trial as table cells."""
    r = record_of(t)
    m = r.model or {}
    d_model, heads = m.get("d_model"), m.get("n_heads")
    last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
    loss = t.values[0] if t.values else (r.val_loss if r.val_loss is not None else last)
    note = r.rejected or r.lost or r.cut or ""
    # A target-aware trial's rungs are fractions of the target (its intermediate steps are ticks of it).
    where = (
        f"{r.rung:.3g}" if r.rung is not None else (str(max(t.intermediate_values)) if t.intermediate_values else "")
    )
    if t.state == TrialState.PRUNED and not note:
        note = f"pruned@{where}" if where else "pruned"
    if t.state == TrialState.RUNNING and where:
        note = f"@{where}"
    if r.confirms is not None:
        note = f"confirms #{r.confirms}" + (f"; {note}" if note else "")
    std = r.predicted_std
    return {
        "#": str(t.number),
        "state": t.state.name.lower(),
        "L": _num(m.get("n_layers"), "d"),
        "d": _num(d_model, "d"),
        "h/kv": f"{heads}/{m.get('n_kv_heads')}" if heads else "-",
        "mlp": _num(m.get("mlp_ratio"), ".2f"),
        "lr": _num(r.learning_rate, ".2e"),
        "drop": _num(m.get("dropout"), ".3g"),
        "wd": _num(r.weight_decay, ".3g"),
        "params": _num(r.params, ","),
        "loss": _num(loss, ".4f"),
        "ms/step": _num(r.step_ms, ".1f"),
        "GB": _num(r.memory_gb, ".3f"),
        "gen tok/s": _num(r.gen_tokens_per_sec, ",.0f"),
        "note": str(note),
        "pred@T": _num(r.predicted, ".4f"),
        "±": "-" if std is None or r.actual is not None else format(std, ".3f"),
        "meas@T": _num(r.actual, ".4f"),
        "at": _num(r.fraction, ".2f"),
    }


def table(
    trials: list[FrozenTrial], title: str, objectives: tuple[str, ...], marks: dict[int, str] | None = None
) -> Table:
    # Measured costs beyond step time only when the search optimizes or caps them: the table must fit 80 columns.
    cols = ["#", "state", "L", "d", "h/kv", "mlp", "lr", "params", "loss", "ms/step", "note"]
    if any(record_of(t).predicted is not None for t in trials):  # a target-aware search: the loss at the target
        cols[8:9] = ["pred@T", "±", "meas@T", "at"]
    if "memory_gb" in objectives:
        cols.insert(-1, "GB")
    if "gen_tokens_per_sec" in objectives:
        cols.insert(-1, "gen tok/s")
    cells = [describe(t) for t in trials]
    for c in ("wd", "drop"):  # only where the trials differ in them (a search of them): the table must fit
        if len({row[c] for row in cells}) > 1:
            cols.insert(cols.index("lr") + 1, c)
    out = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for c in cols:
        out.add_column(c, justify="left" if c in ("state", "note") else "right", no_wrap=c != "note")
    for t, row in zip(trials, cells):
        if marks and t.number in marks:
            row["note"] = marks[t.number]
        out.add_row(*(row[c] for c in cols))
    return out


def leaderboard(study: optuna.Study, objectives: tuple[str, ...], shown: tuple[str, ...] = (), top: int = 10) -> Table:
    """Completed trials, feasible ones first, by validation loss (the Pareto front is starred)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    front = {t.number for t in study.best_trials} if len(objectives) > 1 else set()
    infeasible = {t.number for t in done if any(v > 0 for v in t.constraints.values())}
    done.sort(key=lambda t: (t.number in infeasible, t.values[0]))
    targeted = any(record_of(t).predicted is not None for t in done)
    what = (
        "validation loss at the target: predicted (±1 sd) from the fraction trained (at), measured where it got there"
        if targeted
        else "validation loss"
    )
    title = f"Leaderboard ({what}" + (", * = Pareto front over " + ", ".join(objectives) if front else "") + ")"
    marks = {t.number: "*" for t in done if t.number in front}
    marks.update({n: "over a cap" for n in infeasible})
    return table(done[:top], title, objectives + shown, marks)


class LiveTrials:
    """Refresh with the study's trials; prints one plain line per finished trial when stdout is not a terminal."""

    def __init__(self, objectives: tuple[str, ...], show: bool = True):
        self.objectives, self.show = objectives, show
        self.console = Console()
        self.tty = self.console.is_terminal and sys.stdout.isatty()
        if not self.tty:
            self.console = Console(width=160)  # logs and pipes: no terminal width to fit
        self._live: Live | None = None
        self._printed: set[int] = set()

    def __enter__(self) -> LiveTrials:
        if self.show and self.tty:
            self._live = Live(console=self.console, auto_refresh=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def update(self, study: optuna.Study) -> None:
        if not self.show:
            return
        trials = study.get_trials(deepcopy=False)
        if self._live is not None:
            self._live.update(table(trials[-LIVE_ROWS:], f"Trials ({len(trials)})", self.objectives), refresh=True)
            return
        for t in trials:
            if t.state.is_finished() and t.number not in self._printed:
                self._printed.add(t.number)
                c = describe(t)
                print(
                    f"trial {c['#']:>3} {c['state']:<8} layers={c['L']} d_model={c['d']} heads/kv={c['h/kv']} "
                    f"mlp={c['mlp']} lr={c['lr']} dropout={c['drop']} wd={c['wd']} params={c['params']} "
                    f"val_loss={c['loss']} step_ms={c['ms/step']}"
                    + (f" predicted@target={c['pred@T']}±{c['±']} at={c['at']}" if c["pred@T"] != "-" else "")
                    + (f"  ({c['note']})" if c["note"] else ""),
                    flush=True,
                )


def objective_names(objectives: tuple[str, ...]) -> str:
    return ", ".join(f"{o} ({OBJECTIVES[o][0]})" for o in objectives)
