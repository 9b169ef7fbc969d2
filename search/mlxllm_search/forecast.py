"""The plan for the user's run, from the law fitted across trials (mlxllm_search.scaling) and this machine's
speed (mlxllm_search.throughput): the predicted finished loss of every candidate architecture at the run's
length T, the pick for T and for T/4 .. 4T, whether more text would help more than a bigger model, and, when
the search's points cannot pin the law, a paragraph that says what S would instead of a number.

A prediction's sd adds the speed's uncertainty (on a time target it moves the tokens) to the law's: the
loss's slope in log tokens times the sd of log tokens/s.

`Forecast.to_dict` is the JSON record (plan.json); `predict_loss(record, model)` predicts the loss at T for
any architecture from it, trained in the search or not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mlxllm.config import ModelConfig
from mlxllm.errors import MlxllmError

from mlxllm_search.law_points import (
    MIN_LENGTH_RATIO,
    MIN_LENGTHS,
    MIN_POINTS,
    MIN_SIZES,
    MIN_STEPS_AFTER_WARMUP,
    MIN_TRIALS,
    Coverage,
    NotEnoughPoints,
    Point,
    first_step,
    split_points,
)
from mlxllm_search.scaling import REPEAT_FREE_EPOCHS, LawFit, fit_law, law_params
from mlxllm_search.throughput import RunLength, Throughput

MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)  # the run lengths the plan answers for, as multiples of T
# A pick is the candidate whose loss is lowest at PICK_SD standard deviations above its mean: where the
# measured sizes and lengths end, the law's mean is least trustworthy and its sd grows, so a candidate far
# beyond them wins only if it is better even on the pessimistic side.
PICK_SD = 1.0
SHORTFALL_MARGIN = 1.5  # the paragraph's budget estimate allows for points that come out inadmissible


@dataclass(frozen=True)
class Prediction:
    """One architecture's finished loss after a run of `multiple` x T."""

    model: ModelConfig
    multiple: float
    params: int  # the law's N (without embeddings)
    total_params: int
    tokens: float
    epochs: float  # tokens over the corpus' unique tokens
    loss: float
    sd: float
    extrapolation: str | None  # why the prediction reaches beyond what was measured; None: it does not

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model": asdict(self.model)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prediction:
        return cls(**{**d, "model": ModelConfig(**d["model"])})


def predict_model(
    law: LawFit, speed: Throughput, length: RunLength, model: ModelConfig, multiple: float = 1.0
) -> Prediction:
    """The finished loss of `model` (its vocab_size resolved, as trained) after `multiple` x the run, with the
    speed's sd folded in."""
    if model.vocab_size < 1:
        raise MlxllmError("A forecast needs each architecture's vocabulary size (vocab_size 0 is only a placeholder).")
    n = law_params(model)
    tokens, log_sd = speed.tokens(model, length, multiple)
    mean, sd = law.predict(n, tokens)
    slope = (law.loss(n, tokens * math.exp(0.01)) - law.loss(n, tokens * math.exp(-0.01))) / 0.02
    return Prediction(
        model=model,
        multiple=multiple,
        params=n,
        total_params=model.num_params(),
        tokens=tokens,
        epochs=tokens / law.unique_tokens,
        loss=mean,
        sd=math.sqrt(sd**2 + (slope * log_sd) ** 2),
        extrapolation=law.extrapolation(n, tokens),
    )


