"""Energy interface: reduced energies u(x) = U(x)/kT of shape ``(batch,)``."""

from __future__ import annotations

from typing import TypeVar

from torch import Tensor, nn

__all__ = ["Energy"]

_E = TypeVar("_E", bound="Energy")


class Energy(nn.Module):
    """Base class of reduced energies.

    ``energy(x)`` takes ``x`` of shape ``(batch, dim)`` and returns u/kT of shape
    ``(batch,)``. Subclasses implement :meth:`_energy`; :meth:`forward` checks the
    input and output shapes so a mistake fails here with a clear message.

    Energies that hold resources (worker processes, contexts) release them in
    :meth:`close`; every energy is a context manager, ``with energy: ...`` calls
    :meth:`close` on exit. Wrappers forward :meth:`close` to the wrapped energy.

    Arguments:
        dim: number of degrees of freedom (features per configuration).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)

    def close(self) -> None:
        """Release resources such as worker processes (no-op here; idempotent)."""

    def __enter__(self: _E) -> _E:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _energy(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} expects x of shape (batch, {self.dim}), got {shape}"
            )
        u = self._energy(x)
        if u.shape != (x.shape[0],):
            raise ValueError(
                f"{type(self).__name__}._energy returned shape {tuple(u.shape)}, "
                f"expected ({x.shape[0]},)"
            )
        return u
