"""The scaling-law fit across trials (mlxllm_search.scaling): it recovers a known L(N, D), its sd is
calibrated on many noisy synthetic studies, repeated data saturates, and it refuses warm-up points, points
no lower than a table of token pairs (mlxllm_search.pair_floor, checked on a Markov chain) and too few points.
Synthetic points only: no training, a few seconds."""

from __future__ import annotations

import json
import math
from dataclasses import replace

from mlxllm import MlxllmError
from mlxllm.data import TokenData
from mlxllm.tokenizer import ByteTokenizer

import numpy as np
import pytest
from mlxllm_search.pair_floor import pair_floor
from mlxllm_search.scaling import (
    BEYOND_SHARE,
    R_STAR,
    InadmissiblePoints,
    LawFit,
    NotEnoughPoints,
    Point,
    effective_tokens,
    fit_law,
    split_points,
)

TRUE = {"e": 1.0, "a": 75.0, "alpha": 0.4, "b": 50.0, "beta": 0.3}  # L = 1.73 at 0.2M/1M, 1.18 at 5M/50M
SIZES = (0.2e6, 0.5e6, 1e6, 2e6, 5e6)
FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)  # a trial's cooldown branches, as fractions of its longest run


def true_loss(n: float, d: float, law: dict[str, float] = TRUE, unique: float = math.inf) -> float:
    deff = d if math.isinf(unique) else effective_tokens(d, unique)
    return law["e"] + law["a"] * n ** -law["alpha"] + law["b"] * deff ** -law["beta"]


def longest_run(n: float) -> float:
    """Tokens of a trial's longest run: 50M for the smallest model, fewer for larger ones (slower, same time)."""
    return 50e6 * (SIZES[0] / n) ** 0.5


def synthetic(
    rng: np.random.Generator,
    law: dict[str, float] = TRUE,
    sizes: tuple[float, ...] = SIZES,
    noise: float = 0.01,
    trial_sd: float = 0.01,
    unique: float = math.inf,
) -> list[Point]:
    """A study's points: one trial per size with its own offset (shape, seed), each point its evaluation noise."""
    points = []
    for t, n in enumerate(sizes):
        offset = rng.normal(0, trial_sd)
        for f in FRACTIONS:
            d = f * longest_run(n)
            loss = true_loss(n, d, law, unique) + offset + rng.normal(0, noise)
            points.append(Point(t, int(n), d, loss, step=int(d / 4096), warmup_steps=20, noise_sd=noise))
    return points


def random_study(rng: np.random.Generator) -> tuple[dict[str, float], tuple[float, ...]]:
    """A law drawn around TRUE and 4 to 6 trial sizes log-spaced over 0.2M-5M: one of many synthetic studies."""
    law = {
        "e": rng.uniform(0.8, 1.5),
        "a": 75 * rng.uniform(0.5, 2),
        "alpha": rng.uniform(0.25, 0.6),
        "b": 50 * rng.uniform(0.5, 2),
        "beta": rng.uniform(0.2, 0.45),
    }
    return law, tuple(np.geomspace(0.2e6, 5e6, int(rng.integers(4, 7))))


def random_size(rng: np.random.Generator) -> float:
    """A new architecture's N, log-uniform over the trials' sizes."""
    return math.exp(rng.uniform(math.log(0.2e6), math.log(5e6)))


def test_recovers_a_known_law_and_predicts_ten_times_longer():
    # beyond_share 0: in a synthetic study the law holds past the runs, so only the fit's own uncertainty counts.
    points = synthetic(np.random.default_rng(0), noise=0.003, trial_sd=0.003)
    fit = fit_law(points, unique_tokens=1e15, beyond_share=0.0)
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.25)
    assert fit.beta == pytest.approx(TRUE["beta"], rel=0.25)
    assert fit.e == pytest.approx(TRUE["e"], abs=0.1)
    for n in (0.3e6, 1e6, 4e6):
        d = 10 * longest_run(n)
        mean, sd = fit.predict(n, d)
        assert abs(mean - true_loss(n, d)) < sd < 0.03, (n, mean, sd, true_loss(n, d))
        assert fit.extrapolation(n, d) is None  # inside the sizes, and not beyond FAR_TOKENS
    assert fit.extrapolation(20e6, 1e6) and fit.extrapolation(1e6, 100 * fit.tokens_max)