@dataclass(frozen=True)
class DataVerdict:
    """At T: what twice the text would buy the pick, against what the next bigger candidate would on the
    pick's own tokens (a longer run); `fires` when the corpus is repeated more than REPEAT_FREE_EPOCHS times
    and the text buys more. Regularisation matters most then, so when the space searches dropout or weight
    decay and the plan held them (`held`), it says what would tune them."""

    epochs: float
    text_gain: float  # loss the pick loses with twice the unique text, same run
    bigger_gain: float  # loss the next bigger candidate (or a twice as large model) loses on the same tokens
    bigger_params: int
    agree: float  # share of the law's bootstrap draws in which the text buys more
    fires: bool
    held: dict[str, float] | None = None  # the searched regularisers the plan held, at these values

    def describe(self) -> str:
        gains = (
            f"the pick passes over the text {self.epochs:.3g} times; twice the text would lower its loss by "
            f"{self.text_gain:.4f}, a model of {self.bigger_params / 1e6:.3g}M parameters on the same tokens by "
            f"{self.bigger_gain:.4f} (the text wins in {self.agree:.0%} of the fit's bootstrap)"
        )
        if not self.fires:
            return f"not the limit: {gains}"
        text = f"more text would help more than a bigger model: {gains}"
        if self.held:
            values = " and ".join(f"{k.replace('_', ' ')} at {v:g}" for k, v in self.held.items())
            text += (
                f"; the plan held {values} (its law is over size and tokens), and a search of the picked size with "
                '[target] planner = "curves" (or with a [budget] instead of a [target]) is what tunes them'
            )
        return text


def data_verdict(
    law: LawFit, pick: Prediction, candidates: Sequence[ModelConfig], held: dict[str, float] | None = None
) -> DataVerdict:
    """The data verdict for the pick at T (see DataVerdict); `held`: the searched regularisers the plan held."""
    bigger = sorted(n for m in candidates if (n := law_params(m)) > pick.params * 1.01)
    n2 = bigger[0] if bigger else 2 * pick.params
    u, d = law.unique_tokens, pick.tokens
    text = law.draws_at(pick.params, d) - law.draws_at(pick.params, d, 2 * u)
    size = law.draws_at(pick.params, d) - law.draws_at(n2, d)
    text_gain = law.loss(pick.params, d) - law.loss(pick.params, d, 2 * u)
    bigger_gain = law.loss(pick.params, d) - law.loss(n2, d)
    fires = pick.epochs > REPEAT_FREE_EPOCHS and text_gain > bigger_gain
    return DataVerdict(pick.epochs, text_gain, bigger_gain, n2, float((text > size).mean()), fires, held)


