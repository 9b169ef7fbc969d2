"""The fit planner's repetition trial: an architecture the plan already measured, trained again on a part of
the corpus small enough that its runs pass over that part about as many times as the run planned for T
would pass over the whole. Its points are the fit's evidence on what repeated text is worth on this corpus
(the law's R*, scaling.py), which the trials on the whole corpus, a few passes each, cannot give; without
it the law assumes a value fitted to far larger models, and a small corpus trained for long is where the
plan depends on it most.

It runs only when the plan is data-limited (some candidate would pass over the corpus more than
REPEAT_FREE_EPOCHS times at T), last, after the trials of the sizes, with the share of the search kept
for it. The part is pieces spread over the training split, as the validation split is spread over the
corpus, so that it is the same kind of text; the validation split stays the whole corpus'.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import replace

from mlxllm.config import ModelConfig
from mlxllm.data import TokenData

import numpy as np

from mlxllm_search.design import GOOD_LEVELS, MIN_LEVELS, Choice, Speeds, longest_ladder
from mlxllm_search.scaling import REPEAT_FREE_EPOCHS, law_params
from mlxllm_search.throughput import RunLength

EPOCHS_RANGE = (8.0, 64.0)  # the passes its longest run is designed to reach
PIECES = 64  # the part is at most this many pieces of the training split, evenly spaced
MIN_PIECE_WINDOWS = 4  # each piece holds at least this many training windows


def tokens_at(length: RunLength, speeds: Speeds, model: ModelConfig) -> float:
    """The tokens `model` trains on in the run of `length`, at the speed the design estimates for it."""
    if length.kind == "tokens":
        return length.amount
    if length.kind == "steps":
        return length.amount * length.tokens_per_step
    return length.amount * speeds.tokens_per_step / speeds.cost(model).step_s


def target_epochs(
    candidates: Sequence[ModelConfig], speeds: Speeds, length: RunLength, unique_tokens: float
) -> float | None:
    """The passes the repetition trial's longest run should make: the median candidate's at T, within
    EPOCHS_RANGE; None when no candidate would pass over the corpus more than REPEAT_FREE_EPOCHS times
    (then repetition is no part of the plan, and no trial is spent on it)."""
    epochs = [tokens_at(length, speeds, m) / unique_tokens for m in candidates]
    if not epochs or max(epochs) <= REPEAT_FREE_EPOCHS:
        return None
    return min(max(statistics.median(epochs), EPOCHS_RANGE[0]), EPOCHS_RANGE[1])


def repetition_choice(
    measured: Sequence[ModelConfig],
    speeds: Speeds,
    seconds: float,
    unit: int,
    fraction: float,
    epochs: float,
    unique_tokens: int,
) -> tuple[Choice, int] | None:
    """(the repetition trial, the tokens of its part of the corpus) in `seconds`: the measured architecture
    of median size, its longest affordable ladder, and a part its longest run passes over `epochs` times
    (never more than the corpus); None when no ladder is affordable or nothing is measured."""
    if not measured:
        return None
    model = sorted(measured, key=law_params)[(len(measured) - 1) // 2]
    cost = speeds.cost(model)
    ladder = longest_ladder(cost, seconds, unit, fraction, GOOD_LEVELS) or longest_ladder(
        cost, seconds, unit, fraction, MIN_LEVELS
    )
    if ladder is None:
        return None
    longest = ladder.lengths[-1] * speeds.tokens_per_step
    part = int(min(unique_tokens, max(longest / epochs, MIN_PIECE_WINDOWS * (speeds.seq_len + 1))))
    return Choice(model, ladder, seconds, cost.seconds(ladder)), part


def part_of(data: TokenData, tokens: int, seq_len: int) -> TokenData:
    """`data` with its training split cut to `tokens` tokens: up to PIECES pieces spread evenly over it,
    each at least MIN_PIECE_WINDOWS windows of `seq_len` (the validation split unchanged)."""
    total = len(data.train)
    if tokens >= total:
        return data
    pieces = max(1, min(PIECES, tokens // (MIN_PIECE_WINDOWS * (seq_len + 1))))
    size = math.ceil(tokens / pieces)
    starts = np.linspace(0, total - size, pieces).astype(np.int64)
    index = (starts[:, None] + np.arange(size)[None, :]).ravel()[:tokens]  # the last piece a little shorter
    mask = None if data.train_mask is None else np.ascontiguousarray(data.train_mask[index])
    return replace(
        data,
        train=np.ascontiguousarray(data.train[index]),
        train_mask=mask,
        train_counted=len(index) if mask is None else int(mask.sum()),
    )
