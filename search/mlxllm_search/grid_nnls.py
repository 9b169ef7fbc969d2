"""The law's form, y = E + A xn^-alpha + B xd^-beta, and its fit: non-negative least squares for every
(alpha, beta) of a grid and many weight vectors at once, exactly: the optimum is the least-squares solution
on one subset of the three coefficients, so all eight subsets are solved in closed form from the normal
equations, vectorised over the grid, and the feasible one with the least residual is kept. numpy only (no
scipy), no local minima. Weak log-normal priors pull the exponents toward typical values when few points
leave them loose.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CHUNK = 48  # weight vectors fitted together (bounds the grid's memory)
PRIOR_ALPHA, PRIOR_BETA = 0.35, 0.35  # typical exponents of fits with an irreducible term (Chinchilla: .34, .28)
PRIOR_LOG_SD = 0.6  # weak: a factor 1.8 either way is one sd
EXPONENT_RANGE, GRID = (0.05, 1.5), 40


def _moments(w: np.ndarray, x1: np.ndarray, x2: np.ndarray, y: np.ndarray) -> tuple[dict[str, Any], Any]:
    """The weighted normal equations of y on [1, x1, x2] for each weight row of w (R, n) and each (alpha, beta)
    of the grid, x1: (ga, n) and x2: (gb, n): entries "00".."22" of M and "0".."2" of v, broadcastable to
    (R, ga, gb), and the weighted sum of y^2."""
    wy = w * y
    a, b = (lambda t: t[:, :, None]), (lambda t: t[:, None, :])  # the alpha axis, the beta axis
    out = {"00": w.sum(1)[:, None, None], "0": wy.sum(1)[:, None, None], "01": a(w @ x1.T), "11": a(w @ (x1**2).T)}
    out.update({"1": a(wy @ x1.T), "02": b(w @ x2.T), "22": b(w @ (x2**2).T), "2": b(wy @ x2.T)})
    out["12"] = (w[:, None, :] * x1[None]) @ x2.T
    return out, (wy * y).sum(1)[:, None, None]


def _subset_solutions(m: dict[str, Any], s: Any) -> list[tuple[tuple[Any, Any, Any], Any, Any]]:
    """(coefficients, rss, feasible) of the least-squares fit on each subset of {E, A, B}."""
    g = lambda i, j: m[f"{min(i, j)}{max(i, j)}"]  # noqa: E731
    c = {
        (i, j): g((i + 1) % 3, (j + 1) % 3) * g((i + 2) % 3, (j + 2) % 3)
        - g((i + 1) % 3, (j + 2) % 3) * g((i + 2) % 3, (j + 1) % 3)
        for i in range(3)
        for j in range(3)
    }
    det = sum(g(0, j) * c[(0, j)] for j in range(3))
    full = tuple(sum(c[(j, i)] * m[str(j)] for j in range(3)) / det for i in range(3))
    ok = (np.abs(det) > 1e-12 * np.abs(m["00"] * m["11"] * m["22"])) & (full[0] >= 0) & (full[1] >= 0) & (full[2] >= 0)
    out = [(full, s - sum(full[i] * m[str(i)] for i in range(3)), ok)]
    for i, j in ((0, 1), (0, 2), (1, 2)):
        d2 = g(i, i) * g(j, j) - g(i, j) ** 2
        ci, cj = (g(j, j) * m[str(i)] - g(i, j) * m[str(j)]) / d2, (g(i, i) * m[str(j)] - g(i, j) * m[str(i)]) / d2
        coefs = tuple(ci if k == i else cj if k == j else 0.0 for k in range(3))
        ok = (np.abs(d2) > 1e-12 * np.abs(g(i, i) * g(j, j))) & (ci >= 0) & (cj >= 0)
        out.append((coefs, s - ci * m[str(i)] - cj * m[str(j)], ok))
    for i in range(3):
        ci = m[str(i)] / g(i, i)
        out.append((tuple(ci if k == i else 0.0 for k in range(3)), s - ci * m[str(i)], (g(i, i) > 0) & (ci >= 0)))
    return out + [((0.0, 0.0, 0.0), s, True)]


def _nnls(m: dict[str, Any], s: Any, coefs: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """Non-negative least squares from the normal equations, exactly: the optimum is the least-rss subset
    solution that is feasible. Returns ((E, A, B) stacked on the first axis, or None unless `coefs`; rss)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        subsets = _subset_solutions(m, s)
        shape = np.broadcast_shapes(*(np.shape(v) for v in m.values()))
        if not coefs:
            best = np.full(shape, np.inf)
            for _, r, ok in subsets:
                best = np.minimum(best, np.where(ok, r, np.inf))
            return None, np.maximum(best, 1e-15 * s)
        rss = np.stack([np.where(ok, np.broadcast_to(r, shape), np.inf) for _, r, ok in subsets])
        k = rss.argmin(0)
        best = np.maximum(np.take_along_axis(rss, k[None], 0)[0], 1e-15 * s)
        all_c = np.stack([np.stack([np.broadcast_to(v, shape) for v in c]) for c, _, _ in subsets])  # (8, 3, ...)
        return np.take_along_axis(all_c, k[None, None], 0)[0], best


