"""The regularisation a search may tune: [space] dropout (the model's residual dropout, ModelConfig.dropout)
and weight_decay (AdamW's, TrainConfig.weight_decay), read from the spec and checked; and the value a search
that does not tune them (the fit planner, whose law is over parameters and tokens) holds each at.

Unlike the sizes and the learning rate, both may be 0 (off), so they have their own bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlxllm.errors import MlxllmError

from mlxllm_search.space import Choice, Dimension, Range


@dataclass(frozen=True)
class Bounds:
    """What one regulariser's values may be: [low, high) or [low, inf) when high is None."""

    meaning: str  # what the value is, for messages
    high: float | None  # exclusive upper bound; None: none
    example: str  # a valid [space] line, for messages
    low: float = 0.0

    def admits(self, x: Any) -> bool:
        number = isinstance(x, (int, float)) and not isinstance(x, bool)
        return number and x >= self.low and (self.high is None or x < self.high)

    def span(self) -> str:
        return f"in [{self.low:g}, {self.high:g})" if self.high is not None else f"{self.low:g} or more"


REGULARISERS: dict[str, Bounds] = {
    "dropout": Bounds(
        "the probability of residual dropout (0: off, 0.1 a common choice)",
        1.0,
        "dropout = [0.0, 0.1] or dropout = { min = 0.0, max = 0.3 }",
    ),
    "weight_decay": Bounds(
        "AdamW's weight decay (0: none; mlxllm's default is 0.1)",
        None,
        "weight_decay = [0.0, 0.1] or weight_decay = { min = 0.01, max = 0.3, log = true }",
    ),
}


def regulariser(key: str, v: Any, where: str) -> Dimension:
    """The [space] dimension `key` (one of REGULARISERS) from its TOML value `v` (a number, a list of choices or
    a { min, max, log } table) in the spec `where`; an MlxllmError that quotes a bad value."""
    b = REGULARISERS[key]
    bad = (
        f"[space] {key} in {where} is {b.meaning}: every value must be {b.span()} (got {v!r}). Write e.g. {b.example}."
    )
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    if isinstance(v, list):
        if not v or not all(b.admits(x) for x in v):
            raise MlxllmError(bad)
        return Choice(tuple(float(x) for x in dict.fromkeys(v)))
    if not isinstance(v, dict) or set(v) - {"min", "max", "log"} or "min" not in v or "max" not in v:
        raise MlxllmError(
            f"[space] {key} in {where} must be a list of choices or a table {{ min = .., max = .., log = false }} "
            f"(got {v!r}). Write e.g. {b.example}."
        )
    low, high, log = v["min"], v["max"], v.get("log", False)
    if not (b.admits(low) and b.admits(high)):
        raise MlxllmError(bad)
    if low > high:
        raise MlxllmError(f"[space] {key} in {where} has min {low} > max {high}: the range is empty. Swap them.")
    if not isinstance(log, bool):
        raise MlxllmError(f"[space] {key} in {where}: log must be true or false (got {log!r}).")
    if log and low == 0:
        top = high or 0.1
        raise MlxllmError(
            f"[space] {key} in {where} is a log-scale range from 0 ({v!r}), and a log scale cannot start at 0. "
            f"Start it at a small positive value (e.g. min = {top / 100:g}), drop log = true for an even spread "
            f"from 0, or list choices that include 0 (e.g. {key} = [0.0, {top / 10:g}, {top:g}])."
        )
    return Range(float(low), float(high), log)


def held(dim: Dimension | None, base: float) -> float:
    """The value a search that does not tune this regulariser trains with: the base's, or the space's value
    nearest it when the space leaves the base's out."""
    if dim is None or dim.contains(base):
        return base
    if isinstance(dim, Choice):
        return min(dim.values, key=lambda v: abs(v - base))
    return min(max(base, dim.low), dim.high)
