"""Importance-reweighting estimators: effective sample size, free energies, profiles.

All functions take log importance weights ``log_w`` of shape ``(N,)`` (e.g.
``log w = -u(x) - log q(x)`` for flow samples; any additive constant is irrelevant) as
numpy arrays or torch tensors, or ``log_w=None`` for unit weights (plain samples).
Weights are self-normalised; ``-inf`` entries are zero weights; NaN or ``+inf`` raise
``ValueError``, except in :func:`effective_sample_size` (the package's one ESS), which
counts them as zero weights. Everything is computed in float64 and in log space, so
``log_w`` may span thousands of kT. Free energies are in kT. Errors are bootstrap
standard errors (resampling the N samples with replacement, ``n_bootstrap`` times,
seeded by ``seed``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.special import logsumexp

__all__ = [
    "block_ess",
    "effective_sample_size",
    "ess_tensor",
    "free_energy_difference",
    "free_energy_profile",
    "free_energy_profile_2d",
]

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


def _as_array(a: Any, name: str) -> np.ndarray:
    """1-D float64 numpy copy/view of an array, sequence or tensor (any device/dtype)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().to(device="cpu", dtype=torch.float64).numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (N,), got shape {arr.shape}")
    return arr


def _log_weights(log_w: ArrayLike | None, n: int | None) -> np.ndarray:
    """Validated float64 log weights of length ``n`` (zeros if ``log_w`` is None)."""
    if log_w is None:
        if n is None:
            raise ValueError("log_w=None needs another input to fix the number of samples")
        return np.zeros(n)
    lw = _as_array(log_w, "log_w")
    if n is not None and lw.shape[0] != n:
        raise ValueError(f"log_w has {lw.shape[0]} entries, expected {n}")
    if lw.shape[0] == 0:
        raise ValueError("log_w is empty")
    if np.isnan(lw).any():
        raise ValueError(f"log_w contains {int(np.isnan(lw).sum())} NaN value(s)")
    if np.isposinf(lw).any():
        raise ValueError("log_w contains +inf (an infinite weight)")
    if np.isneginf(lw).all():
        raise ValueError("all weights are zero (log_w is -inf everywhere)")
    return lw


def _mask(m: ArrayLike, name: str, n: int) -> np.ndarray:
    arr = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must be a boolean mask")
        arr = arr.astype(bool)
    return arr


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _label_shifts(labels: np.ndarray, n_labels: int, lw: np.ndarray) -> np.ndarray:
    """Per-label maximum log weight (0 for labels without weight)."""
    shift = np.full(n_labels, -np.inf)
    np.maximum.at(shift, labels, lw)
    return np.where(np.isfinite(shift), shift, 0.0)


def _label_log_sums(labels: np.ndarray, n_labels: int, lw: np.ndarray) -> np.ndarray:
    """ln sum_{i: labels_i = k} w_i for k < n_labels (-inf where no weight)."""
    shift = _label_shifts(labels, n_labels, lw)
    sums = np.bincount(labels, weights=np.exp(lw - shift[labels]), minlength=n_labels)
    with np.errstate(divide="ignore"):
        return np.log(sums) + shift