def test_the_fall_credited_beyond_the_runs_widens_a_prediction_and_mostly_cancels_in_a_difference():
    fit = fit_law(synthetic(np.random.default_rng(0), noise=0.003, trial_sd=0.003), unique_tokens=1e15)
    exact = replace(fit, beyond_share=0.0)
    assert fit.beyond_share == BEYOND_SHARE > 0
    n = 1e6
    inside, far = 0.5 * fit.tokens_max, 20 * fit.tokens_max
    assert fit.beyond_credit(n, inside) == 0.0 and fit.predict(n, inside) == exact.predict(n, inside)
    credit = fit.beyond_credit(n, far)
    assert credit == pytest.approx(fit.loss(n, fit.tokens_max) - fit.loss(n, far)) and credit > 0
    (mean, sd), (_, sd0) = fit.predict(n, far), exact.predict(n, far)
    assert mean == exact.predict(n, far)[0] and sd == pytest.approx(math.hypot(sd0, BEYOND_SHARE * credit))
    # Two sizes run to the same length: one shift for both, so the difference widens by the credits' difference.
    a, b = (n, far), (2 * n, far)
    (_, dsd), (_, dsd0) = fit.difference(a, b), exact.difference(a, b)
    gap = BEYOND_SHARE * (fit.beyond_credit(*a) - fit.beyond_credit(*b))
    assert dsd == pytest.approx(math.hypot(dsd0, gap)) and abs(gap) < BEYOND_SHARE * credit / 4
    assert LawFit.from_dict(fit.to_dict()) == fit


def test_calibrated_on_many_noisy_studies():
    """About 95% of held-out measurements (a new architecture, 3-10x longer than any trial of its size)
    fall within 2 sd; the laws vary from study to study."""
    rng = np.random.default_rng(1)
    z = []
    for s in range(80):
        law, sizes = random_study(rng)
        fit = fit_law(synthetic(rng, law, sizes), unique_tokens=1e15, seed=s, beyond_share=0.0)
        n = random_size(rng)
        d = rng.uniform(3, 10) * longest_run(n)
        measured = true_loss(n, d, law) + rng.normal(0, 0.01) + rng.normal(0, 0.01)
        mean, sd = fit.predict(n, d)
        z.append((measured - mean) / sd)
    inside = float(np.mean(np.abs(z) < 2))
    assert 0.85 <= inside <= 0.995, (inside, np.round(z, 2))
    assert 0.6 < math.sqrt(float(np.mean(np.square(z)))) < 1.4  # neither overconfident nor uselessly wide


def test_repeated_data_saturates():
    u = 1e6
    assert effective_tokens(0.5 * u, u) == 0.5 * u
    d = np.array([1, 2, 4, 16, 64, 1000]) * u
    deff = effective_tokens(d, u)
    assert np.all(np.diff(deff) > 0) and deff[1] == pytest.approx(2 * u, rel=0.04)  # one repeat: nearly new
    assert deff[-1] == pytest.approx(u * (1 + R_STAR), rel=1e-3) and deff[-1] < 17 * u
    # a fit on a small corpus knows: 256 passes are barely better than 64, where fresh text would be
    fit = fit_law(synthetic(np.random.default_rng(2), unique=u, noise=0.003, trial_sd=0.003), unique_tokens=u)
    gain_repeated = fit.loss(1e6, 64 * u) - fit.loss(1e6, 256 * u)
    gain_fresh = fit.loss(1e6, 64 * u, unique_tokens=1e15) - fit.loss(1e6, 256 * u, unique_tokens=1e15)
    assert 0 < gain_repeated < gain_fresh / 10
    assert fit.extrapolation(1e6, 500 * u)  # far more passes than measured


def test_warmup_points_are_refused():
    early = Point(0, 1_000_000, 4096 * 30, 3.1, step=30, warmup_steps=20)  # 10 steps past its warm-up
    inside = Point(0, 1_000_000, 4096 * 10, 4.5, step=10, warmup_steps=20)
    late = Point(0, 1_000_000, 4096 * 200, 2.0, step=200, warmup_steps=20)
    usable, refused = split_points([early, inside, late])
    assert usable == [late] and refused == [early, inside]
    points = synthetic(np.random.default_rng(3))
    with pytest.raises(InadmissiblePoints, match="warm-up"):
        fit_law([*points, inside], unique_tokens=1e15)
    assert split_points(points)[1] == []


def test_points_above_the_pairs_level_are_refused(tmp_path):
    high = Point(0, 1_000_000, 4096 * 200, 2.6, step=200, warmup_steps=20)  # past its warm-up, not below
    low = Point(0, 1_000_000, 4096 * 400, 2.2, step=400, warmup_steps=20)
    assert split_points([high, low], floor=2.5) == ([low], [high])
    assert split_points([high, low]) == ([high, low], [])  # no level known: only the warm-up is checked
    points = synthetic(np.random.default_rng(5))
    with pytest.raises(InadmissiblePoints, match="table of token pairs"):
        fit_law(points, unique_tokens=1e15, floor=min(p.loss for p in points) + 1e-9)


