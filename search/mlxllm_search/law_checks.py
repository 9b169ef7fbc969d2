"""How far a fitted law can be trusted: a bootstrap over whole trials (a trial's points share its
architecture and seed, so they are not independent; each resample is only a weight vector on the same
points, so all of them are fitted at once), and the held-out checks of the law's own extrapolation: each
trial left out, its longest point predicted from the others (a new architecture); and every trial's longest
point predicted from the runs of at most 1/FORWARD_RATIO of its length (runs longer than any measured).
Each held-out prediction has its own bootstrap. The spread of a bootstrap is its MAD: with few trials some
resamples hold one or two sizes only, and their wild laws would swamp a plain variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mlxllm_search.grid_nnls import exponent_grid, fit_rows, law
from mlxllm_search.law_points import Coverage, Point

REPS, LOO_REPS = 200, 40  # bootstrap resamples of the fit, and of each leave-one-trial-out fit
FORWARD_RATIO = 4.0  # the check of the extrapolation in tokens predicts runs this many times longer


def spread(draws: np.ndarray, center: float) -> float:
    """Variance of the bootstrap's predictions around the fit's, robustly (the MAD)."""
    return float((1.4826 * np.median(np.abs(draws - center))) ** 2)


def scatter(residuals: np.ndarray, weights: np.ndarray, floor: float) -> float:
    """sd of a run around the law: the weighted residuals with the 5 fitted parameters taken off."""
    dof = max(1.0, float((weights > 0).sum()) - 5.0)
    return max(math.sqrt(float((weights * residuals**2).sum()) / dof), floor)


def diff_scale(z: np.ndarray) -> float:
    """A difference's factor from the held-out z-scores: their spread about their mean, the shift they share
    taken off (at least 1; with a single one, its size)."""
    if len(z) < 2:
        return max(1.0, float(np.abs(z).max(initial=0.0)))
    return max(1.0, float(np.std(z, ddof=1)))


def forward_points(points: Sequence[Point]) -> np.ndarray | None:
    """The points the check of the extrapolation in tokens fits to: each trial's runs up to 1/FORWARD_RATIO
    of its longest (else up to half of it), when those still pin the law; None: they do not."""
    longest: dict[int, float] = {}
    for p in points:
        longest[p.trial] = max(longest.get(p.trial, 0.0), p.tokens)
    for ratio in (FORWARD_RATIO, 2.0):
        keep = np.array([p.tokens * ratio <= longest[p.trial] * 1.0001 for p in points])
        if not Coverage.of([p for p, k in zip(points, keep) if k]).missing():
            return keep
    return None


def _resamples(trial: np.ndarray, pool: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicity of each point (R, n) when `reps` resamples of the trials in `pool` are drawn."""
    picks = rng.choice(pool, size=(reps, len(pool)))
    per_trial = np.stack([np.bincount(row, minlength=trial.max() + 1) for row in picks])
    return per_trial[:, trial].astype(float)


def bootstrap(
    trial: np.ndarray,
    forward: np.ndarray | None,
    xs: tuple[np.ndarray, np.ndarray, np.ndarray],
    h: np.ndarray,
    floor: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(the bootstrap's parameter draws, the held-out z-scores), all fits in one batch: REPS resamples of
    the trials, then for each check (each trial left out; the shorter runs only) its fit and LOO_REPS
    resamples of the trials it keeps. xs: (N, D_eff, loss) of the points, N and D_eff scaled; h: the
    points' Huber weights; trial: each point's trial index (0..k-1)."""
    xn, xd, y = xs
    k = int(trial.max()) + 1
    longest = [int(np.flatnonzero(trial == t)[np.argmax(xd[trial == t])]) for t in range(k)]
    checks = [(trial != t, [longest[t]]) for t in range(k)]
    if forward is not None:
        checks.append((forward, [i for i in longest if not forward[i]]))
    mult = [_resamples(trial, np.arange(k), REPS, rng)]
    for mask, _ in checks:
        mult += [mask[None].astype(float), _resamples(trial, np.unique(trial[mask]), LOO_REPS, rng) * mask]
    m = np.concatenate(mult)
    params = fit_rows(m * h, m.sum(1), xn, xd, y, exponent_grid(), exponent_grid())
    z = []
    for c, (mask, held) in enumerate(checks):
        lo = REPS + c * (1 + LOO_REPS)
        sigma = scatter(y - law(params[lo], xn, xd), mask * h, floor)
        for i in held:
            mean = law(params[lo], xn[i], xd[i])
            sd2 = spread(law(params[lo + 1 : lo + 1 + LOO_REPS], xn[i], xd[i]), mean)
            z.append((y[i] - mean) / math.sqrt(sd2 + sigma**2))
    return params[:REPS], np.array(z)