def _bootstrap_log_sums(
    labels: np.ndarray,
    n_labels: int,
    lw: np.ndarray,
    n_bootstrap: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(n_bootstrap, n_labels) ln of per-label weight sums over bootstrap resamples.

    Each label is shifted by its own maximum log weight, so labels whose weights are
    many orders of magnitude below others do not underflow.
    """
    n = lw.shape[0]
    shift = _label_shifts(labels, n_labels, lw)
    w = np.exp(lw - shift[labels])  # in [0, 1]; zero-weight samples give 0
    out = np.empty((n_bootstrap, n_labels))
    with np.errstate(divide="ignore"):
        for r in range(n_bootstrap):
            idx = rng.integers(0, n, size=n)
            out[r] = np.log(np.bincount(labels[idx], weights=w[idx], minlength=n_labels))
    return out + shift


def _robust_std(reps: np.ndarray) -> np.ndarray:
    """Std (ddof=1) over axis 0 of finite replicates; +inf where fewer than half (or
    fewer than 2) replicates are finite."""
    finite = np.isfinite(reps)
    count = finite.sum(axis=0)
    x = np.where(finite, reps, 0.0)
    mean = x.sum(axis=0) / np.maximum(count, 1)
    var = (np.where(finite, reps - mean, 0.0) ** 2).sum(axis=0) / np.maximum(count - 1, 1)
    ok = (count >= 2) & (count >= 0.5 * reps.shape[0])
    return np.where(ok, np.sqrt(var), np.inf)


def ess_tensor(log_w: torch.Tensor) -> torch.Tensor:
    """Kish effective sample size divided by N as a 0-d float64 tensor on ``log_w``'s
    device, computed without reading anything back to the host (for training loops).

    ESS/N = (sum w)^2 / (N sum w^2) = exp(2 lse(log w) - lse(2 log w)) / N, in float64
    and log space. ``log_w``: shape (N,), detached. NaN, ``+inf`` and ``-inf`` entries
    count as samples of zero weight (they stay in N); 0 for an empty input or when no
    entry is finite.
    """
    if log_w.ndim != 1:
        raise ValueError(f"log_w must be 1-D of shape (N,), got shape {tuple(log_w.shape)}")
    lw = log_w.detach().double()
    if lw.numel() == 0:
        return lw.new_zeros(())
    lw = torch.where(torch.isfinite(lw), lw, lw.new_tensor(-math.inf))
    log_ess = 2.0 * torch.logsumexp(lw, 0) - torch.logsumexp(2.0 * lw, 0)
    ess = torch.exp(log_ess - math.log(lw.numel())).clamp(max=1.0)
    return torch.nan_to_num(ess, nan=0.0)  # no finite entry: -inf - (-inf)


def effective_sample_size(log_w: ArrayLike) -> float:
    """Kish effective sample size divided by N, a float in [0, 1] (see :func:`ess_tensor`).

    ``log_w``: shape (N,), a numpy array, a sequence of floats or a torch tensor on any
    device (detached). NaN, ``+inf`` and ``-inf`` entries count as samples of zero weight
    (they stay in N). Returns 0.0 for an empty input or when no entry is finite.

    Raises:
        ValueError: ``log_w`` is not 1-D.
    """
    if not isinstance(log_w, torch.Tensor):
        log_w = torch.from_numpy(_as_array(log_w, "log_w"))
    return float(ess_tensor(log_w))


def block_ess(log_w: ArrayLike, n_blocks: int = 5) -> dict:
    """Normalised ESS of ``n_blocks`` disjoint consecutive blocks of i.i.d. samples.

    With heavy-tailed weights the ESS of one sample set is a noisy statistic: one rare
    large weight can cut it tenfold. The spread over blocks shows that without new samples.

    Returns:
        ``{"n_blocks", "block_size", "min", "median", "max"}`` (ESS/N of each block of
        ``len(log_w) // n_blocks`` samples; a remainder is left out).

    Raises:
        ValueError: ``n_blocks`` < 1 or more blocks than samples.
    """
    lw = _as_array(log_w, "log_w")
    n_blocks = int(n_blocks)
    if n_blocks < 1 or n_blocks > lw.size:
        raise ValueError(f"n_blocks must be in 1..{lw.size} (the samples), got {n_blocks}")
    size = lw.size // n_blocks
    ess = [effective_sample_size(lw[k * size : (k + 1) * size]) for k in range(n_blocks)]
    return {
        "n_blocks": n_blocks,
        "block_size": size,
        "min": float(np.min(ess)),
        "median": float(np.median(ess)),
        "max": float(np.max(ess)),
    }


def free_energy_difference(
    log_w: ArrayLike | None,
    in_a: ArrayLike,
    in_b: ArrayLike,
    n_bootstrap: int = 200,
    seed: int | np.random.Generator | None = None,
) -> tuple[float, float]:
    """Reweighted free-energy difference ΔF = F_B - F_A = -ln(P_B / P_A) in kT.

    Arguments:
        log_w: log weights (N,) or None for unit weights.
        in_a, in_b: disjoint boolean masks (N,) of the two states (samples in neither
            state are allowed; they cancel in the ratio).
        n_bootstrap: bootstrap replicates for the standard error (0: stderr is NaN).
        seed: seed or numpy Generator of the bootstrap.

    Returns:
        ``(dF, stderr)`` as floats. Replicates in which a state receives no weight are
        dropped from the error; if that leaves fewer than half, stderr is +inf.

    Raises:
        ValueError: bad shapes/values, overlapping states, or a state without weight.
    """
    n = len(in_a)
    lw = _log_weights(log_w, n)
    a, b = _mask(in_a, "in_a", n), _mask(in_b, "in_b", n)
    if (a & b).any():
        raise ValueError(f"in_a and in_b overlap in {int((a & b).sum())} sample(s)")
    labels = np.where(a, 0, np.where(b, 1, 2))
    log_p = _label_log_sums(labels, 3, lw)
    for k, name in ((0, "A"), (1, "B")):
        if not np.isfinite(log_p[k]):
            raise ValueError(f"state {name} has no samples with nonzero weight")
    df = float(log_p[0] - log_p[1])
    if n_bootstrap <= 0:
        return df, float("nan")
    reps = _bootstrap_log_sums(labels, 3, lw, int(n_bootstrap), _rng(seed))
    with np.errstate(invalid="ignore"):  # -inf - -inf: a replicate without A and B (dropped)
        diff = reps[:, 0] - reps[:, 1]
    return df, float(_robust_std(diff))


def _binned_free_energy(
    labels: np.ndarray,
    n_bins: int,
    log_volume: np.ndarray,
    lw: np.ndarray,
    n_bootstrap: int,
    seed: int | np.random.Generator | None,
) -> tuple[np.ndarray, np.ndarray]:
    """F and stderr per bin; label ``n_bins`` collects samples outside all bins."""
    log_sums = _label_log_sums(labels, n_bins + 1, lw)
    f = -(log_sums[:n_bins] - logsumexp(log_sums) - log_volume)
    finite = np.isfinite(f)
    if not finite.any():
        raise ValueError("no sample with nonzero weight falls inside the bins")
    f = f - f[finite].min()
    if n_bootstrap <= 0:
        return f, np.full(n_bins, np.nan)
    reps = _bootstrap_log_sums(labels, n_bins + 1, lw, int(n_bootstrap), _rng(seed))
    with np.errstate(invalid="ignore"):
        f_reps = -(reps[:, :n_bins] - logsumexp(reps, axis=1, keepdims=True) - log_volume)
    err = _robust_std(f_reps)
    return f, np.where(finite, err, np.inf)


def _bin_labels(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each value (np.histogram semantics, last edge inclusive); values
    outside the edges get ``len(edges) - 1``."""
    nb = len(edges) - 1
    idx = np.searchsorted(edges, x, side="right") - 1
    idx[x == edges[-1]] = nb - 1
    idx[(x < edges[0]) | (x > edges[-1])] = nb
    return idx


def _edges(x: np.ndarray, bins: int | ArrayLike, rng: tuple[float, float] | None) -> np.ndarray:
    if isinstance(bins, torch.Tensor):
        bins = bins.detach().cpu().numpy()
    edges = np.histogram_bin_edges(x, bins=bins, range=rng).astype(np.float64)
    if edges.ndim != 1 or len(edges) < 2 or not (np.diff(edges) > 0).all():
        raise ValueError("bins must be a positive int or increasing edges")
    return edges


def _cv(x: ArrayLike, name: str, n: int | None) -> np.ndarray:
    arr = _as_array(x, name)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected {n}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def free_energy_profile(
    cv: ArrayLike,
    log_w: ArrayLike | None,
    bins: int | ArrayLike,
    range: tuple[float, float] | None = None,  # noqa: A002 - numpy's name
    n_bootstrap: int = 200,
    seed: int | np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reweighted 1-D free-energy profile F(s) = -ln p(s) in kT.

    p is the self-normalised weighted histogram density per unit CV length (bins as in
    ``np.histogram``: an int with optional ``range``, or increasing edges; samples
    outside the bins count towards the normalisation only). F is shifted so that its
    minimum is 0; empty bins (no weight) are +inf, with stderr +inf.

    Returns:
        ``(centres, F, stderr)``, numpy arrays of shape (n_bins,). ``stderr`` is the
        bootstrap standard error of -ln p in each bin (p normalised over all samples);
        it excludes the uncertainty of the constant shift. Bins that are empty in more
        than half of the replicates get stderr +inf.
    """
    x = _cv(cv, "cv", None)
    lw = _log_weights(log_w, x.shape[0])
    edges = _edges(x, bins, range)
    labels = _bin_labels(x, edges)
    f, err = _binned_free_energy(
        labels, len(edges) - 1, np.log(np.diff(edges)), lw, n_bootstrap, seed
    )
    return 0.5 * (edges[1:] + edges[:-1]), f, err


def free_energy_profile_2d(
    cv1: ArrayLike,
    cv2: ArrayLike,
    log_w: ArrayLike | None,
    bins: int | tuple[int | ArrayLike, int | ArrayLike],
    range: tuple[tuple[float, float], tuple[float, float]] | None = None,  # noqa: A002
    n_bootstrap: int = 200,
    seed: int | np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reweighted 2-D free-energy surface F(s1, s2) = -ln p in kT (p per unit area).

    ``bins`` is an int, or a pair of ints/edge arrays, one per CV; ``range`` a pair of
    ``(lo, hi)`` or None. Conventions as :func:`free_energy_profile`.

    Returns:
        ``(centres1 (n1,), centres2 (n2,), F (n1, n2), stderr (n1, n2))``.
    """
    x1 = _cv(cv1, "cv1", None)
    x2 = _cv(cv2, "cv2", x1.shape[0])
    lw = _log_weights(log_w, x1.shape[0])
    b1, b2 = (bins, bins) if isinstance(bins, int | np.integer) else bins
    r1, r2 = (None, None) if range is None else range
    e1, e2 = _edges(x1, b1, r1), _edges(x2, b2, r2)
    n1, n2 = len(e1) - 1, len(e2) - 1
    l1, l2 = _bin_labels(x1, e1), _bin_labels(x2, e2)
    labels = np.where((l1 < n1) & (l2 < n2), l1 * n2 + l2, n1 * n2)
    log_area = (np.log(np.diff(e1))[:, None] + np.log(np.diff(e2))[None, :]).ravel()
    f, err = _binned_free_energy(labels, n1 * n2, log_area, lw, n_bootstrap, seed)
    c1, c2 = 0.5 * (e1[1:] + e1[:-1]), 0.5 * (e2[1:] + e2[:-1])
    return c1, c2, f.reshape(n1, n2), err.reshape(n1, n2)
