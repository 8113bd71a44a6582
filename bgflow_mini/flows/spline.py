"""Rational-quadratic splines: the shared core and the bounded spline with identity tails.

A monotone rational-quadratic (RQ) spline (Gregory & Delbourgo, 1982; Durkan et al.,
2019, "Neural Spline Flows") maps an interval ``[-B, B]`` onto itself through ``K`` bins,
each a ratio of quadratics fixed by the knots ``(x_k, y_k)`` and the positive
derivatives ``d_k`` at the knots. It is far more expressive per feature than an affine
map (it can make one Gaussian bimodal, skewed or heavy-shouldered) and has a closed-form
inverse and an exact log-derivative.

Two variants share the core :func:`rq_spline` and :func:`knot_positions`:

* :func:`bounded_spline` (here), for unbounded real features (standardised bonds,
  angles, narrow torsions): the spline acts on ``[-B, B]`` and is the identity outside
  ("linear tails"); the end derivatives are fixed to 1, so the map is C^1 at ``+-B``;
* :func:`~bgflow_mini.flows.circular.circular_spline`, for angles on the circle.

Parameter layout of one bounded feature (last axis, ``3 K - 1`` numbers):
``[widths (K), heights (K), inner derivatives (K - 1)]``. Widths and heights are
``MIN_BIN + (1 - MIN_BIN K) softmax(raw)`` of the interval; derivatives are
``MIN_DERIV + (1 - MIN_DERIV) softplus(raw) / softplus(0)``, exactly 1 at ``raw = 0``.
With all raw parameters zero the spline is the identity up to rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

__all__ = [
    "bounded_spline",
    "bounded_spline_torch",
    "n_bounded_spline_params",
    "knot_positions",
    "knot_derivatives",
    "rq_spline",
    "MIN_BIN",
    "MIN_DERIV",
    "TAIL_BOUND",
]

MIN_BIN = 2.0**-10
"""Smallest bin width/height as a fraction of the interval."""
MIN_DERIV = 2.0**-10
"""Smallest knot derivative of a spline."""
TAIL_BOUND = 5.0
"""Default half-width of the bounded spline's interval (standardised feature units)."""
_DERIV_GAIN = (1.0 - MIN_DERIV) / math.log(2.0)  # softplus(0) = log 2


def n_bounded_spline_params(n_bins: int) -> int:
    """Raw parameters per feature of :func:`bounded_spline` with ``n_bins`` bins: ``3 K - 1``."""
    return 3 * n_bins - 1


def knot_positions(raw_wh: Tensor, half_width: float) -> Tensor:
    """Knots of an RQ spline on ``[-half_width, half_width]``.

    Arguments:
        raw_wh: raw bin widths then heights, ``(..., 2 K)``.
        half_width: half the interval (feature units).

    Returns:
        x knots and y knots ``(..., 2, K + 1)``, from ``-half_width`` to ``half_width`` (both
        ends exact); each bin is at least ``MIN_BIN`` of the interval wide and high.
    """
    k = raw_wh.shape[-1] // 2
    frac = torch.softmax(raw_wh.unflatten(-1, (2, k)), dim=-1).mul(1.0 - MIN_BIN * k).add_(MIN_BIN)
    inner = torch.cumsum(frac, dim=-1)[..., :-1]
    knots = F.pad(F.pad(inner, (1, 0), value=0.0), (0, 1), value=1.0)
    return knots.mul(2 * half_width).sub_(half_width)


def knot_derivatives(raw_d: Tensor) -> Tensor:
    """Positive knot derivatives ``MIN_DERIV + (1 - MIN_DERIV) softplus(raw) / log 2``, same
    shape as ``raw_d`` (1 at ``raw = 0``).

    ``MIN_DERIV`` bounds the derivatives at the knots only: inside a bin the slope of the
    rational quadratic can fall lower when neighbouring bins differ greatly in slope.
    """
    return F.softplus(raw_d).mul(_DERIV_GAIN).add_(MIN_DERIV)


