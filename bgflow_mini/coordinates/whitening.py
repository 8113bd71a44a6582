"""Decorrelation of feature blocks: ``x = L z`` on selected features.

Ring atoms placed as Cartesian coordinates in a common frame
(:func:`~bgflow_mini.coordinates.rings.ring_zmatrix`) are strongly correlated: a
stiff ring bond is a difference of two atoms' coordinates. After per-feature
standardisation, :class:`Whiten` maps independent unit latents onto the data's
correlation structure with the Cholesky factor ``L`` of each block's correlation
matrix, so a flow that starts near the identity already reproduces the ring's
covariance, and every ring bond's spread is right from the first step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..flows.base import Flow, check_batch

__all__ = ["Whiten", "cartesian_blocks"]


class Whiten(Flow):
    """``forward(z)``: ``x[:, idx] = z[:, idx] @ L.T`` (other features pass through).

    Arguments:
        dim: number of features.
        idx: long ``(k,)``, the whitened features.
        chol: ``(k, k)`` lower-triangular with a positive diagonal (block-diagonal in
            practice: one block per ring system).

    ``logdet = sum log diag(L)`` (forward), its negative for ``inverse``.
    """

    def __init__(self, dim: int, idx: Sequence[int] | Tensor, chol: Tensor) -> None:
        super().__init__()
        self.dim = int(dim)
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        chol = torch.as_tensor(chol)
        k = idx.numel()
        if chol.shape != (k, k):
            raise ValueError(f"chol must have shape ({k}, {k}), got {tuple(chol.shape)}")
        if k and (idx.min() < 0 or idx.max() >= self.dim or idx.unique().numel() != k):
            raise ValueError(f"idx must hold distinct feature indices in [0, {self.dim})")
        if not torch.equal(chol, torch.tril(chol)) or not (torch.diagonal(chol) > 0).all():
            raise ValueError("chol must be lower-triangular with a positive diagonal")
        self.register_buffer("idx", idx)
        self.register_buffer("chol", chol.clone())

    @classmethod
    def from_data(
        cls, data: Tensor, blocks: Sequence[Sequence[int]], jitter: float = 1e-6
    ) -> Whiten:
        """Cholesky factors of each block's correlation matrix in ``data`` ``(n, dim)``
        (standardised features), with ``jitter`` added to the diagonal."""
        check_batch(data, None, "data")
        d = data.detach()
        idx = [int(i) for b in blocks for i in b]
        chol = torch.zeros(len(idx), len(idx), dtype=d.dtype, device=d.device)
        start = 0
        for b in blocks:
            cols = torch.as_tensor(list(b), dtype=torch.long, device=d.device)
            v = d[:, cols] - d[:, cols].mean(0)
            cov = v.T @ v / max(len(d) - 1, 1)
            sd = cov.diagonal().clamp_min(1e-12).sqrt()
            corr = cov / sd[:, None] / sd[None, :]
            eye = torch.eye(len(cols), dtype=d.dtype, device=d.device)
            stop = start + len(cols)
            chol[start:stop, start:stop] = torch.linalg.cholesky(
                (corr + jitter * eye) / (1 + jitter)
            )
            start = stop
        return cls(data.shape[1], idx, chol)

    def _logdet(self, x: Tensor) -> Tensor:
        return torch.log(torch.diagonal(self.chol)).sum().to(x).expand(x.shape[0])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(z, self.dim, "latent")
        x = z.clone()
        x[:, self.idx] = z[:, self.idx] @ self.chol.to(z).T
        return x, self._logdet(z)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(x, self.dim, "data")
        z = x.clone()
        sol = torch.linalg.solve_triangular(self.chol.to(x), x[:, self.idx].T, upper=False)
        z[:, self.idx] = sol.T
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
    for row in range(3, n):
        if bool(internal.cartesian_rows[row]):
            cols = [row - 1, n - 1 + row - 2, 2 * n - 3 + row - 3]
            frame = tuple(int(r) for r in z[row, 1:])
            if frame not in groups:
                r0, r1, q = frame
                head: list[int] = []
                i1 = row_of[r1]
                if i1 >= 1 and z[i1, 1] == r0:
                    head.append(i1 - 1)
                iq = row_of[q]
                if iq >= 2 and {int(z[iq, 1]), int(z[iq, 2])} <= {r0, r1}:
                    head += [iq - 1, n - 1 + iq - 2]
                groups[frame] = head
            groups[frame].extend(cols)
    return list(groups.values())
