"""Free energies along named collective variables from samples (no Hydra here).

Three kinds of samples are compared by ``scripts/free_energy.py``: flow samples with
importance weights (``log_w``), the same samples unweighted (``log_w=None``) and MD
frames in time order (errors by block bootstrap, so correlated frames do not shrink
them). Free energies are in kT, torsions in radians, distances in nm; feature CVs
(``coordinate``, ``linear``, e.g. of the toy energies) in the units of the features.

Torsions are periodic (:func:`bgflow_mini.cv.is_periodic`): their values are wrapped to
[-pi, pi) with :func:`bgflow_mini.units.wrap_angle` and their bins always cover exactly
[-pi, pi), so the first and last bins are neighbours across the cut. All other CV types
are non-periodic and binned over the range of the data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy.special import logsumexp

from . import cv as cvmod
from .cv import is_periodic
from .evaluation import block_free_energy, state_masks
from .reweighting import (
    effective_sample_size,
    free_energy_difference,
    free_energy_profile,
    free_energy_profile_2d,
)
from .units import wrap_angle

__all__ = [
    "check_cv_names",
    "chunked_cvs",
    "merge_states",
    "check_state_names",
    "sign_state_pairs",
    "cv_edges",
    "pmf_1d",
    "pmf_2d",
    "block_pmf",
    "state_delta_f",
    "md_delta_f",
    "pmf_agreement",
]


def check_cv_names(names: Sequence[str], cvs: Mapping[str, Mapping]) -> list[str]:
    """``names`` as a list; ``KeyError`` naming the known CVs for an unknown one."""
    names = [str(n) for n in names]
    for name in names:
        if name not in cvs:
            raise KeyError(f"unknown CV {name!r}; this system defines {sorted(cvs)}")
    return names


def chunked_cvs(
    chunks: Iterable[np.ndarray], cvs: Mapping[str, Mapping], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Named CVs of positions given in chunks (``(m, n_atoms, 3)`` or ``(m, 3 n_atoms)``,
    nm; flat features ``(m, dim)`` for feature CVs), so a long trajectory never has to sit
    in memory; float64 ``(n,)`` per name."""
    names = check_cv_names(names, cvs)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for chunk in chunks:
        x = np.asarray(chunk, dtype=np.float64)
        if len(x) == 0:
            continue
        for name, v in cvmod.compute_cvs(x, cvs, names).items():
            parts[name].append(np.asarray(v, dtype=np.float64))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def merge_states(
    system_states: Mapping[str, Mapping], extra: Mapping[str, Mapping] | None, cvs: Mapping
) -> dict[str, dict[str, list[float]]]:
    """The system's states plus ``extra`` ones (same name: ``extra`` wins), validated.

    A state is ``{cv_name: [lo, hi]}`` (radians / nm); every CV must be known and
    every range a pair of numbers.
    """
    states = {str(k): {str(c): list(r) for c, r in v.items()} for k, v in system_states.items()}
    for name, ranges in dict(extra or {}).items():
        if not isinstance(ranges, Mapping) or not ranges:
            raise ValueError(f"state {name!r} must map CV names to [lo, hi], got {ranges!r}")
        parsed = {}
        for cv_name, bounds in ranges.items():
            check_cv_names([cv_name], cvs)
            try:
                lo, hi = (float(b) for b in bounds)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"state {name!r}: range of {cv_name!r} must be [lo, hi], got {bounds!r}"
                ) from err
            parsed[str(cv_name)] = [lo, hi]
        states[str(name)] = parsed
    return states


def check_state_names(names: Sequence[str], states: Mapping) -> None:
    """``KeyError`` naming the defined states if one of ``names`` is unknown."""
    for name in names:
        if name not in states:
            raise KeyError(
                f"unknown state {name!r}; defined states: {sorted(states)} (add one with "
                "+states.NAME={CV: [lo, hi]})"
            )


def sign_state_pairs(states: Mapping[str, Mapping]) -> dict[str, tuple[str, str]]:
    """``{cv: (f"{cv}_negative", f"{cv}_positive")}`` for every such pair of state names
    (e.g. ``phi`` of ALDP, ``phi_1``, ``phi_2``, ... of a peptide), in the states' order.

    The ΔF of a pair is F(positive) - F(negative), e.g. that of a residue's phi > 0 state.
    """
    out = {}
    for name in states:
        name = str(name)
        if name.endswith("_negative"):
            stem = name[: -len("_negative")]
            if stem and f"{stem}_positive" in states:
                out[stem] = (name, f"{stem}_positive")
    return out


