"""Diagonal scaling: the last layer of NICE (Dinh et al. 2015).

Additive couplings are volume preserving: a stack of them keeps the prior's distribution
of density values (see :mod:`bgflow_mini.bounds`), so with a fixed prior scale it cannot
match a target of another width. NICE ends with a learnable diagonal scaling
``x = z * exp(s)``, whose log-det ``sum(s)`` is the same for every sample, which gives the
model its volume back. Circular features (angles) are not scaled: a scaled angle would no
longer live on the circle.

References:
    Dinh, Krueger and Bengio, NICE: Non-linear Independent Components Estimation (2015).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Flow, check_batch
from .coupling import as_mask

__all__ = ["Scaling"]


class Scaling(Flow):
    """``x = z * exp(s)`` on the non-circular features, ``s`` learnable, zero at start.

    Arguments:
        dim: number of features.
        circular: bool mask or indices of circular features (left unchanged).

    ``forward(z) -> (x, logdet)`` with ``logdet = sum(s)`` over scaled features, shape
    ``(batch,)``; ``inverse`` divides and returns ``-sum(s)``.
    """

    def __init__(self, dim: int, circular: Sequence[bool] | Sequence[int] | Tensor | None = None):
        super().__init__()
        self.dim = int(dim)
        self.register_buffer("scaled", ~as_mask(circular, self.dim, "circular"))
        self.log_scale = nn.Parameter(torch.zeros(self.dim))

    def _s(self, x: Tensor) -> Tensor:
        return torch.where(self.scaled, self.log_scale, torch.zeros_like(self.log_scale)).to(x)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(z, self.dim, "latent")
        s = self._s(z)
        return z * torch.exp(s), s.sum().expand(z.shape[0])

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(x, self.dim, "data")
        s = self._s(x)
        return x * torch.exp(-s), (-s.sum()).expand(x.shape[0])
