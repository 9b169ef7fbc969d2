"""The loss of a finished run as a function of its parameters and tokens, fitted across a search's trials:
L(N, D) = E + A (N / n_ref)^-alpha + B (D_eff / d_ref)^-beta (Chinchilla's approach 3), with its calibrated
uncertainty at any (N, D).

Why each part is there:
- N counts the parameters without the embedding table (`law_params`), as Kaplan et al. (2020) do: with it
  left out, models of one size but different depths fall on one curve; counted, a wide shallow model with a
  2,048-piece BPE vocabulary would look larger than a deep narrow one that is as good. With byte tokens the
  table is small and the choice matters little. An untied output projection is counted: it is real compute.
- D_eff (Muennighoff et al. 2023): tokens repeated beyond the U unique ones a run trains on are worth less
  and less, D_eff = U + U R* (1 - exp(-R / R*)) with R = D / U - 1 repetitions. Runs on the whole corpus of
  a short search repeat it a few times at most, which cannot pin R*: then it is their fit, 15.4, assumed.
  When some points are of runs on a part of the corpus (the planner's repetition trial: U small, R large),
  R* is fitted on a log grid by the same profile likelihood, with a weak log-normal prior at 15.4; small
  corpora and small models repeat far more than the models they fitted, and R* decides the plan there.
- The exponents are found on a log grid and (E, A, B) >= 0 by exact non-negative least squares for each
  (`grid_nnls`); the profile likelihood n/2 log(RSS/n) weighs the exponents' weak priors against the data
  without a known noise level. Huber weights (iterated) keep one bad evaluation from bending the law.
- Parameter uncertainty is a bootstrap over whole trials, and the sd is scaled by max(1, rms z) over the
  held-out checks of the law's own extrapolation (`law_checks`: a new architecture, runs longer than any
  measured), so that the law's misfit, which neither the bootstrap nor sigma sees, widens the sd.
- The scatter sigma of one finished run around the law (seed, shape at equal N, evaluation batches) is the
  fit's residual scale, never below the points' own evaluation noise.
- A difference of two runs' losses (is the pick better than the base?) is widened by the held-out misses'
  spread about their common shift (`diff_scale`), not by their size: a shift every prediction shares
  cancels in it. Each run's scatter stays whole: a misfit the points share along a run (an early plateau)
  does not cancel between runs of unequal length.
- A short search's runs end early, where the loss falls faster than later: the fall the law credits beyond
  the longest run (`beyond_credit`) is uncertain by BEYOND_SHARE of itself, one shift for every architecture.
- Not modelled: a loss that rises again after many passes over the text (overfitting); the law saturates.
  So what the law credits to passes beyond the most measured (and beyond REPEAT_FREE_EPOCHS) is counted
  as uncertain as its own size, in the sd; such predictions also say so (`extrapolation`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from typing import Any

from mlxllm.config import ModelConfig
from mlxllm.errors import MlxllmError

import numpy as np

from mlxllm_search.grid_nnls import EXPONENT_RANGE, GRID, exponent_grid, exponents_prior, fit_rows, law
from mlxllm_search.law_checks import bootstrap, diff_scale, forward_points, scatter, spread
from mlxllm_search.law_points import (
    DISTINCT,
    MIN_STEPS_AFTER_WARMUP,
    Coverage,
    InadmissiblePoints,
    NotEnoughPoints,
    Point,
    admit,
    first_step,
    split_points,
)

__all__ = [
    "Coverage",
    "InadmissiblePoints",
    "LawFit",
    "NotEnoughPoints",
    "Point",
    "effective_tokens",
    "first_step",
    "fit_law",
    "law_params",
    "split_points",
]

R_STAR = 15.4  # Muennighoff et al.'s fitted half-life of repeated data, in repetitions
R_STAR_GRID = np.geomspace(0.5, 100.0, 24)  # where R* is fitted, when the points can pin it
R_STAR_PRIOR_LOG_SD = 1.0  # weak: a factor 2.7 from 15.4 is one sd
HUBER_K = 1.345  # 95% efficiency on Gaussian residuals
IRLS_ROUNDS = 3
FAR_TOKENS = 10.0  # beyond this factor over the longest run measured the tokens exponent is unchecked
REPEAT_FREE_EPOCHS = 4.0  # up to here repeated data is nearly as good as new (Muennighoff et al.)
# 1 sd of the fall the law credits beyond the longest run, as a share of it: a short search's runs fall faster
# than a long run's later stretch (and do not yet overfit). On Tiny Shakespeare laws fitted to runs of at most
# 330,000-440,000 tokens missed real runs 3-40x longer all too low: by a median quarter of that fall in one
# search, by 0.3-0.56 of it (median 0.45) in another, where a quarter left the misses at 2 sd.
BEYOND_SHARE = 0.35


def law_params(model: ModelConfig) -> int:
    """The N of the law for an architecture (see the module docstring): parameters without the embeddings."""
    return model.num_params(embeddings=False)


def effective_tokens(tokens: Any, unique_tokens: Any, r_star: float = R_STAR) -> Any:
    """D_eff of `tokens` (a float or an array) trained on a text of `unique_tokens` (a float, or one each)."""
    d = np.asarray(tokens, dtype=float)
    repeats = np.maximum(d / unique_tokens - 1.0, 0.0)
    out = np.where(d <= unique_tokens, d, unique_tokens * (1.0 + r_star * -np.expm1(-repeats / r_star)))
    return float(out) if out.ndim == 0 else out


def _robust_fit(xn: np.ndarray, xd: np.ndarray, y: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """The central fit (E, A, alpha, B, beta) with Huber weights, refined on a fine grid around the best
    exponents; returns (parameters, the final Huber weights)."""
    alphas, betas = exponent_grid(), exponent_grid()
    h, n = np.ones_like(y), np.array([float(len(y))])
    for _ in range(IRLS_ROUNDS):
        p = fit_rows(h[None], n, xn, xd, y, alphas, betas)[0]
        r = y - law(p, xn, xd)
        scale = max(1.4826 * float(np.median(np.abs(r))), floor)
        h = np.minimum(1.0, HUBER_K * scale / np.maximum(np.abs(r), 1e-300))
    step = (EXPONENT_RANGE[1] / EXPONENT_RANGE[0]) ** (1 / (GRID - 1))
    fine = lambda x: np.geomspace(x / step, x * step, 9)  # noqa: E731
    return fit_rows(h[None], n, xn, xd, y, fine(p[2]), fine(p[4]))[0], h


@dataclass(frozen=True)
class LawFit:
    """A fitted L(N, D) with what its predictions' uncertainty is made of; JSON by to_dict / from_dict."""

    e: float  # the irreducible loss
    a: float  # the size term at n_ref
    alpha: float
    b: float  # the data term at d_ref effective tokens
    beta: float
    n_ref: float  # N and D_eff are scaled by these (the points' geometric means) for a well-posed fit
    d_ref: float
    unique_tokens: float  # the corpus' U
    r_star: float  # fitted when r_star_fitted, else assumed (R_STAR)
    sigma: float  # sd of one finished run around the law (seed, shape at equal N, evaluation)
    scale: float  # >= 1: the sd's factor from the held-out check
    draws: tuple[tuple[float, ...], ...]  # bootstrap (E, A, alpha, B, beta), resampling whole trials
    held_out_z: tuple[float, ...]  # each trial's longest point predicted without its trial, then from the
    # trials' shorter runs only (when those pin the law), before scaling
    n_range: tuple[float, float]  # smallest and largest N measured
    tokens_max: float  # the longest run measured
    epochs_max: float  # the most passes over its text that a run measured
    points: int
    trials: int
    r_star_fitted: bool = False  # R* fitted to runs on a part of the corpus (else assumed)
    diff_scale: float | None = None  # >= 1: the held-out misses' spread about their common shift; None: scale
    beyond_share: float = BEYOND_SHARE  # 1 sd of the fall beyond the runs, as a share of it (0: the law holds there)

    def _x(self, n_params: float, tokens: float, unique_tokens: float | None) -> tuple[float, float]:
        u = self.unique_tokens if unique_tokens is None else unique_tokens
        return n_params / self.n_ref, effective_tokens(tokens, u, self.r_star) / self.d_ref

    def loss(self, n_params: float, tokens: float, unique_tokens: float | None = None) -> float:
        """The law's mean at (N, D); `unique_tokens` other than the corpus' asks "with this much text"."""
        return float(
            law(np.array([self.e, self.a, self.alpha, self.b, self.beta]), *self._x(n_params, tokens, unique_tokens))
        )

    def draws_at(self, n_params: float, tokens: float, unique_tokens: float | None = None) -> np.ndarray:
        """The bootstrap fits' losses at (N, D): how the law's parameters are uncertain there."""
        return law(self._draws, *self._x(n_params, tokens, unique_tokens))

    @cached_property
    def _draws(self) -> np.ndarray:
        return np.array(self.draws)

    def predict(self, n_params: float, tokens: float, unique_tokens: float | None = None) -> tuple[float, float]:
        """(mean, sd) of the finished loss of one run of N parameters trained on `tokens`: the bootstrap's
        spread around the fit, with the scatter of a run, times the held-out check's factor; and the
        unmeasured repetition's credit (`repetition_credit`) and a share of the fall beyond the runs
        (`beyond_credit`)."""
        return self.loss(n_params, tokens, unique_tokens), self.sd_with_longer_runs(
            n_params, tokens, 1.0, unique_tokens
        )

    def sd_with_longer_runs(
        self, n_params: float, tokens: float, factor: float, unique_tokens: float | None = None
    ) -> float:
        """The sd `predict` gives at (N, tokens) were every trial's runs `factor` (>= 1; 1: as measured) times
        as long, as a search `factor` times as long measures them: the law's reach beyond the longest run and the
        passes beyond the most measured shrink as the runs grow (what the law credits there stays its own), and
        the bootstrap's spread about as 1 / factor (each trial's points further along pin it); one run's
        scatter around the law stays."""
        if not factor >= 1:
            raise ValueError(f"factor is how many times longer the runs are, at least 1 (got {factor!r})")
        longer = self
        if factor > 1:
            longer = replace(self, tokens_max=self.tokens_max * factor, epochs_max=self.epochs_max * factor)
        mean = self.loss(n_params, tokens, unique_tokens)
        var = spread(self.draws_at(n_params, tokens, unique_tokens), mean) / factor
        credit = longer.repetition_credit(n_params, tokens, unique_tokens)
        beyond = self.beyond_share * longer.beyond_credit(n_params, tokens, unique_tokens)
        return math.sqrt(self.scale**2 * (var + self.sigma**2) + credit**2 + beyond**2)

    def difference(self, a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
        """(mean, sd) of run a's finished loss less run b's, each (N, tokens) on the corpus: the bootstrap's
        spread of the difference (what moves both predictions together cancels), the scatter of each run
        around the law (independent: shape at equal N is not in it), times the held-out misses' spread about
        their common shift (`diff_scale`: the shift cancels); and the difference of their repetition credits
        (one R* for both)."""
        mean = self.loss(*a) - self.loss(*b)
        var = spread(self.draws_at(*a) - self.draws_at(*b), mean)
        credit = self.repetition_credit(*a) - self.repetition_credit(*b)
        beyond = self.beyond_share * (self.beyond_credit(*a) - self.beyond_credit(*b))
        scale = self.scale if self.diff_scale is None else self.diff_scale
        return mean, math.sqrt(scale**2 * (var + 2 * self.sigma**2) + credit**2 + beyond**2)

    def repetition_credit(self, n_params: float, tokens: float, unique_tokens: float | None = None) -> float:
        """The loss the law credits to the passes over the text beyond both the most measured and
        REPEAT_FREE_EPOCHS: there the repetition term is the law's assumption, not a measurement, and a run
        may even get worse (overfitting), so this much is uncertain."""
        u = self.unique_tokens if unique_tokens is None else unique_tokens
        cap = max(REPEAT_FREE_EPOCHS, self.epochs_max) * u
        if tokens <= cap:
            return 0.0
        return max(0.0, self.loss(n_params, cap, unique_tokens) - self.loss(n_params, tokens, unique_tokens))

    def beyond_credit(self, n_params: float, tokens: float, unique_tokens: float | None = None) -> float:
        """The fall the law credits to the tokens beyond the longest run measured (0 within it): the law's
        reach, which the runs did not measure; `beyond_share` of it is 1 sd of the prediction."""
        if tokens <= self.tokens_max:
            return 0.0
        return max(
            0.0, self.loss(n_params, self.tokens_max, unique_tokens) - self.loss(n_params, tokens, unique_tokens)
        )

    def extrapolation(self, n_params: float, tokens: float, unique_tokens: float | None = None) -> str | None:
        """Why a prediction at (N, D) reaches beyond what was measured (None: it does not): N outside the
        measured sizes by more than DISTINCT, tokens beyond FAR_TOKENS times the longest run, or more than
        REPEAT_FREE_EPOCHS passes over the corpus and twice the most measured (the repetition term is assumed)."""
        u = self.unique_tokens if unique_tokens is None else unique_tokens
        lo, hi = self.n_range
        out = []
        if not lo / DISTINCT <= n_params <= hi * DISTINCT:
            out.append(f"{n_params / 1e6:.3g}M parameters, measured {lo / 1e6:.3g}M to {hi / 1e6:.3g}M")
        if tokens > FAR_TOKENS * self.tokens_max:
            out.append(f"{tokens / self.tokens_max:.0f}x the longest run measured")
        if tokens / u > max(REPEAT_FREE_EPOCHS, 2 * self.epochs_max):
            out.append(f"{tokens / u:.0f} passes over the text, measured up to {self.epochs_max:.1f}")
        return "; ".join(out) or None

    def describe(self) -> str:
        return (
            f"L = {self.e:.3f} + {self.a:.3f} (N/{self.n_ref / 1e6:.3g}M)^-{self.alpha:.2f} + {self.b:.3f} "
            f"(D_eff/{self.d_ref / 1e6:.3g}M)^-{self.beta:.2f}, R* {self.r_star:.3g} "
            f"({'fitted' if self.r_star_fitted else 'assumed'}); run scatter {self.sigma:.4f}, sd x{self.scale:.2f} (a "
            f"difference's x{self.diff_scale if self.diff_scale is not None else self.scale:.2f}) from "
            f"{len(self.held_out_z)} held-out predictions; {self.points} points of {self.trials} trials"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LawFit:
        tup = {"draws": lambda v: tuple(tuple(map(float, r)) for r in v), "held_out_z": tuple, "n_range": tuple}
        return cls(**{k: tup[k](v) if k in tup else v for k, v in d.items()})


def fit_law(
    points: Sequence[Point],
    unique_tokens: float,
    r_star: float | None = None,
    min_steps_after_warmup: int = MIN_STEPS_AFTER_WARMUP,
    seed: int = 0,
    floor: float | None = None,
    beyond_share: float = BEYOND_SHARE,
) -> LawFit:
    """Fit the law to finished-loss points of a corpus of `unique_tokens` (see the module docstring); a point
    with its own unique_tokens trained on that part of it. `r_star` None: fitted when some points trained on a
    part, else R_STAR. Raises InadmissiblePoints for points inside or just after their warm-up, or not below
    `floor` (pair_floor), NotEnoughPoints when the rest cannot pin the law. `beyond_share`: 0 where the law is
    known to hold past the runs (a synthetic study)."""
    admit(points, min_steps_after_warmup, floor)
    if not unique_tokens > 0:
        raise MlxllmError(f"The corpus' unique tokens must be positive (got {unique_tokens!r}).")
    coverage = Coverage.of(points)
    if coverage.missing():
        raise NotEnoughPoints(coverage)
    ids = sorted({p.trial for p in points})
    trial = np.array([ids.index(p.trial) for p in points])
    n = np.array([float(p.n_params) for p in points])
    d = np.array([p.tokens for p in points])
    y = np.array([p.loss for p in points])
    noise = [p.noise_sd for p in points if p.noise_sd is not None]
    floor = max(float(np.median(noise)) if noise else 0.0, 1e-4)
    u = np.array([p.unique_tokens or unique_tokens for p in points], dtype=float)
    n_ref = float(np.exp(np.log(n).mean()))
    xn = n / n_ref
    fitted = r_star is None and bool((u < unique_tokens * 0.999).any())
    r_star = _fit_r_star(xn, d, u, y) if fitted else R_STAR if r_star is None else r_star
    deff = effective_tokens(d, u, r_star)
    d_ref = float(np.exp(np.log(deff).mean()))
    xd = deff / d_ref
    central, h = _robust_fit(xn, xd, y, floor)
    sigma = scatter(y - law(central, xn, xd), h, floor)
    draws, z = bootstrap(trial, forward_points(points), (xn, xd, y), h, floor, np.random.default_rng(seed))
    return LawFit(
        *map(float, central),
        n_ref=n_ref,
        d_ref=d_ref,
        unique_tokens=float(unique_tokens),
        r_star=r_star,
        sigma=sigma,
        scale=max(1.0, float(np.sqrt(np.mean(z**2)))),
        draws=tuple(tuple(map(float, r)) for r in draws),
        held_out_z=tuple(map(float, z)),
        n_range=(float(n.min()), float(n.max())),
        tokens_max=float(d.max()),
        epochs_max=float((d / u).max()),
        points=len(points),
        trials=len(ids),
        r_star_fitted=fitted,
        diff_scale=diff_scale(z),
        beyond_share=beyond_share,
    )


def _fit_r_star(xn: np.ndarray, d: np.ndarray, u: np.ndarray, y: np.ndarray) -> float:
    """The R* of R_STAR_GRID that best explains the points (tokens d of texts of u unique tokens): at each,
    the law fitted by plain least squares with the exponents profiled; the one of least n/2 log(RSS/n) with
    the exponents' priors and R*'s own. Huber weights are left out here: the runs on a part of the corpus
    are the only evidence on R*, and a robust fit would discount exactly them when they disagree."""
    grid = exponent_grid()
    ones, count = np.ones((1, len(y))), np.array([float(len(y))])
    best, best_rs = math.inf, R_STAR
    for rs in R_STAR_GRID:
        deff = effective_tokens(d, u, float(rs))
        xd = deff / float(np.exp(np.log(deff).mean()))
        p = fit_rows(ones, count, xn, xd, y, grid, grid)[0]
        rss = max(float(((y - law(p, xn, xd)) ** 2).sum()), 1e-12)
        obj = 0.5 * len(y) * math.log(rss / len(y)) + exponents_prior(p[2], p[4])
        obj += math.log(rs / R_STAR) ** 2 / (2 * R_STAR_PRIOR_LOG_SD**2)
        if obj < best:
            best, best_rs = obj, float(rs)
    return best_rs
