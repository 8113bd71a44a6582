"""Decorrelation of feature blocks: ``x = A z`` on selected features.

Ring atoms placed as Cartesian coordinates in a common frame
(:func:`~bgflow_mini.coordinates.rings.ring_zmatrix`) are strongly correlated: a
stiff ring bond is a difference of two atoms' coordinates. After per-feature
standardisation, :class:`Whiten` maps independent unit latents onto the data's
correlation structure by its principal axes, ``A = V diag(sqrt(lambda))`` for the
eigen-decomposition ``C = V diag(lambda) V^T`` of each block's correlation matrix. A
flow that starts near the identity then already reproduces the ring's covariance, and
a soft collective motion (a proline ring's pucker flip) lies along one latent
coordinate instead of being spread over all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..flows.base import Flow, check_batch, feature_index
from .internal import feature_columns

__all__ = ["Whiten", "cartesian_blocks"]


class Whiten(Flow):
    """``forward(z)``: ``x[:, idx] = z[:, idx] @ A.T`` (other features pass through).

    Arguments:
        dim: number of features.
        idx: long ``(k,)``, the whitened features.
        matrix: invertible ``(k, k)`` matrix ``A`` (block-diagonal in practice: one block
            per ring system); its inverse is computed once, in float64.

    ``logdet = log|det A|`` (forward), its negative for ``inverse``.
    """

    def __init__(self, dim: int, idx: Sequence[int] | Tensor, matrix: Tensor) -> None:
        super().__init__()
        self.dim = int(dim)
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        a = torch.as_tensor(matrix)
        k = idx.numel()
        if a.shape != (k, k):
            raise ValueError(f"matrix must have shape ({k}, {k}), got {tuple(a.shape)}")
        idx = feature_index(idx, self.dim)
        sign, logabs = torch.linalg.slogdet(a.double())
        if k and (sign == 0 or not torch.isfinite(logabs)):
            raise ValueError("matrix must be invertible")
        self.register_buffer("idx", idx)
        self.register_buffer("matrix", a.clone())
        self.register_buffer("inverse_matrix", torch.linalg.inv(a.double()).to(a.dtype))
        self.register_buffer("log_abs_det", logabs.to(a.dtype) if k else a.new_zeros(()))

    @classmethod
    def from_data(
        cls, data: Tensor, blocks: Sequence[Sequence[int]], jitter: float = 1e-6
    ) -> Whiten:
        """Principal axes of each block's correlation matrix in ``data`` ``(n, dim)``
        (standardised features); eigenvalues below ``jitter`` are raised to it."""
        check_batch(data, None, "data")
        d = data.detach()
        idx = [int(i) for b in blocks for i in b]
        a = torch.zeros(len(idx), len(idx), dtype=d.dtype, device=d.device)
        start = 0
        for b in blocks:
            cols = torch.as_tensor(list(b), dtype=torch.long, device=d.device)
            v = d[:, cols] - d[:, cols].mean(0)
            cov = v.T @ v / max(len(d) - 1, 1)
            sd = cov.diagonal().clamp_min(1e-12).sqrt()
            corr = cov / sd[:, None] / sd[None, :]
            corr.fill_diagonal_(1.0)  # a constant feature: unit variance, uncorrelated
            lam, vec = torch.linalg.eigh(corr)
            stop = start + len(cols)
            a[start:stop, start:stop] = vec * lam.clamp_min(jitter).sqrt()
            start = stop
        return cls(data.shape[1], idx, a)

    def _logdet(self, x: Tensor) -> Tensor:
        return self.log_abs_det.to(x).expand(x.shape[0])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(z, self.dim, "latent")
        x = z.clone()
        x[:, self.idx] = z[:, self.idx] @ self.matrix.to(z).T
        return x, self._logdet(z)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(x, self.dim, "data")
        z = x.clone()
        z[:, self.idx] = x[:, self.idx] @ self.inverse_matrix.to(x).T
        return z, -self._logdet(x)


def cartesian_blocks(internal) -> list[list[int]]:
    """Feature indices whitened together, one list per ring frame ``(r0, r1, q)``.

    Each block holds the features of the Cartesian rows placed in that frame, plus the
    internal coordinates that fix the frame atoms relative to each other: the bond of
    ``r1``'s row when it is ``r1-r0``, and the bond and angle of ``q``'s row when both
    its references are ``r0``/``r1`` (then ``q`` is in the ring). Ring bonds to ``r1`` or
    ``q`` depend on those too. Empty without Cartesian rows.
    """
    z = internal.zmatrix.cpu().numpy()
    n = len(z)
    row_of = {int(a): i for i, a in enumerate(z[:, 0])}
    groups: dict[tuple[int, ...], list[int]] = {}
    for row in np.flatnonzero(internal.cartesian_rows.cpu().numpy()):
        frame = tuple(int(r) for r in z[row, 1:])
        if frame not in groups:
            r0, r1, q = frame
            head: list[int] = []
            i1 = row_of[r1]
            if i1 >= 1 and z[i1, 1] == r0:
                head.append(i1 - 1)  # the bond of r1's row
            iq = row_of[q]
            if iq >= 2 and {int(z[iq, 1]), int(z[iq, 2])} <= {r0, r1}:
                head += [iq - 1, n - 1 + iq - 2]  # the bond and angle of q's row
            groups[frame] = head
        groups[frame].extend(int(c) for c in feature_columns([row], n)[0])
    return list(groups.values())
