"""Small batched MCMC samplers for toy energies (to make reference "MD" data).

Both samplers run ``n_chains`` independent chains in parallel in torch, draw all
random numbers from a seeded ``torch.Generator`` (deterministic given ``seed``),
target exp(-u(x)) for a reduced energy ``u`` and return

* ``samples`` of shape ``(n_kept * n_chains, dim)``, time-major: row
  ``t * n_chains + c`` is chain ``c`` at kept time ``t`` (so
  ``samples.view(n_kept, n_chains, dim)`` recovers the chains), with
  ``n_kept = n_steps // thin``;
* the acceptance rate (a float) over the ``n_steps`` production steps.

``burn_in`` extra steps are run first and discarded.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .energies.base import Energy

__all__ = ["metropolis", "mala"]

_Step = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


def _init(
    energy: Energy, x0: Tensor, n_chains: int | None, seed: int | None
) -> tuple[Tensor, torch.Generator]:
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError("x0 must be a floating-point torch.Tensor")
    if x0.ndim == 1:
        x0 = x0.unsqueeze(0).expand(1 if n_chains is None else int(n_chains), -1)
    elif x0.ndim != 2 or (n_chains is not None and x0.shape[0] != n_chains):
        raise ValueError(
            f"x0 must be (dim,) or (n_chains, dim), got {tuple(x0.shape)}, n_chains={n_chains}"
        )
    if x0.shape[1] != energy.dim:
        raise ValueError(f"x0 has {x0.shape[1]} features, energy.dim is {energy.dim}")
    gen = torch.Generator(device=x0.device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return x0.detach().clone(), gen


def _run(
    step: _Step,
    x: Tensor,
    aux: tuple[Tensor, Tensor],
    n_steps: int,
    thin: int,
    burn_in: int,
) -> tuple[Tensor, float]:
    if n_steps < 1 or thin < 1 or burn_in < 0:
        raise ValueError(
            f"need n_steps >= 1, thin >= 1, burn_in >= 0; got {n_steps, thin, burn_in}"
        )
    u, g = aux
    kept = []
    n_acc = torch.zeros((), dtype=torch.long, device=x.device)
    for t in range(burn_in + n_steps):
        x, u, g, acc = step(x, u, g)
        if t >= burn_in:
            n_acc = n_acc + acc.sum()
            if (t - burn_in + 1) % thin == 0:
                kept.append(x)
    samples = torch.cat(kept, dim=0)
    return samples, int(n_acc) / (n_steps * x.shape[0])


def metropolis(
    energy: Energy,
    x0: Tensor,
    n_steps: int,
    step_size: float | Tensor,
    n_chains: int | None = None,
    thin: int = 1,
    burn_in: int = 0,
    seed: int | None = None,
) -> tuple[Tensor, float]:
    """Random-walk Metropolis with Gaussian proposals x' = x + step_size * N(0, 1).

    Arguments:
        energy: reduced energy u (kT) of dimension ``dim``.
        x0: start, (dim,) (copied to all chains) or (n_chains, dim).
        n_steps: production steps per chain.
        step_size: proposal standard deviation, scalar or (dim,) (units of x).
        n_chains: number of parallel chains (default: from x0, or 1).
        thin, burn_in, seed: see the module docstring.

    Returns:
        ``(samples (n_steps // thin * n_chains, dim), acceptance_rate)``.
    """
    x, gen = _init(energy, x0, n_chains, seed)
    sigma = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)

    def step(x: Tensor, u: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        prop = x + sigma * noise
        u_prop = energy(prop)
        log_r = torch.rand(u.shape, generator=gen, dtype=x.dtype, device=x.device).log()
        acc = log_r < (u - u_prop)  # NaN proposals are rejected
        return torch.where(acc[:, None], prop, x), torch.where(acc, u_prop, u), g, acc

    with torch.no_grad():
        u0 = energy(x)
        return _run(step, x, (u0, u0), int(n_steps), int(thin), int(burn_in))


def _energy_and_grad(energy: Energy, x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        u = energy(x)
        (g,) = torch.autograd.grad(u.sum(), x)
    return u.detach(), g.detach()


def mala(
    energy: Energy,
    x0: Tensor,
    n_steps: int,
    step_size: float,
    n_chains: int | None = None,
    thin: int = 1,
    burn_in: int = 0,
    seed: int | None = None,
) -> tuple[Tensor, float]:
    """Metropolis-adjusted Langevin algorithm (overdamped Langevin + MH correction).

    Proposal x' = x - tau grad u(x) + sqrt(2 tau) N(0, 1) with time step
    ``tau = step_size`` (units of x^2, since u is in kT), accepted with the
    Metropolis–Hastings ratio, so the chain samples exp(-u) exactly.
    Arguments and returns as :func:`metropolis`.
    """
    x, gen = _init(energy, x0, n_chains, seed)
    tau = float(step_size)
    if tau <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    noise_scale = math.sqrt(2.0 * tau)

    def step(x: Tensor, u: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        prop = x - tau * g + noise_scale * noise
        u_prop, g_prop = _energy_and_grad(energy, prop)
        log_fwd = -((prop - x + tau * g) ** 2).sum(1) / (4.0 * tau)
        log_bwd = -((x - prop + tau * g_prop) ** 2).sum(1) / (4.0 * tau)
        log_alpha = u - u_prop + log_bwd - log_fwd
        log_r = torch.rand(u.shape, generator=gen, dtype=x.dtype, device=x.device).log()
        acc = log_r < log_alpha
        x_new = torch.where(acc[:, None], prop, x)
        g_new = torch.where(acc[:, None], g_prop, g)
        return x_new, torch.where(acc, u_prop, u), g_new, acc

    with torch.no_grad():
        u0, g0 = _energy_and_grad(energy, x)
        return _run(step, x, (u0, g0), int(n_steps), int(thin), int(burn_in))
