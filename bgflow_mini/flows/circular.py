"""Circle diffeomorphisms for periodic (angle) features on ``[-pi, pi)``.

Approach. A transformed angle goes through a *circular rational-quadratic spline*
followed by a rotation:

    x = wrap(f(z) + shift),

where ``f`` is a monotone rational-quadratic spline (Durkan et al., 2019, "Neural
Spline Flows"; circular variant: Rezende et al., 2020, "Normalizing flows on tori
and spheres") with ``K`` bins mapping ``[-pi, pi]`` onto itself with
``f(-pi) = -pi`` and ``f(pi) = pi``:

* knot x-positions and y-positions come from a softmax of ``K`` raw outputs each
  (plus a minimum bin size ``MIN_BIN = 2**-10`` of the period), so bins are
  uniform when the raw outputs are equal;
* the ``K + 1`` knot derivatives are ``MIN_DERIV + (1 - MIN_DERIV) *
  softplus(raw) / softplus(0)`` (``MIN_DERIV = 2**-10``), which is exactly 1 at
  ``raw = 0``; only ``K`` are free, because the derivative at ``+pi`` is set equal
  to the one at ``-pi``. Hence ``f`` joins up smoothly (C^1) across the cut and
  the density ``p(x) = p(z) / f'(z)`` never jumps at ``+-pi``;
* the rotation ``shift`` is a raw conditioner output (any real; only its value
  modulo 2 pi matters), and :func:`bgflow_mini.units.wrap_angle` maps
  back to ``[-pi, pi)``.

With all raw parameters zero, bins are uniform, derivatives are 1 and the shift
is 0, so ``f`` is the identity up to floating-point rounding (~1e-16 relative).
The inverse uses the closed-form root of the rational-quadratic (quadratic
formula); the log-derivative is exact. Rotation and wrapping have derivative 1.

Parameter layout of one angle (last axis, ``3 K + 1`` numbers):
``[widths (K), heights (K), derivatives (K), shift (1)]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..units import wrap_angle

__all__ = ["circular_spline", "n_circular_spline_params", "MIN_BIN", "MIN_DERIV"]

MIN_BIN = 2.0**-10
"""Smallest bin width/height as a fraction of the period 2 pi."""
MIN_DERIV = 2.0**-10
"""Smallest knot derivative of the spline."""
TWO_PI = 2 * math.pi
_DERIV_GAIN = (1.0 - MIN_DERIV) / math.log(2.0)  # softplus(0) = log 2


def n_circular_spline_params(n_bins: int) -> int:
    """Number of raw parameters per angle for ``n_bins`` bins: ``3 * n_bins + 1``."""
    return 3 * n_bins + 1


def _table(raw_wh: Tensor, raw_d: Tensor) -> Tensor:
    """Raw widths and heights ``(..., 2 K)`` and derivatives ``(..., K)`` -> knot table
    ``(..., 3, K + 1)``.

    Rows: x knots and y knots from ``-pi`` to ``pi`` (exact ends; widths and heights are
    ``MIN_BIN + (1 - MIN_BIN K) softmax(raw)`` of the period), and the ``K + 1`` positive
    knot derivatives ``MIN_DERIV + (1 - MIN_DERIV) softplus(raw) / softplus(0)`` whose last
    equals the first. One table, so a single gather finds every per-bin quantity.
    """
    k = raw_d.shape[-1]
    frac = torch.softmax(raw_wh.unflatten(-1, (2, k)), dim=-1).mul(1.0 - MIN_BIN * k).add_(MIN_BIN)
    # knots 2 pi [0, c_0, ..., c_{K-2}, 1] - pi: the ends are exactly -pi and pi
    inner = torch.cumsum(frac, dim=-1)[..., :-1]
    knots = F.pad(F.pad(inner, (1, 0), value=0.0), (0, 1), value=1.0).mul(TWO_PI).sub_(math.pi)
    d = F.softplus(raw_d.index_select(-1, _wrap_index(k, raw_d.device)))
    d = d.mul(_DERIV_GAIN).add_(MIN_DERIV)
    return torch.cat([knots, d.unsqueeze(-2)], dim=-2)


_WRAP_INDEX: dict = {}


def _wrap_index(k: int, device: torch.device) -> Tensor:
    """``[0, 1, ..., k - 1, 0]`` on ``device`` (cached): the derivatives with the first
    repeated at the end."""
    key = (k, str(device))
    if key not in _WRAP_INDEX:
        _WRAP_INDEX[key] = torch.cat([torch.arange(k), torch.zeros(1, dtype=torch.long)]).to(device)
    return _WRAP_INDEX[key]


def _rq_spline(x: Tensor, table: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    """Monotone RQ spline with knot ``table`` ``(..., 3, K + 1)`` (see :func:`_table`).

    ``x``: ``(...)`` inside ``[-pi, pi]``. Returns ``(y, log f'(z))`` where ``z`` is the point
    in the spline's domain (the input if forward, the output if inverse).
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


def circular_spline(x: Tensor, params: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
    """Circular RQ spline plus rotation, applied elementwise to angles.

    Arguments:
        x: angles in radians, shape ``(...)``; wrapped to ``[-pi, pi)`` first.
        params: raw parameters, shape ``(..., 3 K + 1)`` (layout in module docstring).
        inverse: apply the inverse map instead.

    Returns:
        ``(y, logabsdet)``, both of shape ``(...)``: the mapped angles in
        ``[-pi, pi)`` and the elementwise log|dy/dx| of the direction taken.
    """
    p = params.shape[-1]
    if p < 4 or (p - 1) % 3 != 0:
        raise ValueError(f"circular_spline params need 3*K+1 (K >= 1) entries, got {p}")
    if params.shape[:-1] != x.shape:
        raise ValueError(
            f"circular_spline params shape {tuple(params.shape)} does not match "
            f"x shape {tuple(x.shape)} + (3K+1,)"
        )
    k = (p - 1) // 3
    raw_wh, raw_d, shift = params.split([2 * k, k, 1], dim=-1)  # split: one cat backward
    table = _table(raw_wh, raw_d)
    shift = shift.squeeze(-1)
    if inverse:
        z, logderiv = _rq_spline(wrap_angle(x - shift), table, inverse=True)
        return wrap_angle(z), -logderiv
    y, logderiv = _rq_spline(wrap_angle(x), table, inverse=False)
    return wrap_angle(y + shift), logderiv
