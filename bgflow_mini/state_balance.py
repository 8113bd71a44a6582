"""Maximum-likelihood draw weights with a floor on every named state's share.

Reverse KL empties rare states (phi > 0 of a dipeptide, a minor rotamer): where the flow
fits a rare state poorly, taking its mass away lowers the KL faster than fitting it. The
maximum-likelihood term is what keeps such a state filled, in proportion to its share of
the ML data. :func:`state_floor_log_weights` raises the draw weights of the frames in every
state whose weighted share is below ``floor`` until it reaches ``floor`` (iterative
proportional fitting over possibly overlapping states, e.g. phi and chi1 states). Frames
that lie in the same states keep their relative weights; with one state, or with disjoint
states, that is every frame inside a state and every frame outside it. The flow then sees
the rare states more often in ML; its density stays a normalised density and the importance
weights w = p / q stay exact, so reweighted results are unbiased whatever the floor (a
state the flow over-fills costs little ESS; one it under-fills costs much).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy.special import logsumexp

from . import cv as cvmod
from .replica_pool import kish_size

__all__ = ["check_floor", "disjoint_states", "state_masks", "state_floor_log_weights"]


def check_floor(floor: float, states: Mapping | None = None, cvs: Mapping | None = None) -> float:
    """``floor`` as a float, or ``ValueError`` unless it is a number in (0, 0.5) that
    ``states`` (CV ranges, as a system's ``states``; ``cvs`` marks the periodic CVs) can all
    hold at once: k states no configuration can share (e.g. three chi1 rotamers) need
    ``k * floor <= 1``. A floor that passes can still fail on data where states overlap
    too little; :func:`state_floor_log_weights` says so."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor < 0.5:
        raise ValueError(f"state floor must be a number in (0, 0.5), got {floor!r}")
    floor = float(floor)
    group = disjoint_states(states or {}, cvs)
    if len(group) * floor > 1 + 1e-12:
        raise ValueError(
            f"state floor {floor} cannot hold: the states {group} exclude one another, so "
            f"their shares sum to at most 1; use a floor of at most {1 / len(group):.4g}"
        )
    return floor


def disjoint_states(states: Mapping, cvs: Mapping | None = None) -> list[str]:
    """The largest group of ``states`` of which no two can hold the same configuration
    (:func:`bgflow_mini.cv.states_disjoint`), in their order; [] for no states."""
    names = list(states)
    apart = {
        a: {b for b in names if b != a and cvmod.states_disjoint(states[a], states[b], cvs)}
        for a in names
    }
    best: list[str] = []

    def grow(group: list[str], candidates: list[str]) -> None:
        nonlocal best
        if len(group) + len(candidates) <= len(best):
            return
        if not candidates:
            best = group
            return
        first, rest = candidates[0], candidates[1:]
        grow(group + [first], [c for c in rest if c in apart[first]])
        grow(group, rest)

    grow([], names)
    return best


def state_masks(x, cvs: Mapping, states: Mapping) -> dict[str, np.ndarray]:
    """``{state: bool (n,)}``: which of the configurations ``x`` ``(n, dim)`` nm lie in each
    of ``states`` (CV ranges, as a system's ``states``; ``cvs`` their CV specs)."""
    values = cvmod.compute_cvs(np.asarray(x, dtype=np.float64), cvs, cvmod.state_cvs(states, cvs))
    return {name: np.asarray(cvmod.in_state(values, s, cvs), bool) for name, s in states.items()}


def _log_share(lw: np.ndarray, m: np.ndarray) -> float:
    """log of the weight share of the rows ``m`` (-inf for none), in log space so that
    frames far below the heaviest one still count."""
    return float(logsumexp(lw[m]) - logsumexp(lw)) if m.any() else -math.inf


def state_floor_log_weights(
    log_w: np.ndarray | None,
    masks: Mapping[str, np.ndarray],
    floor: float,
    max_iter: int = 200,
    tol: float = 1e-4,
) -> tuple[np.ndarray, dict]:
    """Log draw weights in which every non-empty state holds at least ``floor`` of the weight.

    Arguments:
        log_w: log weights ``(n,)`` of the ML rows (None: equal weights).
        masks: ``{state: bool (n,)}`` membership of the rows (:func:`state_masks`).
        floor: the smallest share in (0, 0.5); states already above it are not raised
            (their share still moves where they overlap a raised state).
        max_iter, tol: sweeps over the states, and the relative shortfall accepted.

    Returns ``(log_w (n,), report)``: the new log weights (max 0) and a report with each
    state's share ``before`` and ``after``, its frames, the ``kish_frames`` (Kish effective
    size) before and after, and the ``empty`` states (no frame with weight: nothing to raise).

    Rows in the same states keep their relative weights; each raised state ends within
    ``10 * tol`` (relative) of the floor or above it. Computed in log space: rows far below
    the heaviest one still count.

    Raises ``ValueError`` for a floor outside (0, 0.5), masks that are not bool arrays of
    the weights' shape, NaN or +inf log weights, or when the floors cannot all hold (e.g.
    disjoint states whose floors sum beyond 1).
    """
    floor = check_floor(floor)
    n = len(next(iter(masks.values()))) if masks else (0 if log_w is None else len(log_w))
    lw = np.zeros(n) if log_w is None else np.asarray(log_w, dtype=np.float64).copy()
    if lw.ndim != 1 or np.isnan(lw).any() or np.isposinf(lw).any() or not np.isfinite(lw).any():
        raise ValueError("log weights must be a 1-D array of finite values or -inf, one finite")
    masks = {name: np.asarray(m) for name, m in masks.items()}
    for name, m in masks.items():
        if m.dtype != bool or m.shape != lw.shape:
            raise ValueError(
                f"state {name!r}: masks must be bool arrays of shape {lw.shape} (one entry per "
                f"row), got {m.dtype} of shape {m.shape}"
            )
    lw -= lw.max()
    kish_before = kish_size(lw)
    before = {name: float(np.exp(_log_share(lw, m))) for name, m in masks.items()}
    empty = sorted(name for name, m in masks.items() if not np.isfinite(lw[m]).any())
    raised = [name for name, m in masks.items() if name not in empty and not m.all()]
    log_floor = math.log(floor)
    for _ in range(max_iter):
        changed = False
        for name in raised:
            m = masks[name]
            ls = _log_share(lw, m)
            if ls < log_floor + math.log1p(-tol):
                # the factor that brings the share s to f: f (1 - s) / (s (1 - f))
                lw[m] += log_floor + math.log1p(-math.exp(ls)) - ls - math.log1p(-floor)
                lw -= lw.max()
                changed = True
        if not changed:
            break
    after = {name: float(np.exp(_log_share(lw, m))) for name, m in masks.items()}
    short = {s: v for s, v in after.items() if s in raised and v < floor * (1 - 10 * tol)}
    if short:
        raise ValueError(
            f"the state floor {floor} cannot hold for every state at once (after {max_iter} "
            f"sweeps: {short}); lower it, or define states whose floors fit together"
        )
    report = {
        "floor": float(floor),
        "states": {
            s: {"frames": int(masks[s].sum()), "before": before[s], "after": after[s]}
            for s in masks
        },
        "kish_frames_before": kish_before,
        "kish_frames": kish_size(lw),
        "empty": empty,
    }
    return lw, report
