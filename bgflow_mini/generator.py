"""The Boltzmann generator: a prior, a flow and a target energy.

Samples are drawn as ``z ~ prior``, ``x, logdet = flow(z)``, so the model density is
``log q(x) = log p_prior(z) - logdet``. Importance weights towards the Boltzmann
distribution ``p(x) ∝ exp(-u(x))`` (``u`` in kT) are ``log w = -u(x) - log q(x)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .flows.base import Flow, check_batch

__all__ = ["BoltzmannGenerator", "check_energy_output"]


def check_energy_output(u: Tensor, x: Tensor, name: str = "energy") -> Tensor:
    """Check that an energy returned reduced energies of shape ``(batch,)`` for ``x``."""
    if not isinstance(u, Tensor):
        raise TypeError(f"{name} must return a torch.Tensor, got {type(u).__name__}")
    if u.shape != (x.shape[0],):
        raise ValueError(
            f"{name} returned shape {tuple(u.shape)} for input of shape {tuple(x.shape)}; "
            f"expected reduced energies of shape ({x.shape[0]},)"
        )
    return u


class BoltzmannGenerator(nn.Module):
    """Prior + flow (+ target energy) with sampling, density and importance weights.

    Arguments:
        prior: a distribution module with ``sample(n, temperature=1.0) -> (n, dim)``,
            ``log_prob(z) -> (n,)`` and a ``dim`` attribute.
        flow: a :class:`~bgflow_mini.flows.Flow` mapping latent ``z`` to data ``x``.
        energy: optional callable mapping ``(batch, dim_x)`` to reduced energies u/kT
            of shape ``(batch,)``; needed for :meth:`log_weights` and reverse KL.

    Example:
        >>> from bgflow_mini import BoltzmannGenerator, StandardNormal
        >>> from bgflow_mini.flows import coupling_flow
        >>> from bgflow_mini.energies import DoubleWell
        >>> bg = BoltzmannGenerator(StandardNormal(2), coupling_flow(2, 4), DoubleWell())
        >>> x, log_q = bg.sample(128, with_log_prob=True)
        >>> log_w = bg.log_weights(x, log_q)
    """

    def __init__(
        self, prior: nn.Module, flow: Flow, energy: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        super().__init__()
        if not isinstance(flow, Flow):
            raise TypeError(f"flow must be a bgflow_mini Flow, got {type(flow).__name__}")
        for attr in ("sample", "log_prob"):
            if not callable(getattr(prior, attr, None)):
                raise TypeError(f"prior must have a callable .{attr}()")
        self.prior = prior
        self.flow = flow
        self.energy = energy
        # how to rebuild this model without its data (see bgflow_mini.checkpoint); set by
        # the builders in bgflow_mini.pipeline / bgflow_mini.targets
        self.spec: dict = {}

    # The energy is kept out of the module tree so that state dicts (checkpoints) hold
    # only the model: a checkpoint trained with one energy backend loads with another.
    # ``.to()``/``.double()``/``.cuda()`` still move an energy that is an ``nn.Module``.
    @property
    def energy(self) -> Callable[[Tensor], Tensor] | None:
        """The target reduced energy (not part of :meth:`state_dict`)."""
        return self.__dict__["_energy"]

    def __setattr__(self, name: str, value) -> None:
        if name == "energy":  # bypass nn.Module registration, see above
            if value is not None and not callable(value):
                raise TypeError(f"energy must be callable, got {type(value).__name__}")
            self.__dict__["_energy"] = value
        else:
            super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if isinstance(self.energy, nn.Module):
            self.energy._apply(fn)
        return self

    @property
    def dim(self) -> int:
        """Number of latent features (equal to the data features for square flows)."""
        return int(self.prior.dim)

    def sample(
        self, n: int, temperature: float = 1.0, with_log_prob: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Draw ``n`` samples ``x`` of shape ``(n, dim_x)``.

        With ``with_log_prob=True`` also return ``log q_T(x)`` of shape ``(n,)``: the
        density of the distribution actually sampled (the prior at ``temperature``
        pushed through the flow), so ``-u - log q_T`` are valid importance weights.
        """
        if int(n) < 1:
            raise ValueError(f"n must be a positive integer, got {n}")
        z = self.prior.sample(int(n), temperature=temperature)
        x, logdet = self.flow(z)
        if not with_log_prob:
            return x
        return x, self.prior.log_prob(z, temperature=temperature) - logdet

    def log_prob(self, x: Tensor) -> Tensor:
        """Model log-density ``log q(x)`` of data ``x`` ``(batch, dim_x)`` -> ``(batch,)``."""
        check_batch(x, name="x")
        z, logdet = self.flow.inverse(x)
        return self.prior.log_prob(z) + logdet

    def reduced_energy(self, x: Tensor) -> Tensor:
        """Target reduced energy u(x)/kT ``(batch,)``, with its shape checked."""
        if self.energy is None:
            raise RuntimeError("this BoltzmannGenerator has no energy; pass energy=...")
        return check_energy_output(self.energy(x), x)

    def log_weights(self, x: Tensor, log_q: Tensor | None = None) -> Tensor:
        """Log importance weights ``-u(x) - log q(x)`` of shape ``(batch,)`` (unnormalised).

        Pass ``log_q`` from :meth:`sample` to avoid inverting the flow again.
        """
        check_batch(x, name="x")
        if log_q is None:
            log_q = self.log_prob(x)
        return -self.reduced_energy(x) - log_q

    @torch.no_grad()
    def sample_weighted(
        self, n: int, batch_size: int = 4096, temperature: float = 1.0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``n`` samples in batches without gradients.

        Returns:
            ``(x, log_q, u)`` with ``x`` ``(n, dim_x)``, ``log_q`` and ``u`` ``(n,)``;
            log weights are ``-u - log_q``. Non-finite energies are kept as they are
            (``+inf`` gives weight zero).
        """
        xs, lqs, us = [], [], []
        left = int(n)
        while left > 0:
            m = min(left, int(batch_size))
            x, log_q = self.sample(m, temperature=temperature, with_log_prob=True)
            xs.append(x)
            lqs.append(log_q)
            us.append(self.reduced_energy(x))
            left -= m
        return torch.cat(xs), torch.cat(lqs), torch.cat(us)
