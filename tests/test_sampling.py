"""Toy MCMC samplers: reproducibility and correct stationary distributions."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.special import gamma

from bgflow_mini.energies import DoubleWell
from bgflow_mini.reweighting import free_energy_difference
from bgflow_mini.sampling import mala, metropolis


def test_metropolis_double_well_free_energy():
    dw = DoubleWell()
    x0 = torch.zeros(2, dtype=torch.float64)
    # large steps jump between the wells directly, so the chains equilibrate quickly
    x, acc = metropolis(dw, x0, 3000, 2.0, n_chains=1000, thin=5, burn_in=500, seed=0)
    assert x.shape == (600 * 1000, 2) and x.dtype == torch.float64
    assert 0.0 < acc < 1.0
    x1 = x[:, 0].numpy()
    df, _ = free_energy_difference(None, x1 < 0, x1 > 0, n_bootstrap=0)
    # run-to-run spread of this estimate is ~0.025 kT
    assert df == pytest.approx(dw.free_energy_difference(), abs=0.12)
    assert df == pytest.approx(3.380, abs=0.12)
    assert (x[:, 1] ** 2).mean().item() == pytest.approx(1.0, abs=0.03)


def test_metropolis_is_reproducible():
    dw = DoubleWell(dim=3)
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    a, acc_a = metropolis(dw, x0, 50, 0.5, thin=2, burn_in=10, seed=7)
    b, acc_b = metropolis(dw, x0, 50, 0.5, thin=2, burn_in=10, seed=7)
    c, _ = metropolis(dw, x0, 50, 0.5, thin=2, burn_in=10, seed=8)
    assert torch.equal(a, b) and acc_a == acc_b
    assert not torch.equal(a, c)
    assert a.shape == (25 * 8, 3) and a.dtype == torch.float32
    # time-major layout: chain c at kept time t is row t * n_chains + c
    chains = a.view(25, 8, 3)
    assert torch.equal(chains[:, 3], a[3::8])
    # per-dimension step sizes are accepted
    d, _ = metropolis(dw, x0, 5, torch.tensor([0.5, 0.1, 0.1]), seed=1)
    assert d.shape == (5 * 8, 3)


def test_mala_quartic_moments():
    # u = x1^4 + x2^2 / 2: <x1^2> = Γ(3/4)/Γ(1/4), <x2^2> = 1. At tau = 0.3 unadjusted
    # Langevin would give <x2^2> = 1/(1 - tau/2) = 1.18; the MH correction removes it.
    quartic = DoubleWell(a=1.0, b=0.0, c=0.0, d=1.0)
    x0 = torch.zeros(2, dtype=torch.float64)
    x, acc = mala(quartic, x0, 1000, 0.3, n_chains=200, thin=2, burn_in=100, seed=0)
    assert x.shape == (500 * 200, 2)
    assert 0.5 < acc < 0.95
    assert (x[:, 0] ** 2).mean().item() == pytest.approx(gamma(0.75) / gamma(0.25), abs=0.008)
    assert (x[:, 1] ** 2).mean().item() == pytest.approx(1.0, abs=0.02)
    y, acc_y = mala(quartic, x0, 1000, 0.3, n_chains=200, thin=2, burn_in=100, seed=0)
    assert torch.equal(x, y) and acc == acc_y


def test_mala_keeps_exact_double_well_samples_stationary():
    dw = DoubleWell(kT=2.0)
    x0 = dw.sample(2000, seed=1)
    x, _ = mala(dw, x0, 100, 0.05, thin=10, seed=2)
    x1 = x.view(10, 2000, 2)[-1, :, 0].numpy()
    df, se = free_energy_difference(None, x1 < 0, x1 > 0, seed=0)
    assert abs(df - dw.free_energy_difference()) < 4 * se
    assert not math.isnan(se)


def test_sampler_input_validation():
    dw = DoubleWell()
    with pytest.raises(ValueError):
        metropolis(dw, torch.zeros(3), 10, 0.1)
    with pytest.raises(ValueError):
        metropolis(dw, torch.zeros(4, 2), 10, 0.1, n_chains=3)
    with pytest.raises(ValueError):
        metropolis(dw, torch.zeros(2), 0, 0.1)
    with pytest.raises(TypeError):
        mala(dw, torch.zeros(2, dtype=torch.long), 10, 0.1)
    with pytest.raises(ValueError):
        mala(dw, torch.zeros(2), 10, -0.1)
