"""Bonds and angles onto the real line: ``r = exp(b)``, ``theta = pi * sigmoid(a)``.

Internal coordinates have domains: bonds ``r > 0`` and angles ``theta`` in ``(0, pi)``. A
flow on standardised bonds and angles can leave them (a negative bond, an angle beyond pi),
which maximum likelihood on MD data rarely does but reverse KL from the energy alone does
(see BENCHMARKS.md). :class:`DomainMap` makes leaving impossible: the flow works on
``b = log r`` and ``a = logit(theta / pi)``, and this layer maps back, with its exact
log-det. Torsions pass through.

A bounded domain is not a bounded latent: ``log r`` and ``logit(theta / pi)`` still range
over the real line, and so do whitened ring coordinates
(:mod:`~bgflow_mini.coordinates.rings`). Reverse KL from the energy alone, at a high
temperature and on a regularised energy (:class:`~bgflow_mini.energies.LinLogCut` grows
only logarithmically above its threshold), can then buy entropy without limit: seen on
the phenylalanine dipeptide (a loss of -1,000 kT after 200 steps, then non-finite
gradients) and on the alanine tetrapeptide (infinite positions within 30 steps).
:class:`SoftBox` bounds such features, ``x = c tanh(z / c)``, with half-widths ``c`` well
beyond the training data (:meth:`SoftBox.from_data`): near the identity where the data
are, smooth and exactly invertible, and no latent can leave the box
(``ic_transform(bounded="box")``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..flows.base import Flow, check_batch, feature_index

__all__ = ["DomainMap", "SoftBox"]


class DomainMap(Flow):
    """``forward``: unconstrained ``(b, a)`` -> ``(r, theta) = (exp b, pi sigmoid a)``.

    Arguments:
        dim: number of internal coordinates ``3N - 6``.
        bonds, angles: bool masks ``(dim,)`` of the bond and angle features.

    ``forward(z) -> (ics, logdet)`` with ``logdet = sum b + sum log(pi sigmoid(a)
    sigmoid(-a))``; ``inverse(ics) -> (z, -logdet)``. Inputs outside the domain (bond
    <= 0, angle outside (0, pi)) give non-finite latents in ``inverse``.
    """

    def __init__(self, dim: int, bonds: Tensor, angles: Tensor) -> None:
        super().__init__()
        self.dim = int(dim)
        self.register_buffer("bonds", torch.as_tensor(bonds, dtype=torch.bool).clone())
        self.register_buffer("angles", torch.as_tensor(angles, dtype=torch.bool).clone())
        if self.bonds.shape != (self.dim,) or self.angles.shape != (self.dim,):
            raise ValueError(f"bonds and angles must be bool masks of shape ({self.dim},)")
        if (self.bonds & self.angles).any():
            raise ValueError("a feature cannot be both a bond and an angle")

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(z, self.dim, "latent")
        zero = torch.zeros_like(z)
        zb = torch.where(self.bonds, z, zero)  # masked first: no inf in unused branches
        za = torch.where(self.angles, z, zero)
        theta = math.pi * torch.sigmoid(za)
        x = torch.where(self.bonds, torch.exp(zb), torch.where(self.angles, theta, z))
        log_theta = math.log(math.pi) + F.logsigmoid(za) + F.logsigmoid(-za)
        ld = torch.where(self.bonds, zb, torch.where(self.angles, log_theta, zero))
        return x, ld.sum(-1)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(x, self.dim, "internal coordinates")
        one = torch.ones_like(x)
        b = torch.log(torch.where(self.bonds, x, one))
        p = torch.where(self.angles, x / math.pi, 0.5 * one)
        a = torch.log(p) - torch.log1p(-p)
        z = torch.where(self.bonds, b, torch.where(self.angles, a, x))
        return z, -self.forward(z)[1]


class SoftBox(Flow):
    """``forward``: ``x[:, idx] = c * tanh(z[:, idx] / c)``; other features pass through.

    Arguments:
        dim: number of features.
        idx: long ``(k,)``, the bounded features.
        half_width: ``(k,)`` positive half-widths ``c`` (in the features' units; whitened
            ring coordinates: data standard deviations).

    ``forward(z) -> (x, logdet)`` with ``logdet = sum log(1 - tanh(z / c)^2)``: the map is
    near the identity for ``|z| << c`` and ``|x| < c`` for every latent.
    ``inverse(x) -> (z, -logdet)``: inputs with ``|x| >= c`` give non-finite latents.
    """

    def __init__(self, dim: int, idx, half_width) -> None:
        super().__init__()
        self.dim = int(dim)
        idx = feature_index(idx, self.dim)
        c = torch.as_tensor(half_width)
        if not c.is_floating_point():
            c = c.double()
        c = c.reshape(-1).clone()
        if c.shape != idx.shape:
            raise ValueError(f"half_width must have shape ({idx.numel()},), got {tuple(c.shape)}")
        if not bool(torch.all(c > 0)) or not bool(torch.isfinite(c).all()):
            raise ValueError("half_width must be positive and finite")
        self.register_buffer("idx", idx)
        self.register_buffer("half_width", c)

    @classmethod
    def from_data(
        cls, data: Tensor, idx, margin: float = 1.5, min_half_width: float = 6.0
    ) -> SoftBox:
        """Half-widths ``max(margin * max |data[:, idx]|, min_half_width)`` per feature, from
        ``data`` ``(n, dim)`` in the layer's output space (the IC transform's latent of
        the training frames)."""
        check_batch(data, None, "data")
        if margin <= 1 or min_half_width <= 0:
            raise ValueError(
                f"need margin > 1 and min_half_width > 0, got {margin}, {min_half_width}"
            )
        idx = torch.as_tensor(idx, dtype=torch.long, device=data.device).reshape(-1)
        peak = data.detach()[:, idx].abs().amax(0)
        return cls(data.shape[1], idx.cpu(), (margin * peak).clamp_min(min_half_width).cpu())

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(z, self.dim, "latent")
        c = self.half_width.to(z)
        u = z[:, self.idx] / c
        x = z.clone()
        x[:, self.idx] = c * torch.tanh(u)
        # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|
        ld = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
        return x, ld.sum(-1)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(x, self.dim, "data")
        c = self.half_width.to(x)
        y = x[:, self.idx] / c
        z = x.clone()
        z[:, self.idx] = c * torch.atanh(y)
        return z, -torch.log1p(-y * y).sum(-1)
