"""Maximum-likelihood draw weights with a floor on every named state's share.

Reverse KL empties rare states (phi > 0 of a dipeptide, a minor rotamer): where the flow
fits a rare state poorly, taking its mass away lowers the KL faster than fitting it. The
maximum-likelihood term is what keeps such a state filled, in proportion to its share of
the ML data. :func:`state_floor_log_weights` raises the draw weights of the frames in every
state whose weighted share is below ``floor`` until it reaches ``floor`` (iterative
proportional fitting over possibly overlapping states, e.g. phi and chi1 states), leaving
the weights inside and outside each state otherwise as they were. The flow then sees the
rare states more often in ML; its density stays a normalised density and the importance
weights w = p / q stay exact, so reweighted results are unbiased whatever the floor (a
state the flow over-fills costs little ESS; one it under-fills costs much).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import cv as cvmod
from .replica_pool import kish_size

__all__ = ["check_floor", "state_masks", "state_floor_log_weights"]


def check_floor(floor: float) -> float:
    """``floor`` as a float, or ``ValueError`` unless it is a number in (0, 0.5)."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor < 0.5:
        raise ValueError(f"state floor must be a number in (0, 0.5), got {floor!r}")
    return float(floor)


def state_masks(x, cvs: Mapping, states: Mapping) -> dict[str, np.ndarray]:
    """``{state: bool (n,)}``: which of the configurations ``x`` ``(n, dim)`` nm lie in each
    of ``states`` (CV ranges, as a system's ``states``; ``cvs`` their CV specs)."""
    values = cvmod.compute_cvs(np.asarray(x, dtype=np.float64), cvs, cvmod.state_cvs(states, cvs))
    return {name: np.asarray(cvmod.in_state(values, s, cvs), bool) for name, s in states.items()}


def _shares(w: np.ndarray, masks: Mapping[str, np.ndarray]) -> dict[str, float]:
    total = w.sum()
    return {name: float(w[m].sum() / total) for name, m in masks.items()}


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

    Raises ``ValueError`` for a floor outside (0, 0.5) or when the floors cannot all hold
    (e.g. disjoint states whose floors sum beyond 1).
    """
    floor = check_floor(floor)
    n = len(next(iter(masks.values()))) if masks else (0 if log_w is None else len(log_w))
    lw = np.zeros(n) if log_w is None else np.asarray(log_w, dtype=np.float64).copy()
    for name, m in masks.items():
        if m.shape != lw.shape:
            raise ValueError(f"state {name!r}: mask of shape {m.shape} for {lw.shape} weights")
    w = np.exp(lw - lw.max())
    before = _shares(w, masks)
    empty = sorted(name for name, m in masks.items() if not (w[m] > 0).any())
    raised = [name for name, m in masks.items() if name not in empty and not m.all()]
    for _ in range(max_iter):
        changed = False
        for name in raised:
            m = masks[name]
            share = w[m].sum() / w.sum()
            if share < floor * (1 - tol):
                w[m] *= floor * (1 - share) / (share * (1 - floor))
                w /= w.max()
                changed = True
        if not changed:
            break
    after = _shares(w, masks)
    short = {s: v for s, v in after.items() if s in raised and v < floor * (1 - 10 * tol)}
    if short:
        raise ValueError(
            f"the state floor {floor} cannot hold for every state at once (after {max_iter} "
            f"sweeps: {short}); lower it, or define states whose floors fit together"
        )
    with np.errstate(divide="ignore"):  # frames without weight stay at -inf
        out = np.log(w)
    report = {
        "floor": float(floor),
        "states": {
            s: {"frames": int(masks[s].sum()), "before": before[s], "after": after[s]}
            for s in masks
        },
        "kish_frames_before": kish_size(lw),
        "kish_frames": kish_size(out),
        "empty": empty,
    }
    return out, report