def test_the_pairs_level_is_a_bigram_models_validation_loss(tmp_path):
    # A first-order Markov chain over 8 bytes: the best a table of pairs can do is its entropy rate.
    rng = np.random.default_rng(0)
    k, n = 8, 400_000
    trans = rng.dirichlet(np.full(k, 0.3), size=k)
    states = np.empty(n, dtype=np.int64)
    states[0] = 0
    u = rng.random(n)
    cum = np.cumsum(trans, axis=1)
    for i in range(1, n):
        states[i] = min(int(np.searchsorted(cum[states[i - 1]], u[i])), k - 1)
    stationary = np.bincount(states, minlength=k) / n
    rate = -float((stationary[:, None] * trans * np.log(trans)).sum())
    tokens = (states + 97).astype(np.uint16)
    cut = int(n * 0.9)
    data = TokenData(tokens[:cut], tokens[cut:], n - cut, ByteTokenizer(), tmp_path)
    assert pair_floor(data) == pytest.approx(rate, abs=0.02)
    # The unigram level is higher, and a masked validation split counts its targets only.
    assert pair_floor(data) < -float((stationary * np.log(stationary)).sum())
    mask = np.zeros(n - cut, dtype=np.uint8)
    assert pair_floor(replace(data, val_mask=mask)) is None


def test_too_few_points_say_what_is_missing():
    points = [p for p in synthetic(np.random.default_rng(4)) if p.trial < 2]
    with pytest.raises(NotEnoughPoints) as e:
        fit_law(points, unique_tokens=1e15)
    assert e.value.coverage.trials == 2 and e.value.coverage.sizes == 2
    assert any("model sizes" in m for m in e.value.missing) and any("trials" in m for m in e.value.missing)
    one_length = [p for p in synthetic(np.random.default_rng(4)) if p.tokens == longest_run(p.n_params)]
    with pytest.raises(NotEnoughPoints, match="finished-loss points"):
        fit_law(one_length, unique_tokens=1e15)
    with pytest.raises(MlxllmError, match="invalid"):
        Point(0, 1000, 1e6, float("nan"), step=100, warmup_steps=10)


def test_one_bad_evaluation_does_not_bend_the_law():
    points = synthetic(np.random.default_rng(5))
    bad = [
        p if i != 7 else Point(p.trial, p.n_params, p.tokens, p.loss + 0.5, p.step, p.warmup_steps)
        for i, p in enumerate(points)
    ]
    n, d = 1e6, 10 * longest_run(1e6)
    (clean, sd), (robust, _) = fit_law(points, 1e15).predict(n, d), fit_law(bad, 1e15).predict(n, d)
    assert abs(robust - clean) < sd


def test_json_round_trip_predicts_the_same():
    fit = fit_law(synthetic(np.random.default_rng(6)), unique_tokens=3e6)
    again = type(fit).from_dict(json.loads(json.dumps(fit.to_dict())))
    assert again == fit
    for n, d in ((0.3e6, 1e6), (2e6, 4e8)):
        assert again.predict(n, d) == fit.predict(n, d)


def test_differences_are_calibrated_where_predictions_share_a_shift():
    """Every trial starts on a plateau above the power law (a misfit they share), so the held-out predictions
    of longer runs all miss the same way: that shift cancels in a difference, whose factor from the held-out
    check is the misses' spread about it. About 95% of measured differences between two new
    architectures (3-10x longer runs, each with its own offset and noise) fall within 2 sd of it."""
    rng = np.random.default_rng(1)
    z, narrower = [], []
    for s in range(60):
        law, sizes = random_study(rng)
        trial_sd, bump = rng.uniform(0.005, 0.03), rng.uniform(0.1, 0.4)
        points = [
            replace(p, loss=p.loss + bump * math.exp(-p.tokens / 3e6))
            for p in synthetic(rng, law, sizes, noise=0.005, trial_sd=trial_sd)
        ]
        fit = fit_law(points, unique_tokens=1e15, seed=s)
        n1, n2 = random_size(rng), random_size(rng)
        f = rng.uniform(3, 10)
        d1, d2 = f * longest_run(n1), f * longest_run(n2)
        measured = [
            true_loss(n, d, law) + bump * math.exp(-d / 3e6) + rng.normal(0, trial_sd) + rng.normal(0, 0.005)
            for n, d in ((n1, d1), (n2, d2))
        ]
        mean, sd = fit.difference((n1, d1), (n2, d2))
        z.append((measured[0] - measured[1] - mean) / sd)
        narrower.append(fit.diff_scale / fit.scale)
    inside = float(np.mean(np.abs(z) < 2))
    assert 0.85 <= inside <= 0.995, (inside, np.round(z, 2))
    assert 0.6 < math.sqrt(float(np.mean(np.square(z)))) < 1.4
    assert np.mean(np.array(narrower) < 0.95) > 0.2  # where the misses share a shift, a difference is narrower
