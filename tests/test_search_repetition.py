"""The fit planner's repetition trial (mlxllm_search.repetition) and what it buys the law: the part of the
corpus it trains on, when the plan wants one (a data-limited run only), which architecture and how much
text, the trial after the sizes, and R* fitted from its points (synthetic: the true R* recovered; without
it, R* assumed and the unmeasured repetition's credit in the sd).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from mlxllm.data import TokenData  # noqa: E402

import test_search_plan  # noqa: E402
from mlxllm_search.design import GOOD_LEVELS, Speeds, first_unit  # noqa: E402
from mlxllm_search.law_points import MIN_TRIALS  # noqa: E402
from mlxllm_search.plan_search import _next_trials, architecture, plan_candidates  # noqa: E402
from mlxllm_search.repetition import EPOCHS_RANGE, part_of, repetition_choice, target_epochs  # noqa: E402
from mlxllm_search.scaling import R_STAR, REPEAT_FREE_EPOCHS, Point, effective_tokens, fit_law, law_params  # noqa: E402
from mlxllm_search.spec import load_spec  # noqa: E402
from mlxllm_search.throughput import RunLength, model_key  # noqa: E402
from test_scaling import FRACTIONS, SIZES, TRUE, longest_run  # noqa: E402

search_cache, text = test_search_plan.search_cache, test_search_plan.text
SPEEDS = Speeds(seq_len=32, tokens_per_step=128, eval_batches=2, peak_flops=2e10)


def test_the_part_is_spread_over_the_training_split(tmp_path: Path) -> None:
    train = np.arange(100_000, dtype=np.uint32)  # each token its position
    mask = (np.arange(100_000) % 3 != 0).astype(np.uint8)
    data = TokenData(train, train[:500], 500, None, tmp_path, train_mask=mask, train_counted=int(mask.sum()))  # type: ignore[arg-type]
    part = part_of(data, 64 * 4 * 33 * 2, seq_len=32)
    assert len(part.train) == 64 * 4 * 33 * 2 and part.val is data.val
    pieces = part.train.reshape(64, -1).astype(int)  # 64 pieces, each contiguous, evenly spread over the split
    assert np.all(np.diff(pieces, axis=1) == 1) and pieces[0, 0] == 0 and pieces[-1, -1] == 99_999
    assert np.all(np.diff(pieces[:, 0]) > 1_000)
    assert part.train_counted == int(part.train_mask.sum()) < len(part.train)
    assert np.array_equal(part.train_mask, mask[part.train])
    small = part_of(data, 300, seq_len=32)  # too small for 64 pieces of 4 windows: 2 pieces of 150
    assert len(small.train) == 300 and np.count_nonzero(np.diff(small.train.astype(int)) != 1) == 1
    assert part_of(data, 200_000, seq_len=32) is data  # the whole corpus or more: no part


def test_the_plan_wants_a_repetition_trial_only_when_data_limited(tmp_path: Path, text: Path) -> None:
    spec = load_spec(test_search_plan.write_spec(tmp_path, text, "[target]\nseconds = 60\n", warmup=10))
    candidates = plan_candidates(spec, 257)
    length = RunLength("seconds", 60.0, 128)
    tokens = [60 * 128 / SPEEDS.cost(m).step_s for m in candidates]
    assert target_epochs(candidates, SPEEDS, length, max(tokens) / REPEAT_FREE_EPOCHS * 1.01) is None
    many = target_epochs(candidates, SPEEDS, length, float(np.median(tokens)) / 20)
    assert many == pytest.approx(20, rel=0.05)
    assert target_epochs(candidates, SPEEDS, length, float(np.median(tokens)) / 500) == EPOCHS_RANGE[1]
    # After the sizes, the measured architecture of median size on a part its longest run passes 20 times.
    sized = sorted(candidates, key=law_params)[:: max(1, len(candidates) // 3)][:3]
    unit = first_unit(10, 0.2)
    choice, part = repetition_choice(sized, SPEEDS, 30.0, unit, 0.2, 20.0, 10**9)
    assert model_key(choice.model) == model_key(sorted(sized, key=law_params)[1])
    assert choice.ladder.lengths[-1] * 128 / part == pytest.approx(20, rel=0.01) and choice.cost_s <= 30.0
    assert repetition_choice(sized, SPEEDS, 30.0, unit, 0.2, 20.0, 1_000)[1] == 1_000  # never more than the corpus
    assert repetition_choice([], SPEEDS, 30.0, unit, 0.2, 20.0, 10**9) is None
    # The design: sizes first, with a share kept; the repetition trial once MIN_TRIALS sizes are measured.
    base = architecture(spec, spec.base.model, 257)
    assert base is not None
    su = first_unit(spec.base.train.warmup_steps, spec.base.train.cooldown_fraction)
    kept, _ = _next_trials(spec, candidates, [base], [], [], SPEEDS, 40.0, 20.0, 10**6, su)
    whole, _ = _next_trials(spec, candidates, [base], [], [], SPEEDS, 40.0, None, 10**6, su)
    assert kept and whole and kept[0].share_s < whole[0].share_s
    assert min(c.ladder.levels for c in kept) >= GOOD_LEVELS
    # A tight search keeps no share: beside it the sizes would get fewer than GOOD_LEVELS branch points.
    tight, _ = _next_trials(spec, candidates, [base], [], [], SPEEDS, 20.0, 20.0, 10**6, su)
    assert tight and min(c.ladder.levels for c in tight) < GOOD_LEVELS
    assert [c.share_s for c in tight] == [
        c.share_s for c in _next_trials(spec, candidates, [base], [], [], SPEEDS, 20.0, None, 10**6, su)[0]
    ]
    done = [c.model for c in whole[:MIN_TRIALS]]
    rep, part = _next_trials(spec, candidates, [base], done, done, SPEEDS, 40.0, 20.0, 10**6, su)
    assert len(rep) == 1 and part is not None and model_key(rep[0].model) in {model_key(m) for m in done}
    assert _next_trials(spec, candidates, [base], done, done, SPEEDS, 40.0, None, 10**6, su)[1] is None


def _loss(n: float, d: float, u: float, r_star: float) -> float:
    return TRUE["e"] + TRUE["a"] * n ** -TRUE["alpha"] + TRUE["b"] * effective_tokens(d, u, r_star) ** -TRUE["beta"]


def _study(rng: np.random.Generator, r_star: float, corpus: float, part: bool) -> list[Point]:
    """Four sizes on the whole corpus (a few passes at most), and with `part` the 1M model again on a part
    its runs pass over 2-32 times."""
    points = []
    for t, n in enumerate(SIZES[:4]):
        offset = rng.normal(0, 0.01)
        for f in FRACTIONS:
            d = f * longest_run(n)
            points.append(Point(t, int(n), d, _loss(n, d, corpus, r_star) + offset + rng.normal(0, 0.01), 99, 2, 0.01))
    if part:
        n = SIZES[2]
        u, offset = longest_run(n) / 32, rng.normal(0, 0.01)
        for f in FRACTIONS:
            d = f * longest_run(n)
            loss = _loss(n, d, u, r_star) + offset + rng.normal(0, 0.01)
            points.append(Point(9, int(n), d, loss, 99, 2, 0.01, unique_tokens=u))
    return points


@pytest.mark.parametrize("r_star", [2.0, 5.0, 40.0])
def test_r_star_is_fitted_from_the_part_and_predicts_many_passes(r_star: float) -> None:
    corpus, n, d = 40e6, 0.5e6, 30 * 40e6  # a new size, 30 passes over the corpus
    for seed in range(2):
        rng = np.random.default_rng(seed)
        fit = fit_law(_study(rng, r_star, corpus, part=True), corpus)
        assert fit.r_star_fitted
        if r_star < 10:  # a short half-life is pinned by 32 passes; a long one only bounded from below
            assert fit.r_star == pytest.approx(r_star, rel=0.7)
        else:
            assert fit.r_star > 15
        assert fit.epochs_max == pytest.approx(32, rel=0.01) and fit.repetition_credit(n, d) == 0.0
        mean, sd = fit.predict(n, d)
        assert abs(mean - _loss(n, d, corpus, r_star)) < 2 * sd
        without = fit_law(_study(np.random.default_rng(seed), r_star, corpus, part=False), corpus)
        assert not without.r_star_fitted and without.r_star == R_STAR and "assumed" in without.describe()
        credit = without.repetition_credit(n, d)  # what 4 -> 30 passes buy under the assumed R*: in the sd
        assert credit > 0 and without.predict(n, d)[1] >= credit
        assert math.isclose(fit_law(_study(np.random.default_rng(seed), r_star, corpus, True), corpus, 7.0).r_star, 7.0)


def test_a_part_point_must_have_positive_unique_tokens() -> None:
    p = Point(0, 1000, 1e6, 2.0, step=100, warmup_steps=10, unique_tokens=5e5)
    assert replace(p, unique_tokens=None).unique_tokens is None
    with pytest.raises(Exception, match="unique_tokens"):
        Point(0, 1000, 1e6, 2.0, step=100, warmup_steps=10, unique_tokens=0.0)
