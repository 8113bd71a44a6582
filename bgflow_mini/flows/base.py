"""Flow interface and composition.

Direction convention (used everywhere in bgflow_mini):

* ``flow(z) -> (x, logdet)`` maps latent to data,
* ``flow.inverse(x) -> (z, logdet)`` maps data back to latent,

where ``logdet`` is log|det J| of the direction taken, shape ``(batch,)``, and
tensors are ``(batch, dim)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Flow", "Sequential", "Inverse", "check_batch", "feature_index"]


def check_batch(x: Tensor, dim: int | None = None, name: str = "input") -> None:
    """Raise ``ValueError`` unless ``x`` is a floating tensor of shape ``(batch, dim)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, dim), got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has {x.shape[1]} features, expected dim={dim}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def feature_index(idx, dim: int) -> Tensor:
    """``idx`` as a 1-D long tensor; ``ValueError`` unless its entries are distinct feature
    indices in ``[0, dim)`` (an empty index is allowed)."""
    t = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    if t.numel() and (t.min() < 0 or t.max() >= dim or t.unique().numel() != t.numel()):
        raise ValueError(f"idx must hold distinct feature indices in [0, {dim})")
    return t


class Flow(nn.Module):
    """Base class of invertible maps with exact log|det J|.

    Subclasses implement :meth:`forward` (latent -> data) and :meth:`inverse`
    (data -> latent); both return ``(outputs, logdet)`` with ``logdet`` of shape
    ``(batch,)``.
    """

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class Sequential(Flow):
    """Composition ``flows[-1] o ... o flows[0]`` in the forward (latent -> data) direction.

    Arguments:
        flows: the flows, applied in order by :meth:`forward` and in reverse order
            by :meth:`inverse`; log-dets add up.
    """

    def __init__(self, *flows: Flow) -> None:
        super().__init__()
        for f in flows:
            if not isinstance(f, Flow):
                raise TypeError(f"Sequential takes Flow objects, got {type(f).__name__}")
        self.flows = nn.ModuleList(flows)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        logdet = None
        for f in self.flows:
            z, ld = f(z)
            logdet = ld if logdet is None else logdet + ld
        return z, (z.new_zeros(z.shape[0]) if logdet is None else logdet)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = None
        for f in reversed(self.flows):
            x, ld = f.inverse(x)
            logdet = ld if logdet is None else logdet + ld
        return x, (x.new_zeros(x.shape[0]) if logdet is None else logdet)

    def __len__(self) -> int:
        return len(self.flows)

    def __getitem__(self, i: int) -> Flow:
        return self.flows[i]


class Inverse(Flow):
    """The inverse of a flow: ``Inverse(f)(x) == f.inverse(x)`` and vice versa."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow.inverse(z)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow(x)
