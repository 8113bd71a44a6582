"""Which internal coordinates the importance weights follow.

A low ESS means the flow's density is off somewhere. The largest weights
(:func:`~bgflow_mini.evaluation.largest_weights`) say where a few samples sit, and the
state columns of the evaluation which state carries the squared weights; this module says
along which coordinates the weights vary over a whole sample set. For every bond, angle
and torsion of the Z-matrix it takes the share of the variance of ``log w`` that the mean
of ``log w`` in equal-count bins of that coordinate explains (the binned R^2, in [0, 1]).
A coordinate with a large R^2 is one along which the ratio of target to flow density
changes: the flow has its marginal, or its coupling to the coordinates that follow it,
wrong. The values are not additive over coordinates (they overlap when coordinates are
correlated), and a small R^2 everywhere means the error is spread over many coordinates.

:func:`energy_slope` asks the same of the energy itself: a generator that is the target at
another temperature has ``log w`` linear in ``u``, and the slope says which temperature.

``log w`` is clipped at ``clip`` below its maximum first (weights below ``e^-clip`` of the
largest carry nothing in any estimate; without the clip a few samples at very high
energy would own the variance), non-finite values count as clipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .coordinates.internal import bond_angles, bond_lengths, dihedral_angles

__all__ = ["binned_r2", "zmatrix_coordinates", "weight_drivers", "energy_slope"]


def _clipped(log_w: Any, clip: float) -> np.ndarray:
    lw = np.asarray(log_w, dtype=np.float64).ravel()
    finite = np.isfinite(lw)
    if not finite.any():
        return np.zeros_like(lw)
    floor = lw[finite].max() - float(clip)
    return np.where(finite, np.maximum(lw, floor), floor)


def binned_r2(log_w: Any, features: Any, bins: int = 20, clip: float = 15.0) -> np.ndarray:
    """R^2 of ``log w`` ``(n,)`` on ``bins`` equal-count bins of each column of
    ``features`` ``(n, F)``; returns ``(F,)`` in [0, 1].

    ``log w`` is clipped at ``clip`` below its maximum (see the module docstring). A
    constant column, or a constant ``log w``, gives 0. With ``n`` samples the value of a
    column unrelated to ``log w`` is about ``(bins - 1) / n``.
    """
    if int(bins) < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    y = _clipped(log_w, clip)
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features must be (n, F) with n = {y.shape[0]}, got {x.shape}")
    n, n_feat = x.shape
    y = y - y.mean()
    total = float(np.square(y).sum())
    out = np.zeros(n_feat)
    if n == 0 or total <= 0.0:
        return out
    bin_of_rank = np.arange(n) * int(bins) // n  # equal counts, by rank
    order = np.argsort(x, axis=0, kind="stable")
    for f in range(n_feat):
        if x[order[0, f], f] == x[order[-1, f], f]:
            continue  # constant: no bins to tell apart
        b = np.empty(n, dtype=np.int64)
        b[order[:, f]] = bin_of_rank
        sums = np.bincount(b, weights=y, minlength=bins)
        counts = np.bincount(b, minlength=bins)
        between = np.square(sums[counts > 0]) / counts[counts > 0]
        out[f] = min(1.0, float(between.sum()) / total)
    return out


def _join(names: list[str]) -> str:
    """``"A1:C", "B2:N", "B2:CA"`` -> ``"A1:C-B2:N-CA"``: a repeated prefix is dropped."""
    out, last = [], None
    for name in names:
        prefix, sep, atom = name.rpartition(":")
        out.append(atom if sep and prefix == last else name)
        last = prefix if sep else None
    return "-".join(out)


def zmatrix_coordinates(
    x: Any, rows: Sequence[Sequence[int]], names: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Every bond, angle and torsion of the Z-matrix ``rows`` (``[atom, bonded, angle,
    torsion]`` atom indices, ``-1`` where a row has none) at positions ``x`` ``(n, N, 3)``
    or ``(n, 3N)`` (nm).

    Returns ``values (n, F)`` (nm, radians, in ``x``'s floating dtype; torsions in
    [-pi, pi)) and ``F`` labels such as ``"torsion N-CA-CB-CG"`` with the atoms' ``names``
    (default: their indices; names of the form ``"PHE2:CA"`` drop a residue prefix equal to
    the atom's before, as in ``"torsion ACE1:C-PHE2:N-CA-CB"``). Rows placed by Cartesian
    coordinates in a ring frame give their bond, angle and torsion all the same: they are
    geometry of the molecule either way.
    """
    xt = torch.as_tensor(np.asarray(x))
    if not xt.is_floating_point():
        xt = xt.double()
    r = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    xt = xt.reshape(xt.shape[0], -1, 3)
    names = [str(i) for i in range(xt.shape[1])] if names is None else list(names)
    cols, labels = [], []
    kinds = (("bond", 2, bond_lengths), ("angle", 3, bond_angles), ("torsion", 4, dihedral_angles))
    for kind, k, fn in kinds:
        sel = r[r[:, k - 1] >= 0][:, :k]
        if len(sel):
            cols.append(fn(xt, *(torch.as_tensor(sel[:, j]) for j in range(k))).numpy())
            labels += [f"{kind} " + _join([names[a] for a in row]) for row in sel]
    values = np.concatenate(cols, axis=1) if cols else np.zeros((xt.shape[0], 0))
    return values, labels


