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
from torch import Tensor

from ..units import wrap_angle
from . import native
from .spline import MIN_BIN, MIN_DERIV, knot_derivatives, knot_positions, rq_spline

__all__ = [
    "circular_spline",
    "circular_spline_torch",
    "n_circular_spline_params",
    "MIN_BIN",
    "MIN_DERIV",
]


def n_circular_spline_params(n_bins: int) -> int:
    """Number of raw parameters per angle for ``n_bins`` bins: ``3 * n_bins + 1``."""
    return 3 * n_bins + 1


def _table(raw_wh: Tensor, raw_d: Tensor) -> Tensor:
    """Raw widths and heights ``(..., 2 K)`` and derivatives ``(..., K)`` -> knot table
    ``(..., 3, K + 1)``.

    Rows: x knots and y knots from ``-pi`` to ``pi`` (:func:`~.spline.knot_positions`) and
    the ``K + 1`` positive knot derivatives (:func:`~.spline.knot_derivatives`) whose last
    equals the first. One table, so a single gather finds every per-bin quantity.
    """
    k = raw_d.shape[-1]
    d = knot_derivatives(raw_d.index_select(-1, _wrap_index(k, raw_d.device)))
    return torch.cat([knot_positions(raw_wh, math.pi), d.unsqueeze(-2)], dim=-2)


_WRAP_INDEX: dict = {}


def _wrap_index(k: int, device: torch.device) -> Tensor:
    """``[0, 1, ..., k - 1, 0]`` on ``device`` (cached): the derivatives with the first
    repeated at the end."""
    key = (k, str(device))
    if key not in _WRAP_INDEX:
        _WRAP_INDEX[key] = torch.cat([torch.arange(k), torch.zeros(1, dtype=torch.long)]).to(device)
    return _WRAP_INDEX[key]


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
    if native.supports(x, params):  # one fused kernel call on the CPU (flows/native.py)
        return native.native_circular_spline(x, params, inverse)
    return circular_spline_torch(x, params, inverse)


def circular_spline_torch(
    x: Tensor, params: Tensor, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """:func:`circular_spline` in PyTorch operations, whatever the device (arguments checked
    by the caller); the reference of the native kernel and its path to higher derivatives."""
    k = (params.shape[-1] - 1) // 3
    raw_wh, raw_d, shift = params.split([2 * k, k, 1], dim=-1)  # split: one cat backward
    table = _table(raw_wh, raw_d)
    shift = shift.squeeze(-1)
    if inverse:
        z, logderiv = rq_spline(wrap_angle(x - shift), table, inverse=True)
        return wrap_angle(z), -logderiv
    y, logderiv = rq_spline(wrap_angle(x), table, inverse=False)
    return wrap_angle(y + shift), logderiv
