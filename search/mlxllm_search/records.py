"""What a search keeps in Optuna's user attributes: a TrialRecord per trial and a StudyRecord per study.

Each field is stored under its own name, and these names are the keys studies have always been written
with, so a study begun before this module still reads. A trial writes its fields as it learns them (`store`);
a reader takes them all at once (`record_of`), with None for the fields a trial never wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from mlxllm_search.law_points import Point as LawPoint
from mlxllm_search.speed import Point, Speed

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

# (from the stored value, to the stored value) for a field whose type is not what JSON holds
Codec = tuple[Callable[[Any], Any], Callable[[Any], Any]]
R = TypeVar("R", bound="_UserAttrs")


class _UserAttrs:
    """from_attrs / to_attrs for a frozen dataclass whose field names are its stored keys."""

    CODECS: ClassVar[dict[str, Codec]] = {}

    @classmethod
    def key(cls, name: str) -> str:
        """The stored key of field `name` (a KeyError if it is none), for code that reads attributes as stored."""
        if name not in {f.name for f in fields(cls)}:
            raise KeyError(f"{cls.__name__} has no field {name!r}")
        return name

    @classmethod
    def from_attrs(cls: type[R], attrs: Mapping[str, Any]) -> R:
        """The record held in `attrs` (keys of other writers are left out)."""
        names = {f.name for f in fields(cls)}
        decoded = {k: v if v is None or k not in cls.CODECS else cls.CODECS[k][0](v) for k, v in attrs.items()}
        return cls(**{k: v for k, v in decoded.items() if k in names})

    def to_attrs(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        """The stored form of the fields `names` (None values included), or of every field that is set."""
        chosen = [f.name for f in fields(self)] if names is None else list(names)
        out = {}
        for name in chosen:
            value = getattr(self, name)
            if value is None and names is None:
                continue
            out[name] = value if value is None or name not in self.CODECS else self.CODECS[name][1](value)
        return out


@dataclass(frozen=True)
class TrialRecord(_UserAttrs):
    """Everything a trial of the search stores. None: not written (yet, or not by this kind of trial)."""

    # Who runs it, and how it ended when not by its loss.
    worker: dict[str, Any] | None = None  # {host, pid, start} of the process running it (storage.owner)
    lost: str | None = None  # on a FAIL trial whose run was cut off (dead worker, interrupt): it is retried
    free: bool | None = None  # rejected before training (over the parameter cap): not counted towards --trials
    rejected: str | None = None  # why it is over a cap (it was pruned, its constraint recorded)
    cut: str | None = None  # where the search's time budget cut it short
    confirms: int | None = None  # a confirmation: the number of the explored trial it continues
    # What it trains.
    model: dict[str, Any] | None = None  # its ModelConfig's fields, vocab_size left out (the tokenizer's)
    learning_rate: float | None = None
    weight_decay: float | None = None  # (its dropout is the model's)
    params: int | None = None  # parameter count, with the tokenizer's vocabulary
    run_dir: str | None = None  # its run directory (checkpoints)
    # What it measured.
    seconds: float | None = None  # the wall clock it cost the search
    steps: int | None = None  # optimizer steps trained
    elapsed: float | None = None  # the trainer's clock at its end ([budget] trials)
    val_loss: float | None = None  # the loss it returned: at the budget's end, or at the target
    step_ms: float | None = None  # training-step latency (display.latency of its windows)
    memory_gb: float | None = None  # peak memory
    gen_tokens_per_sec: float | None = None  # generation speed, when an objective
    flops_per_step: float | None = None  # to scale its measured speed to another architecture's
    # A target-aware trial's account of the target (rungs.RungTrainer).
    points: tuple[Point, ...] | None = None  # its evaluations, in order
    speed: Speed | None = None  # measured from the points
    fit: list[float] | None = None  # its last learning curve: [a, b, c, points fitted, exponent its own]
    steps_at_target: float | None = None  # the optimizer steps the target run reaches, at its speed
    rung: float | None = None  # the last rung it reached, as a fraction of the target
    fraction: float | None = None  # how far towards the target it trained (1: there)
    predicted: float | None = None  # its loss at the target: measured if it got there, else predicted
    predicted_std: float | None = None  # ... and that prediction's standard deviation (0 when measured)
    predictions: dict[float, tuple[float, float]] | None = None  # rung fraction: (predicted, sd) made there
    actual: float | None = None  # its loss measured at the target, when it got there
    # A plan trial's (the fit planner's, branches.PlanTrial): its share and design, what it measured.
    share_s: float | None = None  # the search seconds it was given
    branch_steps: list[int] | None = None  # the stable-phase steps it was designed to branch a cooldown from
    unique_tokens: int | None = None  # the repetition trial's: the tokens of the part of the corpus it trains on
    law_points: tuple[LawPoint, ...] | None = None  # its finished WSD losses, for the fit across trials
    tokens_per_sec: float | None = None  # its steady training speed (compilation and evaluations left out)
    eval_s: float | None = None  # one evaluation with its checkpoint
    overhead_s: float | None = None  # set-up and compilation of one training call

    CODECS: ClassVar[dict[str, Codec]] = {
        "points": (lambda v: tuple(Point(*p) for p in v), lambda v: [list(p) for p in v]),
        "speed": (lambda v: Speed(*v), lambda s: [s.step_s, s.eval_s, s.start_s]),
        "law_points": (lambda v: tuple(LawPoint(**p) for p in v), lambda v: [asdict(p) for p in v]),
        # JSON keys are strings: a rung is stored to six significant digits.
        "predictions": (
            lambda v: {float(k): (m, s) for k, (m, s) in v.items()},
            lambda v: {f"{k:.6g}": [m, s] for k, (m, s) in v.items()},
        ),
    }


@dataclass(frozen=True)
class StudyRecord(_UserAttrs):
    """What the search stores on its study, so that a resumed search refuses another space."""

    space_hash: str | None = None  # SearchSpec.space_hash of the spec that made it
    spec: str | None = None  # that spec's path, for messages
    objectives: list[str] | None = None  # its objectives, in order (the report's plots name them)


LOST = TrialRecord.key("lost")  # for readers of the raw attributes (the tests)


def record_of(t: FrozenTrial | optuna.Trial) -> TrialRecord:
    """What trial `t` has stored so far."""
    return TrialRecord.from_attrs(t.user_attrs)


def store(trial: optuna.Trial, **values: Any) -> None:
    """Write these TrialRecord fields on a running trial; None is written too (it clears a mark the trial
    inherited from the one it retries). A name that is not a field is a TypeError."""
    for key, value in TrialRecord(**values).to_attrs(values).items():
        trial.set_user_attr(key, value)