def fit_grid(
    w: np.ndarray,
    counts: np.ndarray,
    xn: np.ndarray,
    xd: np.ndarray,
    y: np.ndarray,
    alphas: np.ndarray,
    betas: np.ndarray,
    pen: np.ndarray,
) -> np.ndarray:
    """(E, A, alpha, B, beta) of y = E + A xn^-alpha + B xd^-beta for each weight row of w (R, n), with
    E, A, B >= 0; counts: each row's number of points; pen (ga, gb): the exponents' prior, in -log density.
    The exponents minimise n/2 log(rss/n) + pen on the grid; (E, A, B) are then solved at them."""
    x1, x2 = xn[None, :] ** -alphas[:, None], xd[None, :] ** -betas[:, None]
    ia, ib = np.empty(len(w), int), np.empty(len(w), int)
    for lo in range(0, len(w), CHUNK):
        _, rss = _nnls(*_moments(w[lo : lo + CHUNK], x1, x2, y), coefs=False)
        n = counts[lo : lo + CHUNK, None, None]
        k = (0.5 * n * np.log(rss / n) + pen).reshape(len(rss), -1).argmin(1)
        ia[lo : lo + CHUNK], ib[lo : lo + CHUNK] = np.unravel_index(k, pen.shape)
    a1, b1 = xn[None, :] ** -alphas[ia][:, None], xd[None, :] ** -betas[ib][:, None]  # (R, n) at each row's best
    m = {"00": w.sum(1), "0": (w * y).sum(1), "01": (w * a1).sum(1), "11": (w * a1**2).sum(1), "1": (w * a1 * y).sum(1)}
    m.update({"02": (w * b1).sum(1), "22": (w * b1**2).sum(1), "2": (w * b1 * y).sum(1), "12": (w * a1 * b1).sum(1)})
    c, _ = _nnls(m, (w * y * y).sum(1), coefs=True)
    return np.stack([c[0], c[1], alphas[ia], c[2], betas[ib]], 1)


def law(p: np.ndarray, xn: Any, xd: Any) -> Any:
    """The law with parameters p (..., 5) at reference-scaled (N, D_eff)."""
    p = np.asarray(p)
    return p[..., 0] + p[..., 1] * xn ** -p[..., 2] + p[..., 3] * xd ** -p[..., 4]


def exponent_grid() -> np.ndarray:
    """The log grid each exponent is searched on."""
    return np.geomspace(*EXPONENT_RANGE, GRID)


def exponents_prior(alpha: Any, beta: Any) -> Any:
    """The exponents' weak log-normal priors, in -log density."""
    return (np.log(alpha / PRIOR_ALPHA) ** 2 + np.log(beta / PRIOR_BETA) ** 2) / (2 * PRIOR_LOG_SD**2)


def fit_rows(
    w: np.ndarray, counts: np.ndarray, xn: np.ndarray, xd: np.ndarray, y: np.ndarray, alphas: Any, betas: Any
) -> np.ndarray:
    """The law's (E, A, alpha, B, beta) for each weight row of w (R, n), with the exponents' priors."""
    return fit_grid(w, counts, xn, xd, y, alphas, betas, exponents_prior(alphas[:, None], betas[None, :]))