def weight_drivers(
    x: Any,
    log_w: Any,
    rows: Sequence[Sequence[int]],
    names: Sequence[str] | None = None,
    masks: Mapping[str, np.ndarray] | None = None,
    top: int = 5,
    bins: int = 20,
    clip: float = 15.0,
    min_share: float = 0.1,
    chunk_rows: int = 64,
) -> dict:
    """The Z-matrix coordinates with the largest binned R^2 of ``log w``.

    Returns ``{"all": [{"coordinate", "r2"}, ...], "states": {name: [...]}}``: the ``top``
    coordinates over all samples, largest first, and the same inside each state of
    ``masks`` (boolean ``(n,)`` per state name) whose samples carry at least
    ``min_share`` of the sum of squared weights and number at least ``5 * bins`` (``log w``
    clipped below the state's own maximum). ``x`` ``(n, N, 3)`` nm, ``log_w`` ``(n,)``,
    ``rows`` and ``names`` as in :func:`zmatrix_coordinates`; ``bins``, ``clip`` as in
    :func:`binned_r2`. The coordinates are made ``chunk_rows`` Z-matrix rows at a time,
    so memory stays at about ``n * 3 * chunk_rows`` float64 values for any molecule.
    """
    lw = np.asarray(log_w, dtype=np.float64).ravel()
    finite = np.isfinite(lw)
    w2 = np.zeros_like(lw)
    if finite.any():
        w2[finite] = np.exp(2.0 * (lw[finite] - lw[finite].max()))
    chosen: dict[str, np.ndarray] = {}
    for name, mask in (masks or {}).items():
        m = np.asarray(mask, dtype=bool)
        share = float(w2[m].sum() / w2.sum()) if w2.sum() > 0 else 0.0
        if share >= min_share and m.sum() >= 5 * int(bins):
            chosen[name] = m
    r = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    labels: list[str] = []
    r2: dict[str | None, list[np.ndarray]] = {None: [], **{name: [] for name in chosen}}
    for start in range(0, len(r), max(1, int(chunk_rows))):
        values, part = zmatrix_coordinates(x, r[start : start + int(chunk_rows)], names)
        labels += part
        r2[None].append(binned_r2(lw, values, bins, clip))
        for name, m in chosen.items():
            r2[name].append(binned_r2(lw[m], values[m], bins, clip))

    def ranked(parts: list[np.ndarray]) -> list[dict]:
        values = np.concatenate(parts) if parts else np.zeros(0)
        best = np.argsort(-values, kind="stable")[: int(top)]
        return [{"coordinate": labels[i], "r2": float(values[i])} for i in best]

    return {"all": ranked(r2[None]), "states": {name: ranked(r2[name]) for name in chosen}}


def energy_slope(log_w: Any, u: Any, clip: float = 15.0) -> dict:
    """The least-squares line of ``log w`` on the reduced energy ``u`` (kT), both ``(n,)``.

    ``log w = -u - log q + c``, so a slope ``s`` means ``log q = -(1 + s) u + ...`` along
    the line: the generator resembles the target at ``temperature_ratio = 1 / (1 + s)``
    times its temperature (above 1: too hot, too broad, its largest weights at low
    energy; ``inf`` where ``1 + s <= 0``). ``r2`` is the share of the variance of ``log w``
    the line explains (a diagnosis: subtracting the line from ``log w`` afterwards is no
    correction, it hands the weight to the high-energy samples). Fitted over the samples
    with a finite ``u`` and ``log w`` within ``clip`` of the largest (the samples that
    carry weight). Returns ``{"slope", "temperature_ratio", "r2", "n"}``; with fewer than
    3 such samples or a constant ``u`` all three are NaN; a ``log w`` constant to rounding
    (the generator is the target) gives slope 0, r2 0.
    """
    lw = np.asarray(log_w, dtype=np.float64).ravel()
    e = np.asarray(u, dtype=np.float64).ravel()
    if lw.shape != e.shape:
        raise ValueError(f"log_w and u must have the same shape, got {lw.shape}, {e.shape}")
    keep = np.isfinite(lw) & np.isfinite(e)
    if keep.any():
        keep &= lw >= lw[keep].max() - float(clip)
    y, x = lw[keep], e[keep]
    nan = {"slope": math.nan, "temperature_ratio": math.nan, "r2": math.nan, "n": int(keep.sum())}
    if len(x) < 3 or np.ptp(x) == 0.0:
        return nan
    if np.ptp(y) <= 1e-9 * (1.0 + np.abs(y).max()):  # log w constant to rounding: exact
        return {"slope": 0.0, "temperature_ratio": 1.0, "r2": 0.0, "n": int(len(x))}
    xc, yc = x - x.mean(), y - y.mean()
    slope = float(xc @ yc / (xc @ xc))
    total = float(yc @ yc)
    r2 = 1.0 - float(np.square(yc - slope * xc).sum()) / total if total > 0 else 0.0
    ratio = 1.0 / (1.0 + slope) if 1.0 + slope > 0 else math.inf
    return {"slope": slope, "temperature_ratio": ratio, "r2": max(0.0, r2), "n": int(len(x))}
