"""Bonds and angles onto the real line: ``r = exp(b)``, ``theta = pi * sigmoid(a)``.

Internal coordinates have domains: bonds ``r > 0`` and angles ``theta`` in ``(0, pi)``. A
flow on standardised bonds and angles can leave them (a negative bond, an angle beyond pi),
which maximum likelihood on MD data rarely does but reverse KL from the energy alone does
(see BENCHMARKS.md). :class:`DomainMap` makes leaving impossible: the flow works on
``b = log r`` and ``a = logit(theta / pi)``, and this layer maps back, with its exact
log-det. Torsions pass through. Ring atoms placed by Cartesian coordinates
(:mod:`~bgflow_mini.coordinates.rings`) have no domain and stay unbounded: extreme
latents can still squeeze two ring atoms together (the energy rejects such samples).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..flows.base import Flow, check_batch

__all__ = ["DomainMap"]


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
