"""Training losses of a Boltzmann generator, in kT.

* ``nll``: maximum likelihood (forward KL up to a constant) on data ``x``:
  ``-log q(x)``.
* ``reverse_kl``: ``KL(q || p) + log Z = E_{x~q}[u(x) + log q(x)]`` estimated with
  ``n`` fresh samples (reparameterised, so gradients flow through the samples and
  through the energy's forces).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .flows.base import check_batch

__all__ = ["nll", "reverse_kl", "kl_values", "reduce"]

_REDUCTIONS = ("mean", "sum", "none")


def reduce(values: Tensor, reduction: str) -> Tensor:
    """Apply ``reduction`` ("mean" | "sum" | "none") to per-sample ``values`` ``(batch,)``."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def nll(generator, x: Tensor, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood ``-log q(x)`` of data ``x`` ``(batch, dim)``.

    Returns a scalar for ``reduction="mean"``/``"sum"`` or ``(batch,)`` for ``"none"``.
    Minimising it is maximum likelihood, i.e. the forward KL ``KL(p_data || q)`` up to
    the data entropy.
    """
    check_batch(x, name="x")
    return reduce(-generator.log_prob(x), reduction)


def reverse_kl(
    generator,
    n: int,
    reduction: str = "mean",
    temperature: float = 1.0,
    target_temperature: float = 1.0,
    drop_nonfinite: bool = False,
) -> Tensor:
    """Reverse KL ``E_q[u(x) / τ + log q(x)]`` (equal to ``KL(q||p_τ) - log Z_τ``).

    Draws ``n`` samples from ``generator`` and evaluates its energy ``u`` (kT).
    Per-sample values (``reduction="none"``) are ``u(x_i) / τ + log q(x_i) = -log w_i``; a
    configuration whose energy is ``+inf`` gives ``+inf`` there, which callers can count
    or drop. ``temperature`` scales the prior (``log q`` is then the tempered model's
    density); ``target_temperature`` ``τ`` is that of the target ``p_τ ∝ exp(-u / τ)``,
    relative to the energy's own (1: the energy's kT). ``drop_nonfinite``: see
    :func:`kl_values`.
    """
    z = generator.prior.sample(int(n), temperature=temperature)
    vals = kl_values(generator, z, temperature, target_temperature, drop_nonfinite)
    return reduce(vals, reduction)


def kl_values(
    generator,
    z: Tensor,
    temperature: float = 1.0,
    target_temperature: float = 1.0,
    drop_nonfinite: bool = False,
) -> Tensor:
    """Per-sample reverse-KL values ``u(x) / τ + log q_T(x)`` ``(batch,)`` of the latents
    ``z`` (drawn from the prior at ``temperature``), pushed through the flow.

    ``drop_nonfinite``: rows with a non-finite value or a non-finite position are returned
    as ``+inf`` without a graph, and the others are evaluated once more on their own and
    returned with that graph. Such a sample has a non-finite backward (an overflowing
    log-det or position; a regularised energy may still give it a finite value), and
    ``0 * inf = NaN`` would reach every parameter even when the caller gives that row
    zero weight; without its graph it cannot. Costs one read of the count and, only when
    there are such rows, a second forward pass over the others.
    """
    vals, ok = _kl_of_latent(generator, z, temperature, target_temperature)
    if not drop_nonfinite or not torch.is_grad_enabled():
        return vals
    n_ok = int(ok.sum())
    if n_ok == vals.numel():
        return vals
    inf = torch.full_like(vals, float("inf")).detach()
    if n_ok == 0:
        return inf
    energy = generator.energy
    stats = getattr(energy, "last_stats", None)  # the counts of the whole batch stay
    keep = ok.nonzero().squeeze(1)
    redo, _ = _kl_of_latent(generator, z[keep], temperature, target_temperature)
    if stats is not None:
        energy.last_stats = stats
    return inf.index_put((keep,), redo)


def _kl_of_latent(
    generator, z: Tensor, temperature: float, target_temperature: float
) -> tuple[Tensor, Tensor]:
    """Values ``(batch,)`` and bool ``(batch,)``: value and position finite."""
    x, logdet = generator.flow(z)
    log_q = generator.prior.log_prob(z, temperature=temperature) - logdet
    vals = generator.reduced_energy(x) / float(target_temperature) + log_q
    return vals, torch.isfinite(vals) & torch.isfinite(x).all(-1)
