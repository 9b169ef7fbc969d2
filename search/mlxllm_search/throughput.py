"""This machine's training speed across architectures: tokens per second measured for the trials'
architectures, predicted for the others from their training FLOPs per token (a log-log line), with an
uncertainty; it turns a run length in seconds into the tokens each architecture would train on.

Why a line in log-log: the throughput of one machine is close to a constant FLOP rate (slope -1), but small
models spend relatively more of each step outside the matrix products, so the slope is fitted when two or
more sizes were measured (within SLOPE_RANGE); with one, it is -1 and the prediction's sd is PRIOR_SD. A
measured architecture keeps its own speed, with MEASURED_SD for the machine's load varying between the
search and the run.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mlxllm.config import ModelConfig
from mlxllm.errors import MlxllmError

import numpy as np

MEASURED_SD = 0.05  # log sd of a measured speed when the run trains later, on a machine loaded differently
PRIOR_SD = 0.3  # log sd of a speed predicted from one measured architecture
LENGTH_KINDS = ("seconds", "steps", "tokens")
# The line's slope is held between a constant FLOP rate (-1) and half of it: sizes measured close together
# (or one timed on a busy machine) can fit a flat or rising line, which would promise a model ten times larger
# at the small one's speed, and the trial designed on it would overrun the search.
SLOPE_RANGE = (-1.0, -0.5)


def model_key(model: ModelConfig) -> str:
    """A stable text key of an architecture (its config's fields as sorted JSON)."""
    return json.dumps(asdict(model), sort_keys=True)


@dataclass(frozen=True)
class RunLength:
    """The length of the run to plan, as the user gives it."""

    kind: str  # seconds | steps | tokens
    amount: float  # of that kind
    tokens_per_step: int  # batch size x sequence length x gradient accumulation

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_KINDS or not self.amount > 0 or self.tokens_per_step < 1:
            raise MlxllmError(
                f"A run length is a positive amount of {', '.join(LENGTH_KINDS)} with at least one token per step "
                f"(got {self.amount!r} {self.kind}, {self.tokens_per_step} tokens per step)."
            )

    def describe(self, multiple: float = 1.0) -> str:
        x = self.amount * multiple
        return f"{x:,.0f} s" if self.kind == "seconds" else f"{x:,.0f} {self.kind}"


@dataclass(frozen=True)
class Throughput:
    """log(tokens/s) = intercept + slope * log(FLOPs per token), and the measured speeds."""

    intercept: float
    slope: float
    sd: float  # log residual sd of the line (PRIOR_SD when it was not fitted)
    flops_mean: float  # mean log FLOPs of the measured architectures (for the line's own uncertainty)
    flops_ss: float  # their sum of squared deviations (0: one architecture)
    seq_len: int  # the training sequence length FLOPs per token are counted at
    measured: tuple[tuple[str, float], ...]  # (model_key, median tokens/s)

    def tokens_per_second(self, model: ModelConfig) -> tuple[float, float]:
        """(tokens/s, sd of its log) for an architecture: measured, or from the line."""
        key = model_key(model)
        for k, v in self.measured:
            if k == key:
                return v, MEASURED_SD
        x = math.log(model.flops_per_token(self.seq_len))
        n = len(self.measured)
        line = 1 / n + ((x - self.flops_mean) ** 2 / self.flops_ss if self.flops_ss > 0 else 0.0)
        sd = math.sqrt(self.sd**2 * (1 + line) + MEASURED_SD**2)
        return math.exp(self.intercept + self.slope * x), sd

    def tokens(self, model: ModelConfig, length: RunLength, multiple: float = 1.0) -> tuple[float, float]:
        """(tokens the architecture trains on in `multiple` times the run, sd of its log: 0 unless timed)."""
        if length.kind == "tokens":
            return length.amount * multiple, 0.0
        if length.kind == "steps":
            return length.amount * multiple * length.tokens_per_step, 0.0
        rate, sd = self.tokens_per_second(model)
        return length.amount * multiple * rate, sd

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Throughput:
        return cls(**{**d, "measured": tuple((str(k), float(v)) for k, v in d["measured"])})  # type: ignore[arg-type]


def fit_throughput(samples: Sequence[tuple[ModelConfig, float]], seq_len: int) -> Throughput:
    """The speed model from (architecture, measured training tokens/s) pairs; one architecture may appear
    several times (its median is kept). `seq_len`: the training sequence length."""
    by_key: dict[str, list[float]] = {}
    flops: dict[str, float] = {}
    for model, rate in samples:
        if not rate > 0:
            raise MlxllmError(f"A measured speed must be positive tokens/s (got {rate!r}).")
        by_key.setdefault(model_key(model), []).append(rate)
        flops[model_key(model)] = model.flops_per_token(seq_len)
    if not by_key:
        raise MlxllmError("No training speed was measured: at least one trial must train before its speed is known.")
    keys = sorted(by_key)
    rates = {k: statistics.median(by_key[k]) for k in keys}
    x = np.log([flops[k] for k in keys])
    y = np.log([rates[k] for k in keys])
    ss = float(((x - x.mean()) ** 2).sum())
    if len(keys) < 2 or ss < 1e-6:
        slope, sd = -1.0, PRIOR_SD
    else:
        slope = float(((x - x.mean()) * (y - y.mean())).sum() / ss)
        slope = min(max(slope, SLOPE_RANGE[0]), SLOPE_RANGE[1])
        rss = float(((y - y.mean() - slope * (x - x.mean())) ** 2).sum())
        sd = math.sqrt(rss / (len(keys) - 2)) if len(keys) > 2 else PRIOR_SD
    intercept = float(y.mean() - slope * x.mean())
    return Throughput(intercept, slope, sd, float(x.mean()), ss, seq_len, tuple(rates.items()))
