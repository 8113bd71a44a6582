"""Tests of annealed importance sampling: exact weights against known normalisers and
moments, the plain weights for one step, circular latents, tuning and errors."""

from __future__ import annotations

import math

import pytest
import torch
from test_generator import randomise  # seeded perturbation of every flow parameter

from bgflow_mini import BoltzmannGenerator, NormalUniform, StandardNormal
from bgflow_mini.ais import annealed_importance_sampling, linear_betas, settings, tune_step_sizes
from bgflow_mini.flows import coupling_flow
from bgflow_mini.reweighting import effective_sample_size

MU = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 1.5, 0.8], dtype=torch.float64)


def gaussian_energy(x):
    """u = |(x - mu) / sigma|^2 / 2: log Z = sum log(sigma sqrt(2 pi))."""
    return 0.5 * (((x - MU.to(x)) / SIGMA.to(x)) ** 2).sum(-1)


LOG_Z = float(torch.log(SIGMA * math.sqrt(2 * math.pi)).sum())


@pytest.fixture(params=["rnvp", "nice"])
def bg(request):
    torch.manual_seed(0)
    flow = randomise(coupling_flow(3, 2, hidden=(16,), kind=request.param), scale=0.05).double()
    return BoltzmannGenerator(StandardNormal(3).double(), flow, gaussian_energy)


def log_mean_exp(log_w):
    return float(torch.logsumexp(log_w, 0) - math.log(len(log_w)))


def test_one_step_gives_the_plain_weights(bg):
    torch.manual_seed(3)
    res = annealed_importance_sampling(bg, 500, steps=1, step_sizes=[0.2], batch_size=500)
    torch.manual_seed(3)
    x, log_q = bg.sample(500, with_log_prob=True)
    plain = -gaussian_energy(x) - log_q
    torch.testing.assert_close(res.log_w, plain, rtol=0, atol=1e-10)
    assert res.log_w.dtype == torch.float64 and res.x.shape == (500, 3)
    assert not (res.log_w.requires_grad or res.x.requires_grad or res.u.requires_grad)
    torch.testing.assert_close(res.u, gaussian_energy(res.x))  # final points, their energies


def test_normaliser_and_moments_are_exact_and_ess_rises(bg):
    torch.manual_seed(1)
    n = 6000
    res = annealed_importance_sampling(bg, n, steps=24, leapfrog=2, batch_size=2000)
    x, log_q = bg.sample(n, with_log_prob=True)
    plain = -gaussian_energy(x) - log_q
    ess_plain, ess_ais = effective_sample_size(plain), effective_sample_size(res.log_w)
    assert ess_ais > ess_plain + 0.1, (ess_plain, ess_ais)
    assert abs(log_mean_exp(res.log_w) - LOG_Z) < 0.05
    w = torch.softmax(res.log_w, 0)
    mean = (w[:, None] * res.x).sum(0)
    std = ((w[:, None] * (res.x - mean) ** 2).sum(0)).sqrt()
    tol = 4 * SIGMA / math.sqrt(ess_ais * n)
    assert torch.all((mean - MU).abs() < tol), (mean, MU, tol)
    assert torch.allclose(std, SIGMA, rtol=0.08), (std, SIGMA)
    assert 0.4 < min(res.acceptance)


def test_weights_stay_exact_with_untuned_steps(bg):
    """Exactness does not depend on how good the moves are: huge and tiny step sizes."""
    for eps in (3.0, 1e-3):
        torch.manual_seed(2)
        res = annealed_importance_sampling(bg, 4000, steps=8, step_sizes=[eps] * 8)
        assert abs(log_mean_exp(res.log_w) - LOG_Z) < 0.1, eps


def test_circular_latent_is_wrapped_and_von_mises_exact():
    """A torsion-like feature (uniform prior on the circle) against a von Mises target."""
    kappa, m = 2.0, 0.7

    def energy(x):
        return 0.5 * x[:, 0] ** 2 - kappa * torch.cos(x[:, 1] - m)

    i0 = float(torch.special.i0(torch.tensor(kappa)))
    log_z = 0.5 * math.log(2 * math.pi) + math.log(2 * math.pi * i0)
    torch.manual_seed(0)
    flow = randomise(coupling_flow(2, 2, hidden=(16,), circular=[1]), scale=0.2).double()
    bg = BoltzmannGenerator(NormalUniform(2, [1]).double(), flow, energy)
    torch.manual_seed(4)
    res = annealed_importance_sampling(bg, 6000, steps=16, batch_size=3000)
    assert res.x[:, 1].abs().max() <= math.pi + 1e-9
    assert abs(log_mean_exp(res.log_w) - log_z) < 0.05
    w = torch.softmax(res.log_w, 0)
    i1_i0 = float(torch.special.i1(torch.tensor(kappa)) / torch.special.i0(torch.tensor(kappa)))
    assert abs(float((w * torch.cos(res.x[:, 1] - m)).sum()) - i1_i0) < 0.03


def test_tuning_reaches_the_target_acceptance(bg):
    torch.manual_seed(5)
    eps = tune_step_sizes(bg, steps=6, n=1000, target_acceptance=0.6, rounds=6)
    assert len(eps) == 6 and all(e > 0 for e in eps)
    res = annealed_importance_sampling(bg, 2000, steps=6, step_sizes=eps)
    assert all(0.45 < a < 0.75 for a in res.acceptance), res.acceptance
    assert res.summary()["steps"] == 6 and res.summary()["step_sizes"] == eps


def test_non_finite_energies_get_zero_weight(bg):
    def energy(x):
        u = gaussian_energy(x)
        return torch.where(x[:, 0] > 2.0, torch.full_like(u, math.nan), u)

    torch.manual_seed(6)
    res = annealed_importance_sampling(bg, 2000, steps=4, step_sizes=[0.3] * 4, energy=energy)
    bad = ~torch.isfinite(res.log_w)
    assert bool(torch.all(res.log_w[bad] == -math.inf))
    assert bool(torch.all(res.x[~bad, 0] <= 2.0))  # no finite weight outside the domain
    assert not torch.isnan(res.log_w).any()


def test_float32_generator():
    torch.manual_seed(0)
    flow = randomise(coupling_flow(3, 2, hidden=(16,)))
    bg = BoltzmannGenerator(StandardNormal(3), flow, gaussian_energy)
    res = annealed_importance_sampling(bg, 300, steps=3, step_sizes=[0.2] * 3)
    assert res.x.dtype == torch.float32 and res.log_w.dtype == torch.float64
    assert bg.training  # the generator's mode is restored


def test_errors(bg):
    with pytest.raises(ValueError, match="no energy"):
        annealed_importance_sampling(BoltzmannGenerator(bg.prior, bg.flow), 10, steps=2)
    with pytest.raises(ValueError, match="steps"):
        annealed_importance_sampling(bg, 10, steps=0)
    with pytest.raises(ValueError, match="betas"):
        annealed_importance_sampling(bg, 10, betas=[0.0, 0.6, 0.5, 1.0])
    with pytest.raises(ValueError, match="step_sizes"):
        annealed_importance_sampling(bg, 10, steps=3, step_sizes=[0.1, 0.1])
    with pytest.raises(ValueError, match="target_acceptance"):
        tune_step_sizes(bg, steps=2, target_acceptance=1.5)
    assert linear_betas(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert settings(None) is None and settings({"steps": 0, "leapfrog": 3}) is None
    got = settings({"steps": 4, "leapfrog": None, "target_acceptance": None})
    assert got == {"steps": 4, "leapfrog": 1, "target_acceptance": 0.7}
