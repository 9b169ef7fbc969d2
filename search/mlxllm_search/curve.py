"""Learning curves: L(x) = a + b * x^-c fitted to a trial's validation losses (x in optimizer steps), the
loss it predicts far beyond the last point with its uncertainty, and Kendall's tau to check predictions.

numpy only: for each exponent c the curve is linear in (a, b), so c is found on a grid and refined by a
golden-section search, and (a, b) by least squares. The uncertainty is the delta method on the fit's
covariance, plus the scatter of single evaluations around the curve (a measured loss has both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

C_RANGE = (0.05, 3.0)
PRIOR_C = 0.5  # when too few points pin the exponent down: a typical language-model loss curve's


@dataclass(frozen=True)
class Curve:
    a: float  # the loss the curve tends to
    b: float
    c: float
    cov: tuple[tuple[float, ...], ...] | None  # of (a, b, c), or of (a, b) when c was fixed; None: no residual
    noise: float  # scatter of the points around the curve (RMS)
    n: int  # points fitted

    def __call__(self, x: float) -> float:
        return self.a + self.b * x**-self.c

    def predict(self, x: float) -> tuple[float, float]:
        """(loss, its standard deviation) at x."""
        mean = self(x)
        if self.cov is None:  # an exact fit of two points: the extrapolated drop itself is the uncertainty
            return mean, max(abs(self.b * x**-self.c), 1e-3)
        cov = np.array(self.cov)
        grad = np.array([1.0, x**-self.c, -self.b * x**-self.c * math.log(x)])[: len(cov)]
        return mean, math.sqrt(max(0.0, float(grad @ cov @ grad)) + self.noise**2)


def _linear(x: np.ndarray, y: np.ndarray, c: float) -> tuple[float, float, float]:
    """Least-squares (a, b) for a fixed c, with b >= 0 (a loss curve does not rise) and a >= 0 (nor does a
    cross-entropy fall below zero); returns (a, b, rss)."""
    z = x**-c
    A = np.stack([np.ones_like(z), z], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    if b < 0:
        a, b = float(y.mean()), 0.0
    elif a < 0:
        a, b = 0.0, float(max(0.0, (z @ y) / (z @ z)))
    rss = float(((a + b * z - y) ** 2).sum())
    return float(a), float(b), rss


def _best_c(x: np.ndarray, y: np.ndarray) -> float:
    grid = np.geomspace(*C_RANGE, 60)
    rss = [(_linear(x, y, c)[2], i) for i, c in enumerate(grid)]
    i = min(rss)[1]
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(40):  # golden section on log c between the grid neighbours of the best
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        if _linear(x, y, m1)[2] <= _linear(x, y, m2)[2]:
            hi = m2
        else:
            lo = m1
    return (lo + hi) / 2


def fit_curve(x: Sequence[float], y: Sequence[float], c: float | None = None) -> Curve:
    """Fit L = a + b * x^-c to points (x > 0). With fewer than five points, or with `c` given, the exponent is
    fixed (to `c`, else PRIOR_C) and only (a, b) are fitted."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(xs) < 2 or (xs <= 0).any():
        raise ValueError("a learning curve needs two or more points at positive x")
    free = c is None and len(xs) >= 5
    c = _best_c(xs, ys) if free else (PRIOR_C if c is None else c)
    a, b, rss = _linear(xs, ys, c)
    k = 3 if free else 2
    dof = len(xs) - k
    noise = math.sqrt(rss / dof) if dof > 0 else 0.0
    if dof <= 0:
        return Curve(a, b, c, None, 0.0, len(xs))
    z = xs**-c
    J = np.stack([np.ones_like(z), z, -b * z * np.log(xs)], axis=1)[:, :k]
    cov = np.linalg.pinv(J.T @ J) * noise**2
    return Curve(a, b, c, tuple(map(tuple, cov.tolist())), noise, len(xs))


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: +1 when y ranks the items as x does, -1 reversed; ties count for neither."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("Kendall's tau needs two equally long sequences of two or more values")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else 0.0
