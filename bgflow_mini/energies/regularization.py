"""High-energy regularisation: linear below a threshold, logarithmic above, capped.

Training a Boltzmann generator by energy (reverse KL) meets configurations with
astronomically high (or non-finite) energies early on; :func:`linlogcut` keeps their
values and gradients bounded while leaving the physically relevant range untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Energy

__all__ = ["linlogcut", "LinLogCut"]


def linlogcut(u: Tensor, high: float = 1e3, max: float = 1e9) -> Tensor:
    """Soft cut of reduced energies ``u`` (any shape, kT).

    * ``u <= high``: identity;
    * ``high < u < max``: ``high + log(1 + u - high)`` (continuous, slope 1 at ``high``);
    * ``u >= max`` and every non-finite value (NaN, +inf, -inf): the cap
      ``high + log(1 + max - high)`` (about ``high + 20.7`` for the defaults), with zero
      gradient.

    Gradients with respect to ``u`` are finite everywhere (including at NaN/inf inputs,
    where they are zero). The result is monotone non-decreasing in ``u``.
    """
    high, max_ = float(high), float(max)
    if not high < max_:
        raise ValueError(f"need high < max, got high={high}, max={max_}")
    ok = torch.isfinite(u) & (u < max_)
    # ``where`` routes zero gradient to the unselected branch, so NaN/inf never reach log1p
    capped = torch.where(ok, u, torch.full_like(u, max_))
    excess = (capped - high).clamp_min(0.0)
    return torch.where(capped > high, high + torch.log1p(excess), capped)


class LinLogCut(Energy):
    """Energy wrapper applying :func:`linlogcut` to ``energy(x)``.

    Rows whose energy is non-finite are re-evaluated without them when gradients are
    being tracked, so a NaN/inf energy of one sample cannot poison the gradients of the
    others (the bad rows get the cap value and zero gradient).

    Arguments:
        energy: any :class:`Energy`; the wrapper has the same ``dim``.
        high: threshold (kT) above which energies are compressed logarithmically.
        max: energies at or above this (kT), and non-finite ones, are set to the cap.
        track_stats: count inputs in :attr:`n_evaluated`, :attr:`n_nonfinite` (NaN/inf
            energies) and :attr:`n_above_high` (finite energies above ``high``); reset
            with :meth:`reset_stats`. Counting reads scalars back from the device.
    """

    def __init__(
        self,
        energy: Energy,
        high: float = 1e3,
        max: float = 1e9,
        track_stats: bool = True,
    ) -> None:
        super().__init__(energy.dim)
        if not float(high) < float(max):
            raise ValueError(f"need high < max, got high={high}, max={max}")
        self.energy = energy
        self.high, self.max = float(high), float(max)
        self.track_stats = bool(track_stats)
        self.reset_stats()

    def reset_stats(self) -> None:
        """Set the counters to zero."""
        self.n_evaluated = 0
        self.n_nonfinite = 0
        self.n_above_high = 0

    @property
    def stats(self) -> dict[str, int]:
        """Counters as a dict: evaluated, nonfinite, above_high."""
        return {
            "evaluated": self.n_evaluated,
            "nonfinite": self.n_nonfinite,
            "above_high": self.n_above_high,
        }

    def _energy(self, x: Tensor) -> Tensor:
        u = self.energy(x)
        bad = ~torch.isfinite(u)
        n_bad = int(bad.sum()) if (self.track_stats or u.requires_grad) else 0
        if n_bad and u.requires_grad:
            good = torch.nonzero(~bad).squeeze(1)
            u_clean = torch.full_like(u.detach(), float("nan"))
            if good.numel():
                u_clean = u_clean.index_put((good,), self.energy(x[good]))
            else:  # keep the (all-capped) output attached to x, with zero gradient
                u_clean = u_clean + 0.0 * x.sum()
            u = u_clean
        if self.track_stats:
            self.n_evaluated += int(u.shape[0])
            self.n_nonfinite += n_bad
            self.n_above_high += int(((u.detach() > self.high) & ~bad).sum())
        return linlogcut(u, self.high, self.max)
