"""Annealed importance sampling (AIS) from a trained generator to its target.

Plain importance sampling weights a flow sample by ``w = p(x) / q(x)``. When the flow is
slightly off in many of its dimensions at once (a tetrapeptide's 120 internal
coordinates), the weights get a heavy tail and the ESS of a large set stays small.
AIS moves every flow sample a few Monte Carlo steps towards the target while it anneals,
and keeps weights that are still exact (Neal, Statistics and Computing 2001; with a
flow as the start, e.g. Midgley et al., ICLR 2023; Arbel et al., ICML 2021).

It runs in the generator's latent space, where the target pulled back through the flow,
``p_z(z) = p(f(z)) |det J_f(z)|``, is close to the prior ``N(z)``. The intermediate
densities are ``pi_beta(z) = N(z) w(z)^beta`` with ``w(z) = p_z(z) / N(z)`` the plain
importance weight of ``x = f(z)``, for ``0 = beta_0 < beta_1 < ... < beta_K = 1``. Every
chain starts at ``z_0 ~ N``; at step ``k`` its log-weight gains
``(beta_k - beta_(k-1)) log w(z)`` at the current point, then one Hamiltonian Monte Carlo
move (``leapfrog`` leapfrog steps of a fixed size, unit mass, Metropolis test) that leaves
``pi_beta_k`` invariant. The final weights are exact importance weights of the final
points for the target ``p`` (unnormalised, like ``-u - log q``): ESS, free energies and
PMFs use them as they use plain weights. ``steps=1`` gives the plain weights of the first
draw back.

Circular latent features (a :class:`~bgflow_mini.NormalUniform` prior's torsions) are
wrapped into ``[-pi, pi)`` after every position update: the flow is periodic in them, and
the leapfrog map stays reversible and volume preserving on the torus. The step sizes are
tuned on separate pilot chains before the main run (:func:`tune_step_sizes`) and then
fixed, so adapting them does not bias the weights.

Cost: every step evaluates the flow, the energy and their gradient once per leapfrog step
(the energy must be differentiable: :class:`~bgflow_mini.energies.TorchForceField` or the
OpenMM bridge, which returns forces to autograd).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "AISResult",
    "annealed_importance_sampling",
    "tune_step_sizes",
    "linear_betas",
    "settings",
]


@dataclass
class AISResult:
    """Final AIS samples ``x`` ``(n, dim_x)``, their log-weights ``log_w`` ``(n,)``
    (float64, unnormalised, ``-inf`` where a chain has no finite weight), reduced
    energies ``u`` ``(n,)`` (kT), the HMC acceptance rate of every annealing step, the
    step sizes used and the ``betas``."""

    x: Tensor
    log_w: Tensor
    u: Tensor
    acceptance: list[float]
    step_sizes: list[float]
    betas: list[float] = field(default_factory=list)
    leapfrog: int = 1

    def summary(self) -> dict:
        """JSON-ready settings and acceptance (no arrays)."""
        return {
            "kind": "ais",
            "steps": len(self.betas) - 1,
            "leapfrog": int(self.leapfrog),
            "betas": [float(b) for b in self.betas],
            "step_sizes": [float(s) for s in self.step_sizes],
            "acceptance": [float(a) for a in self.acceptance],
        }


def settings(config: Mapping | None) -> dict | None:
    """``{"steps", "leapfrog", "target_acceptance"}`` of a config's ``ais`` block (missing
    or null values take 1 leapfrog step and acceptance 0.7); ``None`` when ``steps`` is
    absent or 0 (plain flow samples)."""
    steps = int((config or {}).get("steps") or 0)
    if steps <= 0:
        return None
    return {
        "steps": steps,
        "leapfrog": int(config.get("leapfrog") or 1),
        "target_acceptance": float(config.get("target_acceptance") or 0.7),
    }


def linear_betas(steps: int) -> list[float]:
    """``steps + 1`` equally spaced inverse temperatures from 0 to 1."""
    steps = _positive_int(steps, "steps")
    return [k / steps for k in range(steps + 1)]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_betas(betas: Sequence[float]) -> list[float]:
    b = [float(v) for v in betas]
    if len(b) < 2 or b[0] != 0.0 or b[-1] != 1.0 or any(y <= x for x, y in zip(b, b[1:])):
        raise ValueError(f"betas must increase strictly from 0 to 1, got {b}")
    return b


class _LatentTarget:
    """``log N(z)``, ``log w(z)`` and their gradients for one generator and energy."""

    def __init__(self, generator, energy) -> None:
        self.prior, self.flow, self.energy = generator.prior, generator.flow, energy
        circ = getattr(self.prior, "circular", None)
        self.circular = None if circ is None or not bool(circ.any()) else circ.bool()

    def wrap(self, z: Tensor) -> Tensor:
        if self.circular is None:
            return z
        wrapped = torch.remainder(z + math.pi, 2 * math.pi) - math.pi
        return torch.where(self.circular, wrapped, z)

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(x, u, log N, log w, grad log N, grad log w)`` at ``z``; non-finite -> -inf."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            log_n = self.prior.log_prob(z)
            (g_n,) = torch.autograd.grad(log_n.sum(), z)
            x, logdet = self.flow(z)
            u = self.energy(x)
            log_w = -u - log_n.detach() + logdet
            (g_w,) = torch.autograd.grad(log_w.sum(), z)
        bad = ~torch.isfinite(log_w)
        log_w = log_w.detach().masked_fill(bad, -math.inf)
        return x.detach(), u.detach(), log_n.detach(), log_w, g_n, g_w.masked_fill(bad[:, None], 0)


def _run(
    target: _LatentTarget, z: Tensor, betas: list[float], eps: list[float], leapfrog: int
) -> tuple[Tensor, Tensor, Tensor, list[float]]:
    """One batch of chains from ``z``: final ``x``, ``log_w`` (float64), ``u``, acceptance."""
    x, u, log_n, log_w, g_n, g_w = target(z)
    total = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
    accepted = []
    for k in range(1, len(betas)):
        beta = betas[k]
        total = total + (beta - betas[k - 1]) * log_w.double()
        # one HMC move leaving N(z) w(z)^beta invariant
        p0 = torch.randn_like(z)
        h0 = log_n + beta * log_w - 0.5 * (p0**2).sum(1)
        zn, p = z, p0 + 0.5 * eps[k - 1] * (g_n + beta * g_w)
        for i in range(leapfrog):
            zn = target.wrap(zn + eps[k - 1] * p)
            xn, un, log_nn, log_wn, g_nn, g_wn = target(zn)
            grad = g_nn + beta * g_wn
            p = p + (eps[k - 1] if i < leapfrog - 1 else 0.5 * eps[k - 1]) * grad
        h1 = log_nn + beta * log_wn - 0.5 * (p**2).sum(1)
        log_acc = (h1 - h0).masked_fill(torch.isnan(h1 - h0), -math.inf)
        acc = torch.log(torch.rand_like(log_acc)) < log_acc
        keep = acc[:, None]
        z, x = torch.where(keep, zn, z), torch.where(keep, xn, x)
        u, log_n = torch.where(acc, un, u), torch.where(acc, log_nn, log_n)
        log_w = torch.where(acc, log_wn, log_w)
        g_n, g_w = torch.where(keep, g_nn, g_n), torch.where(keep, g_wn, g_w)
        accepted.append(acc.float().mean().item())
    total = total.masked_fill(torch.isnan(total), -math.inf)
    return x, total, u, accepted


@contextmanager
def _eval_mode(generator):
    """The generator in eval mode inside, its previous mode restored after."""
    was_training = generator.training
    generator.eval()
    try:
        yield
    finally:
        generator.train(was_training)


def _setup(generator, energy, steps, betas, leapfrog):
    energy = generator.energy if energy is None else energy
    if energy is None:
        raise ValueError("the generator has no energy: AIS needs the target energy")
    if betas is None:
        betas = linear_betas(steps)
    betas = _check_betas(betas)
    leapfrog = _positive_int(leapfrog, "leapfrog")
    return _LatentTarget(generator, energy), betas, leapfrog


def tune_step_sizes(
    generator,
    steps: int = 16,
    leapfrog: int = 1,
    n: int = 512,
    target_acceptance: float = 0.7,
    rounds: int = 4,
    initial: float = 0.1,
    energy=None,
    betas: Sequence[float] | None = None,
) -> list[float]:
    """One HMC step size per annealing step, tuned on ``rounds`` pilot runs of ``n``
    chains: each round scales every size by ``exp(1.5 (acceptance - target))``.

    The pilot chains are drawn from the global torch RNG and thrown away.
    """
    if not 0.0 < float(target_acceptance) < 1.0:
        raise ValueError(f"target_acceptance must be in (0, 1), got {target_acceptance!r}")
    if not (float(initial) > 0 and math.isfinite(float(initial))):
        raise ValueError(f"initial step size must be positive, got {initial!r}")
    target, betas, leapfrog = _setup(generator, energy, steps, betas, leapfrog)
    n, rounds = _positive_int(n, "n"), _positive_int(rounds, "rounds")
    eps = [float(initial)] * (len(betas) - 1)
    with _eval_mode(generator):
        for _ in range(rounds):
            with torch.no_grad():
                z = generator.prior.sample(n)
            acc = _run(target, z, betas, eps, leapfrog)[3]
            eps = [e * math.exp(1.5 * (a - float(target_acceptance))) for e, a in zip(eps, acc)]
    return eps


def annealed_importance_sampling(
    generator,
    n: int,
    steps: int = 16,
    leapfrog: int = 1,
    step_sizes: Sequence[float] | None = None,
    batch_size: int = 2048,
    energy=None,
    betas: Sequence[float] | None = None,
    target_acceptance: float = 0.7,
    tune_samples: int = 512,
    progress: bool = False,
) -> AISResult:
    """``n`` AIS samples of ``generator``'s target with exact log-weights.

    Arguments:
        generator: a :class:`~bgflow_mini.BoltzmannGenerator` (its prior's ``circular``
            features, if any, are wrapped).
        steps: annealing steps K (one HMC move each; linear betas unless ``betas``).
        leapfrog: leapfrog steps per HMC move.
        step_sizes: one per annealing step; ``None`` tunes them first
            (:func:`tune_step_sizes` on ``tune_samples`` pilot chains towards
            ``target_acceptance``).
        batch_size: chains run together (memory: a training batch's graph per chain).
        energy: reduced energy (kT), differentiable; default the generator's.

    Returns an :class:`AISResult`. Draws from the global torch RNG; the chains run in
    the dtype and on the device of the generator's prior.
    """
    from tqdm.auto import tqdm

    n, batch_size = _positive_int(n, "n"), _positive_int(batch_size, "batch_size")
    target, betas, leapfrog = _setup(generator, energy, steps, betas, leapfrog)
    with _eval_mode(generator):
        if step_sizes is None:
            step_sizes = tune_step_sizes(
                generator, leapfrog=leapfrog, n=tune_samples, energy=target.energy,
                betas=betas, target_acceptance=target_acceptance,
            )  # fmt: skip
        eps = [float(e) for e in step_sizes]
        if len(eps) != len(betas) - 1 or not all(e > 0 and math.isfinite(e) for e in eps):
            raise ValueError(
                f"step_sizes must be {len(betas) - 1} positive numbers, got {list(step_sizes)}"
            )
        xs, ws, us, accs = [], [], [], []
        with tqdm(total=n, disable=not progress, desc="AIS", unit="sample") as bar:
            for start in range(0, n, batch_size):
                m = min(batch_size, n - start)
                with torch.no_grad():
                    z = generator.prior.sample(m)
                x, log_w, u, acc = _run(target, z, betas, eps, leapfrog)
                xs.append(x)
                ws.append(log_w)
                us.append(u)
                accs.append((m, acc))
                bar.update(m)
    acceptance = [sum(m * a[k] for m, a in accs) / n for k in range(len(eps))]
    return AISResult(torch.cat(xs), torch.cat(ws), torch.cat(us), acceptance, eps, betas, leapfrog)
