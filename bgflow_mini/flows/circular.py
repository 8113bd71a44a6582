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


def n_circular_spline_params(n_bins: int) -> int:
    """Number of raw parameters per angle for ``n_bins`` bins: ``3 * n_bins + 1``."""
    return 3 * n_bins + 1


def _knots(raw: Tensor) -> Tensor:
    """Raw ``(..., K)`` -> knot positions ``(..., K + 1)`` from ``-pi`` to ``pi`` (exact ends)."""
    k = raw.shape[-1]
    frac = MIN_BIN + (1.0 - MIN_BIN * k) * torch.softmax(raw.contiguous(), dim=-1)
    inner = -math.pi + 2 * math.pi * torch.cumsum(frac, dim=-1)[..., :-1]
    lo = torch.full_like(raw[..., :1], -math.pi)
    hi = torch.full_like(raw[..., :1], math.pi)
    return torch.cat([lo, inner, hi], dim=-1)


def _derivatives(raw: Tensor) -> Tensor:
    """Raw ``(..., K)`` -> positive knot derivatives ``(..., K + 1)``, last equal to first."""
    d = MIN_DERIV + (1.0 - MIN_DERIV) * F.softplus(raw) / math.log(2.0)  # softplus(0)
    return torch.cat([d, d[..., :1]], dim=-1)


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    return t.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def _rq_spline(
    x: Tensor, xk: Tensor, yk: Tensor, dk: Tensor, inverse: bool
) -> tuple[Tensor, Tensor]:
    """Monotone RQ spline through knots ``(xk, yk)`` with derivatives ``dk``.

    ``x``: ``(...)`` inside ``[xk[0], xk[-1]]`` (or ``yk`` range if inverse);
    knots ``(..., K + 1)``. Returns ``(y, log f'(z))`` where ``z`` is the point in
    the spline's domain (the input if forward, the output if inverse).
    """
    search = yk if inverse else xk
    idx = (x.unsqueeze(-1) >= search[..., 1:-1]).sum(dim=-1)
    x_lo, x_hi = _gather(xk, idx), _gather(xk, idx + 1)
    y_lo, y_hi = _gather(yk, idx), _gather(yk, idx + 1)
    d_lo, d_hi = _gather(dk, idx), _gather(dk, idx + 1)
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
    t = xi * (1 - xi)
    denom = s + delta * t
    if not inverse:
        # y = y_lo + h * [s xi^2 + d_lo t] / denom, written as a linear part plus
        # a correction that vanishes exactly when s == d_lo == d_hi.
        out = y_lo + h * xi + h * t * ((d_lo - s) - delta * xi) / denom
    num = d_hi * xi * xi + 2 * s * t + d_lo * (1 - xi) * (1 - xi)
    logderiv = 2 * torch.log(s) + torch.log(num) - 2 * torch.log(denom)
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
    xk = _knots(params[..., :k])
    yk = _knots(params[..., k : 2 * k])
    dk = _derivatives(params[..., 2 * k : 3 * k])
    shift = params[..., 3 * k]
    if inverse:
        z, logderiv = _rq_spline(wrap_angle(x - shift), xk, yk, dk, inverse=True)
        return wrap_angle(z), -logderiv
    y, logderiv = _rq_spline(wrap_angle(x), xk, yk, dk, inverse=False)
    return wrap_angle(y + shift), logderiv
