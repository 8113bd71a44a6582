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

    The wrapped energy is evaluated exactly once per call. Rows whose output is the cap
    (non-finite energy or energy ``>= max``) get the cap value and zero gradient; when
    gradients are tracked, a hook on the input seen by the wrapped energy zeroes the
    gradient rows of those samples, so a NaN/inf from the wrapped energy's backward
    cannot poison the gradients of the other rows. It also zeroes every non-finite
    gradient entry of the other rows: a finite energy can still have a gradient that
    overflows (two atoms nearly on top of each other in float32: seen on the alanine
    tetrapeptide, an energy of 1.8e7 kT with an inf/NaN force), and one such sample would
    make the whole step's gradient NaN. This relies on rows being independent
    (true of every energy in this package); gradients of *parameters* of the wrapped
    energy are not protected.

    Arguments:
        energy: any :class:`Energy`; the wrapper has the same ``dim``.
        high: threshold (kT) above which energies are compressed logarithmically.
        max: energies at or above this (kT), and non-finite ones, are set to the cap.
        track_stats: count inputs (see :attr:`stats` and :attr:`last_stats`); reset with
            :meth:`reset_stats`.

    Attributes:
        n_evaluated, n_nonfinite, n_capped: cumulative counters (ints) of rows
            evaluated, non-finite (NaN/inf) energies, and finite energies above ``high``
            (values changed by the regularisation, including those ``>= max``).
            ``n_above_high`` is an alias of ``n_capped``. Counting itself reads nothing
            back from the device; reading ``n_nonfinite`` / ``n_capped`` / ``stats`` does.
        last_stats: ``{"evaluated", "nonfinite", "capped"}`` of the most recent call
            (zeros before the first tracked call); ``evaluated`` is an int, the other two
            are 0-d integer tensors on the energy's device (``int()`` reads them).
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

    @property
    def base(self) -> Energy:
        """The wrapped (real) energy, unwrapping nested wrappers that define ``base``."""
        return getattr(self.energy, "base", self.energy)

    def close(self) -> None:
        """Close the wrapped energy (e.g. stop its worker processes)."""
        self.energy.close()

    def reset_stats(self) -> None:
        """Set the cumulative counters and :attr:`last_stats` to zero."""
        self.n_evaluated = 0
        self._nonfinite: Tensor | int = 0  # device tensors once counted (no host reads)
        self._capped: Tensor | int = 0
        self.last_stats = {"evaluated": 0, "nonfinite": 0, "capped": 0}

    @property
    def n_nonfinite(self) -> int:
        """Non-finite energies so far (reads the device counter)."""
        return int(self._nonfinite)

    @property
    def n_capped(self) -> int:
        """Finite energies above ``high`` so far (reads the device counter)."""
        return int(self._capped)

    @property
    def n_above_high(self) -> int:
        """Alias of :attr:`n_capped` (finite energies above ``high``)."""
        return self.n_capped

    @property
    def stats(self) -> dict[str, int]:
        """Cumulative counters as a dict: evaluated, nonfinite, capped."""
        return {
            "evaluated": self.n_evaluated,
            "nonfinite": self.n_nonfinite,
            "capped": self.n_capped,
        }

    def _energy(self, x: Tensor) -> Tensor:
        track_grad = torch.is_grad_enabled() and x.requires_grad
        # a view of x private to this call: the hook then acts only on the gradient that
        # flows through the wrapped energy, not on other uses of x, and dies with the graph
        xe = x.view_as(x) if track_grad else x
        u = self.energy(xe)
        nonfinite = ~torch.isfinite(u)
        if self.track_stats:
            ud = u.detach()
            last = {
                "evaluated": int(u.shape[0]),
                "nonfinite": nonfinite.sum(),
                "capped": (torch.isfinite(ud) & (ud > self.high)).sum(),
            }
            self.last_stats = last
            self.n_evaluated += last["evaluated"]
            self._nonfinite = self._nonfinite + last["nonfinite"]
            self._capped = self._capped + last["capped"]
        if track_grad:
            # rows whose output is the cap have zero gradient; zero them explicitly so that
            # 0 * inf = NaN inside the wrapped energy's backward does not reach x
            rows = (nonfinite | (u.detach() >= self.max)).unsqueeze(-1)
            xe.register_hook(lambda g: g.masked_fill(rows | ~torch.isfinite(g), 0.0))
        return linlogcut(u, self.high, self.max)