def cv_edges(spec: Mapping, values: Sequence[np.ndarray], bins: int) -> np.ndarray:
    """Bin edges ``(bins + 1,)`` shared by all sources of one CV.

    Torsions: ``bins`` equal bins on [-pi, pi]. Other (non-periodic) CVs, including the
    feature types ``coordinate`` and ``linear``: equal bins from the smallest to the
    largest finite value over all ``values`` arrays.
    """
    if int(bins) < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    if is_periodic(spec):
        return np.linspace(-math.pi, math.pi, int(bins) + 1)
    finite = [np.asarray(v, dtype=np.float64) for v in values]
    finite = np.concatenate([v[np.isfinite(v)] for v in finite] or [np.zeros(0)])
    if finite.size == 0:
        raise ValueError("no finite CV values to bin")
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1e-6 * max(1.0, abs(lo))
    return np.linspace(lo, hi, int(bins) + 1)


def _prepare(values, spec: Mapping) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return wrap_angle(v) if is_periodic(spec) else v


def pmf_1d(
    values: np.ndarray,
    spec: Mapping,
    edges: np.ndarray,
    log_w: np.ndarray | None = None,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(centres, F, stderr)`` along one CV from i.i.d. (weighted) samples, F in kT.

    Torsion values are wrapped to [-pi, pi) first. The error is an i.i.d. bootstrap
    (see :func:`bgflow_mini.reweighting.free_energy_profile`); min F is 0.
    """
    return free_energy_profile(
        _prepare(values, spec), log_w, bins=edges, n_bootstrap=n_bootstrap, seed=seed
    )


def pmf_2d(
    values: tuple[np.ndarray, np.ndarray],
    specs: tuple[Mapping, Mapping],
    edges: tuple[np.ndarray, np.ndarray],
    log_w: np.ndarray | None = None,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(centres1, centres2, F (n1, n2), stderr)`` over two CVs, F in kT (min 0)."""
    v1, v2 = (_prepare(v, s) for v, s in zip(values, specs))
    return free_energy_profile_2d(
        v1, v2, log_w, bins=(edges[0], edges[1]), n_bootstrap=n_bootstrap, seed=seed
    )


def _labels(values: Sequence[np.ndarray], edges: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """Flat bin label per sample (``n_bins`` for samples outside the bins)."""
    total = 1
    label = np.zeros(len(values[0]), dtype=np.int64)
    outside = np.zeros(len(values[0]), dtype=bool)
    for v, e in zip(values, edges):
        nb = len(e) - 1
        idx = np.searchsorted(e, v, side="right") - 1
        idx[v == e[-1]] = nb - 1
        bad = ~np.isfinite(v) | (v < e[0]) | (v > e[-1])
        outside |= bad
        label = label * nb + np.where(bad, 0, idx)
        total *= nb
    return np.where(outside, total, label), total


def block_pmf(
    values: Sequence[np.ndarray],
    specs: Sequence[Mapping],
    edges: Sequence[np.ndarray],
    n_blocks: int = 20,
    n_bootstrap: int = 200,
    seed: int = 0,
    log_w: np.ndarray | None = None,
    n_series: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """F (kT, min 0) and block-bootstrap stderr of a time series over 1 or 2 CVs.

    ``values``: one array per CV, frames in time order (e.g. MD). The frames are cut
    into ``n_blocks`` contiguous blocks which are resampled with replacement.
    ``n_series > 1``: the frames are that many series of equal length sampled at the same
    times, series after series (replicas of a replica exchange); a block holds the same
    times of every series. ``log_w`` (frames,) weights the frames (e.g. MBAR weights of
    pooled replicas for the target temperature); default: every frame counts once.
    Returns arrays of shape ``(n1,)`` or ``(n1, n2)``; empty bins are +inf and bins
    empty in more than half of the replicates have stderr +inf. As for the i.i.d.
    profiles, the error is that of -ln p per bin (not of the shift to min 0).
    """
    vals = [_prepare(v, s) for v, s in zip(values, specs)]
    n = len(vals[0])
    if n_series < 1 or n % n_series:
        raise ValueError(f"{n} frames do not split into n_series={n_series} equal series")
    n_time = n // n_series
    if n_blocks < 2 or n_time < n_blocks:
        raise ValueError(f"need 2 <= n_blocks <= n_frames, got {n_blocks} for {n_time} frames")
    lw = np.zeros(n) if log_w is None else np.asarray(log_w, dtype=np.float64)
    if lw.shape != (n,) or np.isnan(lw).any() or np.isposinf(lw).any() or np.all(lw == -np.inf):
        raise ValueError(f"log_w must be finite (or -inf) of shape ({n},), got {lw.shape}")
    w = np.exp(lw - lw.max())
    labels, n_bins = _labels(vals, edges)
    labels, w = labels.reshape(n_series, n_time), w.reshape(n_series, n_time)
    shape = tuple(len(e) - 1 for e in edges)
    widths = np.ones(shape)
    for axis, e in enumerate(edges):
        dims = [1] * len(shape)
        dims[axis] = len(e) - 1
        widths = widths * np.diff(e).reshape(dims)
    log_width = np.log(widths.ravel())
    counts = np.stack(
        [
            np.bincount(labels[:, b].ravel(), w[:, b].ravel(), minlength=n_bins + 1)
            for b in np.array_split(np.arange(n_time), n_blocks)
        ]
    )  # (n_blocks, n_bins + 1): weighted counts, the last column outside the bins
    with np.errstate(divide="ignore"):
        f = -(np.log(counts.sum(0)[:n_bins]) - math.log(counts.sum()) - log_width)
    if not np.isfinite(f).any():
        raise ValueError("no frame falls inside the bins")
    f = f - f[np.isfinite(f)].min()
    err = np.full(n_bins, np.nan)
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n_blocks, size=(n_bootstrap, n_blocks))
        reps = counts[idx].sum(1)  # (n_bootstrap, n_bins + 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            f_reps = -(np.log(reps[:, :n_bins] / reps.sum(1, keepdims=True)) - log_width)
        ok = np.isfinite(f_reps)
        count = ok.sum(0)
        mean = np.where(ok, f_reps, 0.0).sum(0) / np.maximum(count, 1)
        var = (np.where(ok, f_reps - mean, 0.0) ** 2).sum(0) / np.maximum(count - 1, 1)
        good = (count >= 2) & (count >= 0.5 * n_bootstrap)
        err = np.where(good & np.isfinite(f), np.sqrt(var), np.inf)
    return f.reshape(shape), err.reshape(shape)


def _disjoint_masks(cv_values, states, cvs, state_a: str, state_b: str):
    check_state_names([state_a, state_b], states)
    a, b = state_masks(cv_values, states, cvs, state_a, state_b)
    both = int((a & b).sum())
    if both:
        raise ValueError(
            f"states {state_a!r} {states[state_a]} and {state_b!r} {states[state_b]} overlap "
            f"({both} samples lie in both); ΔF needs disjoint states"
        )
    return a, b


def state_delta_f(
    cv_values: Mapping[str, np.ndarray],
    states: Mapping,
    cvs: Mapping,
    state_a: str,
    state_b: str,
    log_w: np.ndarray | None = None,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> dict:
    """ΔF = F_b - F_a (kT) of i.i.d. (weighted) samples, with bootstrap stderr.

    Returns ``{"dF", "stderr", "ess", "n_a", "n_b", "population_a", "population_b"}``
    (``ess`` normalised, 1 for unweighted samples; populations are the normalised
    weight fractions). A state without weight gives ``dF = ±inf``, ``stderr = inf``.
    """
    a, b = _disjoint_masks(cv_values, states, cvs, state_a, state_b)
    n = len(a)
    lw = np.zeros(n) if log_w is None else np.asarray(log_w, dtype=np.float64)
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    out = {"n_a": int(a.sum()), "n_b": int(b.sum())}
    if not np.isfinite(lw).any():
        nan = math.nan
        return {
            **out,
            "dF": nan,
            "stderr": nan,
            "ess": 0.0,
            "population_a": nan,
            "population_b": nan,
        }
    total = logsumexp(lw)
    has_a, has_b = np.isfinite(lw[a]).any(), np.isfinite(lw[b]).any()
    out.update(
        ess=1.0 if log_w is None else effective_sample_size(lw),
        population_a=float(np.exp(logsumexp(lw[a]) - total)) if has_a else 0.0,
        population_b=float(np.exp(logsumexp(lw[b]) - total)) if has_b else 0.0,
    )
    if not (has_a and has_b):
        if not (has_a or has_b):
            return {**out, "dF": math.nan, "stderr": math.nan}
        return {**out, "dF": math.inf if not has_b else -math.inf, "stderr": math.inf}
    dF, err = free_energy_difference(lw, a, b, n_bootstrap=n_bootstrap, seed=seed)
    return {**out, "dF": dF, "stderr": err}


def md_delta_f(
    cv_values: Mapping[str, np.ndarray],
    states: Mapping,
    cvs: Mapping,
    state_a: str,
    state_b: str,
    n_blocks: int = 20,
    n_bootstrap: int = 200,
    seed: int = 0,
    log_w: np.ndarray | None = None,
    n_series: int = 1,
) -> dict:
    """ΔF = F_b - F_a (kT) of MD frames in time order, with block-bootstrap stderr.

    ``n_series > 1``: the frames are that many series of equal length sampled at the same
    times, series after series (e.g. replicas of a replica exchange), and blocks of time
    are resampled in all of them at once. ``log_w`` (frames,) weights the frames (e.g. MBAR
    weights of pooled replicas for the target temperature).

    Returns ``{"dF", "stderr", "n_a", "n_b", "population_a", "population_b", "ess"}``
    (``ess``: the Kish effective fraction of the weights, 1 for counted frames).
    """
    a, b = _disjoint_masks(cv_values, states, cvs, state_a, state_b)
    if n_series < 1 or len(a) % n_series:
        raise ValueError(f"{len(a)} frames do not split into n_series={n_series} equal series")
    w = np.ones(len(a)) if log_w is None else np.exp(log_w - np.max(log_w))
    if w.shape != a.shape:
        raise ValueError(f"log_w has shape {w.shape}, expected {a.shape}")
    shape = (n_series, len(a) // n_series)
    n_blocks = min(n_blocks, shape[1])
    dF, err = block_free_energy(
        a.reshape(shape), b.reshape(shape), n_blocks, n_bootstrap, seed, w.reshape(shape)
    )
    return {
        "dF": dF,
        "stderr": err,
        "ess": 1.0 if log_w is None else effective_sample_size(log_w),
        "n_a": int(a.sum()),
        "n_b": int(b.sum()),
        "population_a": float((w * a).sum() / w.sum()),
        "population_b": float((w * b).sum() / w.sum()),
    }


def pmf_agreement(
    f_ref: np.ndarray,
    f: np.ndarray,
    err_ref: np.ndarray | None = None,
    err: np.ndarray | None = None,
    max_f_ref: float = 5.0,
) -> dict:
    """Agreement of a PMF ``f`` with a reference PMF ``f_ref`` (same bins, kT).

    Only bins with ``f_ref <= max_f_ref`` (measured from the reference's minimum) and both
    values finite are compared. PMFs are defined up to a constant; ``f`` is shifted so
    that both give the compared region the same free energy ``-ln sum exp(-F)``, which
    does not hinge on one noisy bin. Returns ``max_abs_diff``, ``rms_diff``, ``n_bins``,
    ``shift`` and, with errors given, ``max_abs_z`` (difference over the combined stderr).
    """
    f_ref, f = np.asarray(f_ref, dtype=np.float64), np.asarray(f, dtype=np.float64)
    if f_ref.shape != f.shape:
        raise ValueError(f"PMFs must share bins, got shapes {f_ref.shape} and {f.shape}")
    finite = np.isfinite(f_ref)
    base = f_ref[finite].min() if finite.any() else 0.0
    m = finite & np.isfinite(f) & (f_ref - base <= max_f_ref)
    out = {"max_f_ref": float(max_f_ref), "n_bins": int(m.sum())}
    if not m.any():
        return {**out, "max_abs_diff": math.nan, "rms_diff": math.nan, "shift": math.nan}
    shift = float(logsumexp(-f_ref[m]) - logsumexp(-f[m]))  # F_region(f) - F_region(ref)
    d = (f[m] - shift) - f_ref[m]
    out.update(
        max_abs_diff=float(np.abs(d).max()),
        rms_diff=float(np.sqrt(np.mean(d**2))),
        shift=shift,
    )
    if err_ref is not None and err is not None:
        se = np.hypot(np.asarray(err_ref, float)[m], np.asarray(err, float)[m])
        with np.errstate(divide="ignore", invalid="ignore"):
            out["max_abs_z"] = float(np.nanmax(np.abs(d) / se))
    return out
