"""Training losses of a Boltzmann generator, in kT.

* ``nll``: maximum likelihood (forward KL up to a constant) on data ``x``:
  ``-log q(x)``.
* ``reverse_kl``: ``KL(q || p) + log Z = E_{x~q}[u(x) + log q(x)]`` estimated with
  ``n`` fresh samples (reparameterised, so gradients flow through the samples and
  through the energy's forces).
"""

from __future__ import annotations

from torch import Tensor

from .flows.base import check_batch

__all__ = ["nll", "reverse_kl", "reduce"]

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
) -> Tensor:
    """Reverse KL ``E_q[u(x) / τ + log q(x)]`` (equal to ``KL(q||p_τ) - log Z_τ``).

    Draws ``n`` samples from ``generator`` and evaluates its energy ``u`` (kT).
    Per-sample values (``reduction="none"``) are ``u(x_i) / τ + log q(x_i) = -log w_i``; a
    configuration whose energy is ``+inf`` gives ``+inf`` there, which callers can count
    or drop. ``temperature`` scales the prior (``log q`` is then the tempered model's
    density); ``target_temperature`` ``τ`` is that of the target ``p_τ ∝ exp(-u / τ)``,
    relative to the energy's own (1: the energy's kT).
    """
    x, log_q = generator.sample(n, temperature=temperature, with_log_prob=True)
    u = generator.reduced_energy(x)
    return reduce(u / float(target_temperature) + log_q, reduction)