def rq_spline(x: Tensor, table: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    """Monotone RQ spline, elementwise.

    Arguments:
        x: points ``(...)`` inside the table's interval (the domain if forward, the range
            if inverse).
        table: knots ``(..., 3, K + 1)``; rows x knots, y knots, derivatives.
        inverse: apply the inverse map.

    Returns:
        ``(y, log f'(z))``, both ``(...)``, where ``z`` is the point in the spline's domain
        (the input if forward, the output if inverse).
    """
    search = table.detach()[..., 1 if inverse else 0, 1:-1]
    idx = (x.detach().unsqueeze(-1) >= search).sum(dim=-1, keepdim=True)  # (..., 1)
    pair = torch.cat([idx, idx + 1], dim=-1).unsqueeze(-2).expand(*idx.shape[:-1], 3, 2)
    lo, hi = table.gather(-1, pair).unbind(-1)  # (..., 3) each: x, y, d at the bin's ends
    x_lo, y_lo, d_lo = lo.unbind(-1)
    x_hi, y_hi, d_hi = hi.unbind(-1)
    w = x_hi - x_lo
    h = y_hi - y_lo
    s = h / w
    delta = d_lo + d_hi - 2 * s
    if inverse:
        dy = x - y_lo
        a = h * (s - d_lo) + dy * delta
        b = h * d_lo - dy * delta
        c = -s * dy
        disc = (b * b - 4 * a * c).clamp_min(0.0)
        xi = (2 * c / (-b - torch.sqrt(disc))).clamp(0.0, 1.0)
        out = x_lo + xi * w
    else:
        xi = ((x - x_lo) / w).clamp(0.0, 1.0)
    one_m = 1 - xi
    t = xi * one_m
    denom = s + delta * t
    if not inverse:
        # y = y_lo + h * [s xi^2 + d_lo t] / denom, written as a linear part plus
        # a correction that vanishes exactly when s == d_lo == d_hi.
        out = y_lo + h * (xi + t * ((d_lo - s) - delta * xi) / denom)
    num = d_hi * xi * xi + 2 * s * t + d_lo * one_m * one_m
    logderiv = 2 * torch.log(s / denom) + torch.log(num)
    return out, logderiv


def bounded_spline(
    x: Tensor, params: Tensor, bound: float = TAIL_BOUND, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """RQ spline on ``[-bound, bound]``, identity outside, applied elementwise.

    With ``K = 1`` the single bin spans the interval with slope 1 at both ends: the
    identity, whatever the parameters (so :class:`~bgflow_mini.flows.SplineCoupling` asks
    for ``K >= 2``).

    Arguments:
        x: real features, shape ``(...)`` (e.g. standardised bonds and angles).
        params: raw parameters, shape ``(..., 3 K - 1)``, the dtype of ``x`` (layout in the
            module docstring).
        bound: finite half-width ``B > 0`` of the interval the spline acts on (feature units).
        inverse: apply the inverse map instead.

    Returns:
        ``(y, logabsdet)``, both of shape ``(...)``: the mapped features and the
        elementwise log|dy/dx| of the direction taken (0 in the tails).
    """
    p = params.shape[-1]
    if p < 2 or (p + 1) % 3 != 0:
        raise ValueError(f"bounded_spline params need 3*K-1 (K >= 1) entries, got {p}")
    if params.shape[:-1] != x.shape:
        raise ValueError(
            f"bounded_spline params shape {tuple(params.shape)} does not match "
            f"x shape {tuple(x.shape)} + (3K-1,)"
        )
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bounded_spline bound must be finite and > 0, got {bound!r}")
    if native.supports(x, params):  # one fused kernel call on the CPU (flows/native.py)
        return native.native_bounded_spline(x, params, bound, inverse)
    return bounded_spline_torch(x, params, bound, inverse)


def bounded_spline_torch(
    x: Tensor, params: Tensor, bound: float = TAIL_BOUND, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """:func:`bounded_spline` in PyTorch operations, whatever the device (arguments checked
    by the caller); the reference of the native kernel and its path to higher derivatives."""
    k = (params.shape[-1] + 1) // 3
    raw_wh, raw_d = params.split([2 * k, k - 1], dim=-1)
    d = F.pad(knot_derivatives(raw_d), (1, 1), value=1.0)  # slope 1 at both ends: C^1 tails
    table = torch.cat([knot_positions(raw_wh, bound), d.unsqueeze(-2)], dim=-2)
    inside = (x >= -bound) & (x <= bound)
    # tail points are evaluated at -B, where the inverse's quadratic has c = 0 (at +B a steep
    # last bin can cancel its discriminant to 0 in float32: an infinite sqrt gradient that
    # torch.where would turn into NaN parameter gradients); their values are discarded
    x_in = torch.where(inside, x, torch.full_like(x, -bound))
    y, logderiv = rq_spline(x_in, table, inverse)
    y = torch.where(inside, y, x)
    logderiv = torch.where(inside, logderiv, torch.zeros_like(logderiv))
    return y, (-logderiv if inverse else logderiv)
