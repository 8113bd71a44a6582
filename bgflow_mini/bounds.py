"""Upper bounds on the importance-sampling efficiency of volume-preserving flows.

A volume-preserving flow (e.g. NICE, additive couplings) pushing a Gaussian prior
forward keeps the *distribution of density values* of the prior: the volume of
``{x: q(x) >= c}`` equals that of ``{z: N(z) >= c}`` for every level ``c``. For a
normalised target ``p`` the normalised Kish ESS of samples from ``q`` tends to
``1 / ∫ p^2 / q``. Among all densities with the prior's level-set volumes this is
maximised (rearrangement inequality) by ordering ``q`` like ``p``:

    q*(x) = g(V_p(x)),   V_p(x) = vol{y: p(y) >= p(x)},

where ``g(v)`` is the Gaussian density on the level set enclosing volume ``v``. For a
Gaussian with standard deviations ``s_1..s_d`` and ``S = prod s_i`` (only ``S``
matters), ``v = c_d S r^d`` with ``c_d = pi^(d/2) / Gamma(d/2 + 1)`` and
``g(v) = (2 pi)^(-d/2) S^-1 exp(-r^2 / 2)``. Optimising over ``S`` gives an upper
bound on the ESS of *any* volume-preserving flow with any diagonal Gaussian prior.

What this means for NICE: a stack of additive couplings is volume preserving, so with a
fixed prior it cannot beat :func:`volume_preserving_ess` at that prior's ``S``. NICE as
published ends with a diagonal scaling layer (``coupling_flow(kind="nice")`` adds it by
default, :class:`~bgflow_mini.flows.scaling.Scaling`); its log-det is a constant, which is
the same as choosing ``S``, so NICE with its scaling layer (or additive couplings with a
learnable prior width) is bounded by :func:`volume_preserving_ess_bound`, the optimum
over ``S``, whatever prior a user picks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import gammaln, logsumexp

__all__ = ["volume_preserving_ess_bound", "volume_preserving_ess"]


def _grid_log_density(
    log_density_fn: Callable[[np.ndarray], np.ndarray],
    limits: Sequence[tuple[float, float]],
    n: int,
) -> tuple[np.ndarray, float]:
    """Normalised log p on a regular grid (flattened) and the log cell volume."""
    if int(n) < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    axes = []
    for lo, hi in limits:
        if not hi > lo:
            raise ValueError(f"each limit needs hi > lo, got {(lo, hi)}")
        axes.append(np.linspace(lo, hi, int(n)))
    mesh = np.meshgrid(*axes, indexing="ij")
    pts = np.stack([m.ravel() for m in mesh], axis=1)
    log_p = np.asarray(log_density_fn(pts), dtype=np.float64).ravel()
    if log_p.shape != (pts.shape[0],):
        raise ValueError(f"log_density_fn returned shape {log_p.shape}, expected ({len(pts)},)")
    if np.isnan(log_p).any():
        raise ValueError("log_density_fn returned NaN")
    log_cell = float(sum(math.log(a[1] - a[0]) for a in axes))
    log_p = log_p - (logsumexp(log_p) + log_cell)  # normalise on the grid
    return log_p, log_cell


def _log_inv_ess(
    log_p_sorted: np.ndarray, log_vol: np.ndarray, log_cell: float, log_s: float, d: int
) -> float:
    """ln ∫ p^2 / q* for the Gaussian with ``ln S = log_s`` (sorted, descending p)."""
    log_cd = 0.5 * d * math.log(math.pi) - gammaln(0.5 * d + 1.0)
    r2 = np.exp((2.0 / d) * (log_vol - log_cd - log_s))
    log_q = -0.5 * d * math.log(2.0 * math.pi) - log_s - 0.5 * r2
    return float(logsumexp(2.0 * log_p_sorted - log_q) + log_cell)


def volume_preserving_ess(
    log_density_fn: Callable[[np.ndarray], np.ndarray],
    limits: Sequence[tuple[float, float]],
    n: int,
    scale_product: float,
) -> float:
    """ESS/N of the best volume-preserving rearrangement of a Gaussian whose standard
    deviations multiply to ``scale_product``; arguments as
    :func:`volume_preserving_ess_bound`."""
    log_p, log_cell = _grid_log_density(log_density_fn, limits, n)
    log_p = np.sort(log_p)[::-1]
    # volume of {p >= p(x)}: cells up to and including x (midpoint rule)
    log_vol = np.log(np.arange(1, log_p.size + 1) - 0.5) + log_cell
    d = len(limits)
    return math.exp(-_log_inv_ess(log_p, log_vol, log_cell, math.log(scale_product), d))


def volume_preserving_ess_bound(
    log_density_fn: Callable[[np.ndarray], np.ndarray],
    limits: Sequence[tuple[float, float]],
    n: int = 801,
) -> tuple[float, float]:
    """Largest ESS/N any volume-preserving flow on a diagonal Gaussian prior can reach.

    Arguments:
        log_density_fn: unnormalised log target density, numpy ``(m, d) -> (m,)``
            (e.g. ``lambda x: -energy(torch.as_tensor(x)).numpy()``).
        limits: ``d`` pairs ``(lo, hi)``; the box must hold essentially all of ``p``.
        n: grid points per dimension (``n**d`` evaluations; meant for d <= 3).

    Returns:
        ``(ess_bound, scale_product)``: the maximal ESS/N in (0, 1] and the product of
        prior standard deviations that attains it. The grid discretisation error is
        small for smooth densities once the wells are resolved.
    """
    log_p, log_cell = _grid_log_density(log_density_fn, limits, n)
    log_p = np.sort(log_p)[::-1]
    log_vol = np.log(np.arange(1, log_p.size + 1) - 0.5) + log_cell
    d = len(limits)
    total = float(log_vol[-1])
    res = minimize_scalar(
        lambda ls: _log_inv_ess(log_p, log_vol, log_cell, ls, d),
        bounds=(total - 20.0, total + 5.0),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return min(math.exp(-float(res.fun)), 1.0), math.exp(float(res.x))
