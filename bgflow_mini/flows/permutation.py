"""Fixed feature permutations as flows (volume preserving, logdet 0)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Flow, check_batch

__all__ = ["Permutation"]


class Permutation(Flow):
    """Reorder features: ``forward(z)[:, i] = z[:, indices[i]]``; logdet 0.

    Arguments:
        indices: a permutation of ``0 .. dim-1`` (sequence of ints or 1-D tensor).

    Use the constructors :meth:`swap`, :meth:`reverse` and :meth:`random` for the
    common cases. Note: permuting moves circular (angle) features to new
    positions; coupling layers with circular masks should use masks instead.
    """

    def __init__(self, indices: Sequence[int] | Tensor) -> None:
        super().__init__()
        idx = torch.as_tensor(indices)
        if idx.ndim != 1 or idx.numel() < 1:
            raise ValueError(f"Permutation indices must be a non-empty 1-D sequence, got {indices}")
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise ValueError(f"Permutation indices must be integers, got dtype {idx.dtype}")
        idx = idx.long()
        dim = idx.numel()
        if not torch.equal(torch.sort(idx).values, torch.arange(dim)):
            raise ValueError(
                f"Permutation indices must be a permutation of 0..{dim - 1}, got {idx.tolist()}"
            )
        self.dim = dim
        self.register_buffer("indices", idx)
        self.register_buffer("inverse_indices", torch.argsort(idx))

    @classmethod
    def swap(cls, dim: int) -> Permutation:
        """Swap halves: the last ``dim - dim // 2`` features move to the front."""
        _check_dim(dim)
        h = dim // 2
        return cls(torch.cat([torch.arange(h, dim), torch.arange(0, h)]))

    @classmethod
    def reverse(cls, dim: int) -> Permutation:
        """Reverse the feature order."""
        _check_dim(dim)
        return cls(torch.arange(dim - 1, -1, -1))

    @classmethod
    def random(cls, dim: int, seed: int | None = None) -> Permutation:
        """A random permutation; reproducible for a given ``seed`` (global RNG if None)."""
        _check_dim(dim)
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(int(seed))
        return cls(torch.randperm(dim, generator=gen))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(z, self.dim, "Permutation input")
        return z[:, self.indices], z.new_zeros(z.shape[0])

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(x, self.dim, "Permutation input")
        return x[:, self.inverse_indices], x.new_zeros(x.shape[0])

    def extra_repr(self) -> str:
        return f"indices={self.indices.tolist()}"


def _check_dim(dim: int) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"Permutation dim must be a positive int, got {dim!r}")
