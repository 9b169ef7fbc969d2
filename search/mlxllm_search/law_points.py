"""The finished-loss points a scaling-law fit takes (mlxllm_search.scaling), and the checks of their input:
no run that ends inside or just after its warm-up (a prediction from it would be from nothing), and enough
trials, sizes and lengths to pin the law, with what is missing said in words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mlxllm.config import ModelConfig
from mlxllm.errors import MlxllmError

MIN_POINTS, MIN_TRIALS, MIN_SIZES, MIN_LENGTHS, MIN_LENGTH_RATIO = 6, 3, 3, 3, 2.0
DISTINCT = 1.1  # sizes or lengths closer than this factor count as one
MIN_STEPS_AFTER_WARMUP = 20  # a run shorter than this past its warm-up holds little but the unigram fall
# Kaplan et al. (2020, fig. 6): counted without their embeddings, models of every depth fall on one trend in N,
# except the shallowest, which lie well above it; the law describes the others, and a plan that trusted it for
# shallow models would pick them for their speed. Kaplan's exception is one layer; in the short runs a search
# measures on byte-level text, two-layer models are still far above the trend too (on Tiny Shakespeare 2 x 128
# was 0.3-0.5 above 3 x 128 at equal steps up to 240, and 5 x 128 no better than 3 x 128), and each search that
# trained one failed its held-out check by a factor 11-13, against 1.0 without it.
MIN_LAW_LAYERS = 3


def in_law(model: ModelConfig) -> bool:
    """Whether the law's trend in N holds for `model`'s shape (at least MIN_LAW_LAYERS layers)."""
    return model.n_layers >= MIN_LAW_LAYERS


@dataclass(frozen=True)
class Point:
    """The finished loss of one run (a trial's WSD run, or a cooldown branch of it) for the fit."""

    trial: int  # the trial it was measured in: points of one trial share architecture and seed
    n_params: int  # law_params of its architecture
    tokens: float  # tokens the finished run trained on, warm-up included
    loss: float  # validation loss at its end
    step: int  # the finished run's length in optimizer steps
    warmup_steps: int  # that run's warm-up
    noise_sd: float | None = None  # the sd of the evaluation itself (its sampled batches), if known
    unique_tokens: float | None = None  # the training text it repeated, when a part of the corpus (None: all)

    def __post_init__(self) -> None:
        bad = [f"{k} = {getattr(self, k)!r}" for k in ("n_params", "tokens", "step") if not getattr(self, k) > 0]
        if not (math.isfinite(self.loss) and self.loss > 0):
            bad.append(f"loss = {self.loss!r}")
        if self.warmup_steps < 0 or (self.noise_sd is not None and not self.noise_sd >= 0):
            bad.append(f"warmup_steps = {self.warmup_steps}, noise_sd = {self.noise_sd}")
        if self.unique_tokens is not None and not self.unique_tokens > 0:
            bad.append(f"unique_tokens = {self.unique_tokens!r}")
        if bad:
            raise MlxllmError(f"A scaling-law point of trial {self.trial} is invalid ({', '.join(bad)}).")


def first_step(warmup_steps: int, min_steps_after_warmup: int = MIN_STEPS_AFTER_WARMUP) -> int:
    """The shortest run, in steps, whose finished loss the fit admits."""
    return max(2 * warmup_steps, warmup_steps + min_steps_after_warmup)


def refusal(
    point: Point, min_steps_after_warmup: int = MIN_STEPS_AFTER_WARMUP, floor: float | None = None
) -> str | None:
    """Why a point cannot enter the fit (None: it can): a run that ends inside its warm-up, or too soon
    after it, has not started the fall the law describes, and extrapolating it predicts from nothing; nor
    has one whose loss is not below `floor` (pair_floor: what a table of token pairs gives; None: no check)."""
    need = first_step(point.warmup_steps, min_steps_after_warmup)
    if point.step < need:
        return (
            f"trial {point.trial}'s run of {point.step} steps ends within {need} steps "
            f"(twice its {point.warmup_steps}-step warm-up, and at least {min_steps_after_warmup} past it)"
        )
    if floor is not None and point.loss >= floor:
        return (
            f"trial {point.trial}'s run of {point.step} steps ends at a loss of {point.loss:.3f}, not below the "
            f"{floor:.3f} a table of token pairs gives"
        )
    return None


def split_points(
    points: Sequence[Point], min_steps_after_warmup: int = MIN_STEPS_AFTER_WARMUP, floor: float | None = None
) -> tuple[list[Point], list[Point]]:
    """(the points the fit may use, those it refuses)."""
    ok = [p for p in points if refusal(p, min_steps_after_warmup, floor) is None]
    return ok, [p for p in points if refusal(p, min_steps_after_warmup, floor) is not None]


def admit(
    points: Sequence[Point], min_steps_after_warmup: int = MIN_STEPS_AFTER_WARMUP, floor: float | None = None
) -> None:
    """Raise InadmissiblePoints, saying why, if any of `points` is refused (see refusal)."""
    refused = [r for p in points if (r := refusal(p, min_steps_after_warmup, floor))]
    if refused:
        raise InadmissiblePoints(
            "The scaling-law fit refuses runs that end inside or just after their warm-up, or no lower than a "
            f"table of token pairs (a prediction from them would be from nothing): {'; '.join(refused[:3])}"
            f"{' ...' if len(refused) > 3 else ''}. Leave them out (split_points) or train longer."
        )


class InadmissiblePoints(MlxllmError):
    """Points the fit refuses were passed to it (split them off first with `split_points`)."""


class NotEnoughPoints(MlxllmError):
    """The points cannot pin the law; `coverage` says what was measured and `missing` what is not."""

    def __init__(self, coverage: Coverage) -> None:
        self.coverage, self.missing = coverage, coverage.missing()
        super().__init__(
            "Too few measurements to fit the loss against parameters and tokens: " + "; ".join(self.missing) + "."
        )


def _distinct(values: Sequence[float]) -> int:
    count, last = 0, -math.inf
    for v in sorted(values):
        if v > last * DISTINCT:
            count, last = count + 1, v
    return count


@dataclass(frozen=True)
class Coverage:
    """What a set of points measures, against what the fit needs."""

    points: int
    trials: int
    sizes: int  # distinct N
    lengths: int  # distinct D
    length_ratio: float  # longest D over shortest

    @classmethod
    def of(cls, points: Sequence[Point]) -> Coverage:
        d = [p.tokens for p in points]
        ratio = max(d) / min(d) if d else 0.0
        return cls(
            len(points), len({p.trial for p in points}), _distinct([p.n_params for p in points]), _distinct(d), ratio
        )

    def missing(self) -> tuple[str, ...]:
        needs = [
            (self.points, MIN_POINTS, "finished-loss points"),
            (self.trials, MIN_TRIALS, "trials"),
            (self.sizes, MIN_SIZES, "model sizes (parameter counts 10% apart)"),
            (self.lengths, MIN_LENGTHS, "run lengths (token counts 10% apart)"),
        ]
        out = [f"{what}: {have} measured, {need} needed" for have, need, what in needs if have < need]
        if self.length_ratio < MIN_LENGTH_RATIO:
            out.append(f"longest run over shortest: {self.length_ratio:.2g}x measured, {MIN_LENGTH_RATIO:g}x needed")
        return tuple(out)
