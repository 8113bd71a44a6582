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
from .units import wrap_angle

__all__ = [
    "check_floor",
    "disjoint_states",
    "max_floor",
    "state_masks",
    "state_floor_log_weights",
]

_MAX_CELLS = 20_000  # beyond this many joint cells, max_floor gives None


def check_floor(floor: float, states: Mapping | None = None, cvs: Mapping | None = None) -> float:
    """``floor`` as a float, or ``ValueError`` unless it is a number in (0, 0.5) that
    ``states`` (CV ranges, as a system's ``states``; ``cvs`` marks the periodic CVs) can all
    hold at once (:func:`max_floor`; e.g. three chi1 rotamers, which exclude one another,
    need ``3 * floor <= 1``). A floor that passes can still fail on data that leave the
    needed regions empty; :func:`state_floor_log_weights` says so."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor < 0.5:
        raise ValueError(f"state floor must be a number in (0, 0.5), got {floor!r}")
    floor = float(floor)
    states = dict(states or {})
    cells = _cells(states, cvs)
    best = None if cells is None else _max_share(cells)
    if best is not None and floor <= best + 1e-9:
        return floor
    # the usual reason, named: states that exclude one another (those with room for none
    # left out where that is known)
    group = disjoint_states(states if cells is None else {k: states[k] for k in cells}, cvs)
    if len(group) * floor > 1 + 1e-12:
        raise ValueError(
            f"state floor {floor} cannot hold: the states {group} exclude one another, so "
            f"their shares sum to at most 1; use a floor of at most {1 / len(group):.4g}"
        )
    if best is not None:
        raise ValueError(
            f"state floor {floor} cannot hold: no distribution of configurations gives every "
            f"one of the states {list(cells)} that share at once (their ranges overlap too "
            f"little); use a floor of at most {best:.4g}"
        )
    return floor


def _cell_points(ranges: list, periodic: bool) -> np.ndarray:
    """One point inside each cell into which the ``[lo, hi)`` ``ranges`` of one CV cut its
    axis (the circle ``[-pi, pi)`` where ``periodic``)."""
    if periodic:
        cuts = {float(wrap_angle(b)) for lo, hi in ranges if hi - lo < 2 * math.pi
                for b in (lo, hi)}  # fmt: skip
        if not cuts:
            return np.zeros(1)
        c = np.sort(np.fromiter(cuts, float))
        nxt = np.append(c[1:], c[0] + 2 * math.pi)  # the last cell wraps past pi
        return np.asarray(wrap_angle(0.5 * (c + nxt)), dtype=float)
    c = np.unique(np.asarray(ranges, dtype=float).ravel())
    c = c[np.isfinite(c)]  # an infinite bound cuts nothing
    if not c.size:
        return np.zeros(1)
    return np.concatenate([[c[0] - 1.0], 0.5 * (c[1:] + c[:-1]), [c[-1] + 1.0]])


def _cells(states: Mapping, cvs: Mapping | None) -> dict[str, np.ndarray] | None:
    """``{state: bool (n_cells,)}``: which cells of the joint grid (the cells into which the
    states' ranges cut their CVs) lie in each state, for the states that hold any; ``None``
    beyond 20,000 cells."""
    names = sorted({cv for s in states.values() for cv in s})
    periodic = {n: cvs is not None and cvmod.is_periodic(cvs.get(n)) for n in names}
    points = [_cell_points([s[n] for s in states.values() if n in s], periodic[n]) for n in names]
    if math.prod(len(p) for p in points) > _MAX_CELLS:
        return None
    grid = np.meshgrid(*points, indexing="ij") if names else []
    values = {n: g.ravel() for n, g in zip(names, grid, strict=True)}
    out = {}
    for name, state in states.items():
        m = np.asarray(cvmod.in_state(values, state, cvs), bool) if state else np.ones(1, bool)
        m = np.broadcast_to(m, grid[0].size if names else 1)
        if m.any():
            out[name] = m
    return out


def _max_share(cells: Mapping[str, np.ndarray]) -> float:
    """``max f`` over distributions of the cells with every state's share >= f (a linear
    program); 1.0 for no states."""
    from scipy.optimize import linprog

    if not cells:
        return 1.0
    inside = np.asarray(list(cells.values()), float)
    n_states, n_cells = inside.shape
    # variables: the cells' shares, then f; maximise f with every state's share >= f
    res = linprog(
        np.append(np.zeros(n_cells), -1.0),
        A_ub=np.hstack([-inside, np.ones((n_states, 1))]), b_ub=np.zeros(n_states),
        A_eq=np.append(np.ones(n_cells), 0.0)[None], b_eq=[1.0],
        bounds=[(0, None)] * n_cells + [(0, 1)], method="highs",
    )  # fmt: skip
    if not res.success:  # pragma: no cover - always feasible (f = 0)
        raise RuntimeError(f"state floor bound: the linear program failed ({res.message})")
    return float(min(1.0, -res.fun))


def max_floor(states: Mapping, cvs: Mapping | None = None) -> float | None:
    """The largest share every state of ``states`` (CV ranges; ``cvs`` marks the periodic
    CVs) can hold at once: ``max f`` such that some distribution of configurations gives
    each state a share of at least ``f``, a linear program over the cells into which the
    states' ranges cut their CVs. States that no configuration can lie in (an empty range)
    are left out, as :func:`state_floor_log_weights` leaves empty states; 1.0 for none.
    ``None`` where the CVs cut the space into more than 20,000 cells (not solved)."""
    cells = _cells(dict(states), cvs)
    return None if cells is None else _max_share(cells)


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
    state's share ``before`` and ``after``, its frames and whether the floor ``raised`` it
    (multiplied its weights: a state below the floor by more than ``tol``, at the start or
    after other states were raised), the ``kish_frames`` (Kish effective size) before and
    after, and the ``empty`` states (no frame with weight: nothing to raise).

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
    lifted: set[str] = set()  # the states whose weights the floor multiplied
    for _ in range(max_iter):
        changed = False
        for name in raised:
            m = masks[name]
            ls = _log_share(lw, m)
            if ls < log_floor + math.log1p(-tol):
                # the factor that brings the share s to f: f (1 - s) / (s (1 - f))
                lw[m] += log_floor + math.log1p(-math.exp(ls)) - ls - math.log1p(-floor)
                lw -= lw.max()
                lifted.add(name)
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
            s: {
                "frames": int(masks[s].sum()),
                "before": before[s],
                "after": after[s],
                "raised": s in lifted,
            }
            for s in masks
        },
        "kish_frames_before": kish_before,
        "kish_frames": kish_size(lw),
        "empty": empty,
    }
    return lw, report
