"""Tail diagnostic of importance weights: the Pareto shape ``k`` of the largest weights.

With heavy-tailed weights the Kish ESS of one sample set is a noisy statistic (one rare
large weight can cut it tenfold), and so are the reweighted free energies. How heavy the
tail is can be read from the largest weights themselves: fitted with a generalized Pareto
distribution, their shape ``k`` says how many moments the weights have (Vehtari, Simpson,
Gelman, Yao and Gabry, "Pareto smoothed importance sampling", JMLR 25, 2024):

- ``k < 0.5``: the weights have a finite variance; ESS and reweighted averages converge at
  the usual rate and one set's figures are representative.
- ``0.5 <= k < 0.7``: finite mean, infinite variance: estimates converge, slowly; one set's
  ESS overstates what further sets give, and bootstrap errors understate the spread of
  reweighted free energies between sets.
- ``k >= 0.7``: estimates from this many samples are unreliable (the number of samples
  needed grows steeply with ``k``); treat ESS and reweighted free energies with suspicion.

The fit follows Zhang and Stephens (Technometrics 51, 2009): a quasi-posterior mean of
``b = k / sigma`` over a grid, ``k`` from its profile likelihood, then the weak prior of
Vehtari et al. that shrinks ``k`` towards 0.5 by ten pseudo-observations. The tail is the
``min(0.2 N, 3 sqrt(N))`` largest weights (their choice for independent samples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["PARETO_K_RELIABLE", "describe_k", "gpd_fit", "pareto_k", "tail_size"]

PARETO_K_RELIABLE = 0.7  # above this, ESS and reweighted estimates are unreliable
_MIN_TAIL = 5  # fewer tail weights than this: no fit (k is NaN)


def tail_size(n: int) -> int:
    """Number of largest weights fitted out of ``n`` samples: ``ceil(min(0.2 n, 3 sqrt n))``."""
    return int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n))))


def gpd_fit(x: np.ndarray) -> tuple[float, float]:
    """Shape ``k`` and scale ``sigma`` of a generalized Pareto fitted to exceedances.

    ``x``: shape (n,), exceedances over a threshold (>= 0, not all zero), any order. The
    density is ``(1/sigma) (1 + k x / sigma)^(-1/k - 1)``. For a given ``b = k / sigma``
    the likelihood is maximised by ``k(b) = mean(log(1 + b x))``, with profile
    log-likelihood ``n (log(b / k(b)) - k(b) - 1)``; ``b`` is the average of a grid of
    ``30 + sqrt(n)`` values weighted by that likelihood. ``k`` is returned without the
    prior (see :func:`pareto_k`).
    """
    x = np.sort(np.asarray(x, dtype=np.float64))
    n = x.size
    if n < 2 or not x[-1] > 0.0:
        raise ValueError("need at least two exceedances, not all zero")
    m = 30 + int(math.sqrt(n))
    quartile = x[max(int(n / 4.0 + 0.5) - 1, 0)]
    if not quartile > 0.0:  # many zero exceedances (ties at the threshold)
        quartile = x[x > 0.0][0]
    j = np.arange(1, m + 1, dtype=np.float64)
    # b_j > -1 / max(x) keeps 1 + b x > 0 for every exceedance
    b = (np.sqrt(m / (j - 0.5)) - 1.0) / (3.0 * quartile) - 1.0 / x[-1]
    k = np.log1p(b[:, None] * x[None, :]).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        loglik = n * (np.log(b / k) - k - 1.0)
    loglik = np.where(np.isfinite(loglik), loglik, -np.inf)
    weights = np.exp(loglik - loglik.max())
    weights /= weights.sum()
    b_hat = float((weights * b).sum())
    k_hat = float(np.log1p(b_hat * x).mean())
    sigma = k_hat / b_hat if b_hat != 0.0 else float(x.mean())
    return k_hat, sigma


def pareto_k(log_w: np.ndarray | torch.Tensor | Sequence[float]) -> dict:
    """Pareto shape of the largest importance weights, the PSIS reliability diagnostic.

    ``log_w``: shape (N,), log importance weights (any additive constant; NaN and
    infinite entries count as zero weights, as in
    :func:`~bgflow_mini.reweighting.effective_sample_size`).

    Returns:
        ``{"k", "sigma", "tail", "n"}``: the shape ``k`` (with the weak prior towards 0.5;
        NaN when fewer than five positive weights lie in the tail or above its threshold),
        the fitted scale in units of the largest weight, the number of tail weights and N.
        ``k`` above :data:`PARETO_K_RELIABLE` (0.7) marks unreliable estimates.
    """
    if isinstance(log_w, torch.Tensor):
        log_w = log_w.detach().cpu().double().numpy()
    lw = np.asarray(log_w, dtype=np.float64)
    if lw.ndim != 1:
        raise ValueError(f"log_w must be 1-D of shape (N,), got shape {lw.shape}")
    n = lw.size
    out = {"k": math.nan, "sigma": math.nan, "tail": 0, "n": int(n)}
    lw = lw[np.isfinite(lw)]
    if lw.size == 0:
        return out
    m = tail_size(n)
    if m < _MIN_TAIL or lw.size <= m:
        return out
    top = np.sort(lw)[-(m + 1) :]  # the threshold, then the m largest, ascending
    w = np.exp(top - top[-1])  # in units of the largest weight
    x = w[1:] - w[0]
    if np.count_nonzero(x > 0.0) < _MIN_TAIL:
        return out
    k, sigma = gpd_fit(x)
    k = (m * k + 10.0 * 0.5) / (m + 10.0)  # weak prior: ten pseudo-observations at 0.5
    return {"k": float(k), "sigma": float(sigma), "tail": int(m), "n": int(n)}


def describe_k(k: float) -> str:
    """What a Pareto shape ``k`` says about the estimates of one weighted sample set."""
    if not math.isfinite(k):
        return "no tail to fit"
    if k < 0.5:
        return "finite variance: ESS and reweighted estimates reliable"
    if k < PARETO_K_RELIABLE:
        return "infinite variance: usable; one set's ESS and bootstrap errors optimistic"
    return "estimates unreliable: too heavy a tail for this many samples"