@dataclass(frozen=True)
class Forecast:
    """The whole plan (JSON by to_dict / from_dict); `law` None with `shortfall` the paragraph."""

    length: RunLength
    unique_tokens: float
    speed: Throughput
    law: LawFit | None
    predictions: tuple[Prediction, ...]  # every candidate at T, best first
    picks: tuple[Prediction, ...]  # the best candidate at each of MULTIPLES
    verdict: DataVerdict | None
    shortfall: str | None
    floor: float | None = None  # pair_floor's level: a point had to end below it to count (None: not checked)

    def pick(self, multiple: float = 1.0) -> Prediction | None:
        return next((p for p in self.picks if math.isclose(p.multiple, multiple)), None)

    def predict(self, model: ModelConfig, multiple: float = 1.0) -> Prediction:
        """Any architecture's prediction at `multiple` x T (MlxllmError when the plan holds no fit)."""
        if self.law is None:
            raise MlxllmError(f"This plan holds no fit to predict from: {self.shortfall}")
        return predict_model(self.law, self.speed, self.length, model, multiple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "length": asdict(self.length),
            "unique_tokens": self.unique_tokens,
            "speed": self.speed.to_dict(),
            "law": self.law.to_dict() if self.law else None,
            "predictions": [p.to_dict() for p in self.predictions],
            "picks": [p.to_dict() for p in self.picks],
            "verdict": asdict(self.verdict) if self.verdict else None,
            "shortfall": self.shortfall,
            "floor": self.floor,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Forecast:
        return cls(
            length=RunLength(**d["length"]),
            unique_tokens=d["unique_tokens"],
            speed=Throughput.from_dict(d["speed"]),
            law=LawFit.from_dict(d["law"]) if d["law"] else None,
            predictions=tuple(Prediction.from_dict(p) for p in d["predictions"]),
            picks=tuple(Prediction.from_dict(p) for p in d["picks"]),
            verdict=DataVerdict(**d["verdict"]) if d["verdict"] else None,
            shortfall=d["shortfall"],
            floor=d.get("floor"),
        )


def make_forecast(
    points: Sequence[Point],
    unique_tokens: float,
    candidates: Sequence[ModelConfig],
    speed: Throughput,
    length: RunLength,
    search_seconds: float,
    min_steps_after_warmup: int = MIN_STEPS_AFTER_WARMUP,
    held: dict[str, float] | None = None,
    floor: float | None = None,
) -> Forecast:
    """The plan from the search's finished-loss points (those inside or just after their warm-up, or not below
    `floor`, pair_floor's level, are left out) for the candidate architectures; `search_seconds`: what the
    search spent to measure them; `held`: the regularisers the space searches that the plan held, at these
    values (the data verdict names them)."""
    if not candidates:
        raise MlxllmError("A forecast needs at least one candidate architecture.")
    usable, refused = split_points(points, min_steps_after_warmup, floor)
    try:
        law = fit_law(usable, unique_tokens, min_steps_after_warmup=min_steps_after_warmup, floor=floor)
    except NotEnoughPoints as e:
        text = shortfall(e.coverage, usable, refused, search_seconds, length, min_steps_after_warmup, floor)
        return Forecast(length, float(unique_tokens), speed, None, (), (), None, text, floor)
    at = {
        m: sorted((predict_model(law, speed, length, c, m) for c in candidates), key=lambda p: p.loss)
        for m in MULTIPLES
    }
    picks = tuple(min(at[m], key=lambda p: p.loss + PICK_SD * p.sd) for m in MULTIPLES)
    verdict = data_verdict(law, picks[MULTIPLES.index(1.0)], candidates, held)
    return Forecast(length, float(unique_tokens), speed, law, tuple(at[1.0]), picks, verdict, None, floor)


def predict_loss(record: dict[str, Any], model: ModelConfig, multiple: float = 1.0) -> tuple[float, float]:
    """(loss, sd) at `multiple` x T for any architecture, from a forecast's JSON record."""
    p = Forecast.from_dict(record).predict(model, multiple)
    return p.loss, p.sd


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _sizes(points: Sequence[Point]) -> str:
    sizes = sorted({p.n_params for p in points})
    return ", ".join(f"{n / 1e6:.3g}M" for n in sizes[:6]) + (" ..." if len(sizes) > 6 else "")


def _longer_to_pass(points: Sequence[Point], floor: float) -> float:
    """Roughly how many times longer the runs must be to end below `floor`: each trial's loss continued along
    its last two points in log steps, the soonest of them (2 where no trial has two falling points)."""
    out = []
    for t in {p.trial for p in points}:
        runs = sorted((p.step, p.loss) for p in points if p.trial == t)
        (s1, l1), (s2, l2) = runs[-2:] if len(runs) > 1 else ((1, 0.0), (1, 0.0))
        if s2 > s1 and l1 > l2:
            out.append(math.exp((l2 - floor) / ((l1 - l2) / math.log(s2 / s1))))
    return max(1.0, min(out)) if out else 2.0


def _budget_factor(
    coverage: Coverage,
    usable: Sequence[Point],
    refused: Sequence[Point],
    min_steps_after_warmup: int,
    floor: float | None = None,
) -> float | None:
    """Roughly how many times the spent search budget would measure what is missing (None: no idea)."""
    if usable:
        ratios = [MIN_POINTS / coverage.points, MIN_TRIALS / coverage.trials, MIN_SIZES / max(coverage.sizes, 1)]
        ratios += [MIN_LENGTHS / max(coverage.lengths, 1), MIN_LENGTH_RATIO / max(coverage.length_ratio, 1.0)]
        return max(1.0, *ratios) * SHORTFALL_MARGIN
    if refused:
        need = max(first_step(p.warmup_steps, min_steps_after_warmup) for p in refused)
        longest = max(p.step for p in refused)
        trials = len({p.trial for p in refused})
        longer = need / longest
        if floor is not None and longest >= need:  # long enough, but not yet below the pairs' level
            longer = _longer_to_pass(refused, floor)
        return longer * max(1.0, MIN_TRIALS / trials) * SHORTFALL_MARGIN
    return None


def shortfall(
    coverage: Coverage,
    usable: Sequence[Point],
    refused: Sequence[Point],
    search_seconds: float,
    length: RunLength,
    min_steps_after_warmup: int = MIN_STEPS_AFTER_WARMUP,
    floor: float | None = None,
) -> str:
    """The paragraph printed instead of a prediction: what was measured (`coverage` of the `usable` points;
    the `refused` ones, early or not below `floor`), what is missing, and roughly what search budget would
    buy it (the spent `search_seconds` scaled by the shortfall)."""
    measured = (
        f"In {search_seconds:,.0f} s the search measured {_count(coverage.trials, 'trial')} ({_sizes(usable)} "
        f"parameters) with {_count(coverage.points, 'finished loss', 'finished losses')}"
        if usable
        else f"In {search_seconds:,.0f} s the search measured no finished loss the fit can use"
    )
    early = [p for p in refused if p.step < first_step(p.warmup_steps, min_steps_after_warmup)]
    if early:
        measured += f"; {_count(len(early), 'run')} ended inside or just after the warm-up and were left out"
    if len(early) < len(refused):
        measured += (
            f"; {_count(len(refused) - len(early), 'run')} ended no lower than the {floor:.3f} that a table of "
            "token pairs counted on the training text gives, so had not yet learned what the law describes, and "
            "were left out"
        )
    missing = "; ".join(coverage.missing())
    if not usable:
        need = max((first_step(p.warmup_steps, min_steps_after_warmup) for p in refused), default=0)
        missing = (
            f"runs that end {need} steps or more in (twice the warm-up, and {min_steps_after_warmup} steps past it)"
            f"{f' at a loss below {floor:.3f}' if floor is not None else ''}, "
            if need
            else ""
        ) + f"from {MIN_TRIALS} trials or more of {MIN_SIZES} sizes, at {MIN_LENGTHS} lengths or more"
    factor = _budget_factor(coverage, usable, refused, min_steps_after_warmup, floor)
    if factor is None:
        cost = "No trial finished a run: the search budget must be several times larger"
    else:
        s = search_seconds * factor
        ratio = f" ({_multiple(s / length.amount)})" if length.kind == "seconds" else ""
        if length.kind == "seconds" and s >= length.amount:
            ratio = f" ({s / length.amount:.2g}T: more than the run itself)"
        per = f" ({search_seconds / len(usable):,.0f} s per finished loss)" if usable else ""
        cost = f"At the measured cost{per}, a search budget of about {s:,.0f} s{ratio} would buy it"
    return (
        f"No loss is predicted for the run of {length.describe()}: the search could not fit the loss against "
        f"parameters and tokens. {measured}. Missing: {missing}. {cost}."
    )


def render(plan: Forecast) -> str:
    """A few lines for the terminal: the pick for T with its loss +- 2 sd, the table for T/4 .. 4T, the
    data verdict; or the shortfall paragraph."""
    if plan.law is None:
        return plan.shortfall or ""
    best = plan.pick(1.0)
    assert best is not None
    lines = [
        f"plan for {plan.length.describe()}: {_arch(best.model)} ({best.total_params / 1e6:.3g}M parameters), "
        f"loss {best.loss:.4f} +- {2 * best.sd:.4f} (2 sd), {best.epochs:.3g} passes over the text"
    ]
    for p in plan.picks:
        mark = f"  extrapolation: {p.extrapolation}" if p.extrapolation else ""
        lines.append(
            f"  {_multiple(p.multiple):>4} {plan.length.describe(p.multiple):>14}  {_arch(p.model):<22} "
            f"{p.loss:.4f} +- {2 * p.sd:.4f}{mark}"
        )
    if plan.verdict:
        lines.append("data: " + plan.verdict.describe())
    return "\n".join(lines)


def _arch(m: ModelConfig) -> str:
    return f"{m.n_layers} x {m.d_model}, {m.n_heads} heads"


def _multiple(x: float) -> str:
    """T, 2T, T/4, T/27 (rounded): a length as a multiple of the run's."""
    if math.isclose(x, 1.0):
        return "T"
    return f"{x:.2g}T" if x > 1 else f"T/{1 / x:.0f}" if x < 0.1 else f"T/{1 / x:.2g}"
