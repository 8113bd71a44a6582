"""Toy energies: values, gradients, dtypes, and quadrature free energies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import dblquad, quad
from scipy.optimize import minimize

from bgflow_mini.energies import DoubleWell, MuellerBrown

MB_MINIMA = [(-0.558, 1.442, -146.70), (0.623, 0.028, -108.17), (-0.050, 0.467, -80.77)]


def _mb_reference(x: float, y: float) -> float:
    """Müller–Brown written out term by term (independent of the module's tables)."""
    return (
        -200 * math.exp(-((x - 1) ** 2) - 10 * y**2)
        - 100 * math.exp(-(x**2) - 10 * (y - 0.5) ** 2)
        - 170 * math.exp(-6.5 * (x + 0.5) ** 2 + 11 * (x + 0.5) * (y - 1.5) - 6.5 * (y - 1.5) ** 2)
        + 15 * math.exp(0.7 * (x + 1) ** 2 + 0.6 * (x + 1) * (y - 1) + 0.7 * (y - 1) ** 2)
    )


def test_double_well_values():
    e = DoubleWell(a=1.5, b=4.0, c=0.7, d=2.0, kT=2.5, dim=3)
    x = torch.tensor([[0.3, -1.0, 2.0], [-1.7, 0.5, 0.0], [2.2, 0.0, -0.4]], dtype=torch.float64)
    ref = [
        (1.5 * r[0] ** 4 - 4.0 * r[0] ** 2 + 0.7 * r[0] + 0.5 * 2.0 * (r[1] ** 2 + r[2] ** 2)) / 2.5
        for r in x.tolist()
    ]
    torch.testing.assert_close(e(x), torch.tensor(ref, dtype=torch.float64), rtol=1e-14, atol=0)
    e1 = DoubleWell(dim=1)
    assert e1(torch.tensor([[1.0]], dtype=torch.float64)).item() == pytest.approx(1 - 6 + 1)


def test_mueller_brown_values_and_minima():
    pts = [(0.0, 0.0), (-1.0, 1.0), (0.5, 1.5), (-0.3, 0.2)]
    x = torch.tensor(pts, dtype=torch.float64)
    for scale, kT in [(1.0, 1.0), (0.1, 2.0)]:
        ref = torch.tensor([scale * _mb_reference(*p) / kT for p in pts], dtype=torch.float64)
        torch.testing.assert_close(MuellerBrown(scale, kT)(x), ref, rtol=1e-13, atol=1e-13)
    mb = MuellerBrown(scale=1.0)

    def fun(p: np.ndarray) -> tuple[float, np.ndarray]:
        t = torch.tensor(p[None], dtype=torch.float64, requires_grad=True)
        u = mb(t).sum()
        (g,) = torch.autograd.grad(u, t)
        return u.item(), g[0].numpy()

    for x0, y0, v0 in MB_MINIMA:
        res = minimize(fun, np.array([x0 + 0.05, y0 - 0.05]), jac=True, tol=1e-12)
        assert np.allclose(res.x, [x0, y0], atol=1.5e-3)
        assert res.fun == pytest.approx(v0, abs=0.01)


@pytest.mark.parametrize("energy", [DoubleWell(dim=3, c=0.5, kT=0.7), MuellerBrown(0.1, 1.3)])
def test_gradients_match_finite_differences(energy):
    gen = torch.Generator().manual_seed(0)
    x = (0.8 * torch.randn(5, energy.dim, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(energy, (x,), eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("energy", [DoubleWell(dim=4), MuellerBrown()])
def test_dtype_following(energy):
    x64 = torch.randn(
        7, energy.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    u64 = energy(x64)
    u32 = energy(x64.float())
    assert u64.dtype == torch.float64 and u32.dtype == torch.float32
    torch.testing.assert_close(u32.double(), u64, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        energy(torch.zeros(3, energy.dim + 1))


def test_double_well_free_energy_is_3380():
    dw = DoubleWell()
    df = dw.free_energy_difference()
    assert df == pytest.approx(3.380, abs=1e-3)
    # independent: trapezoid sum on a grid (smooth, decaying integrand)
    g = np.linspace(-6.0, 6.0, 600_001)
    p = np.exp(-(g**4 - 6 * g**2 + g))
    left, right = np.trapezoid(p * (g < 0), g), np.trapezoid(p * (g > 0), g)
    assert df == pytest.approx(-math.log(right / left), abs=1e-6)
    # P(x1 > 0) < P(x1 < 0): the linear term tilts the right well upwards
    assert right < left


def test_double_well_partition_and_marginal():
    dw = DoubleWell(a=1.0, b=3.0, c=-0.5, d=2.0, kT=1.5, dim=3)
    f1 = quad(lambda t: math.exp(-(t**4 - 3 * t**2 - 0.5 * t) / 1.5), -np.inf, np.inf)[0]
    log_z = math.log(f1) + 2 * 0.5 * math.log(2 * math.pi * 1.5 / 2.0)
    assert dw.log_partition() == pytest.approx(log_z, abs=1e-9)
    g = np.linspace(-5, 5, 200_001)
    assert np.trapezoid(np.exp(-dw.marginal_free_energy(g)), g) == pytest.approx(1.0, abs=1e-9)


def test_double_well_exact_samples():
    dw = DoubleWell(dim=2)
    x = dw.sample(200_000, seed=0)
    p_right = 1.0 / (1.0 + math.exp(dw.free_energy_difference()))
    se = math.sqrt(p_right * (1 - p_right) / x.shape[0])
    assert abs((x[:, 0] > 0).double().mean().item() - p_right) < 4 * se
    assert (x[:, 1] ** 2).mean().item() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(x, dw.sample(200_000, seed=0))


def test_mueller_brown_free_energy_by_dblquad():
    mb = MuellerBrown()
    umin = 0.1 * -146.7

    def f(y: float, x: float) -> float:
        return math.exp(-(0.1 * _mb_reference(x, y) - umin))

    # the integrand is below 2e-9 of its maximum outside [-2.5, 1.5] x [-1.5, 3.5]
    kw = {"epsabs": 0.0, "epsrel": 1e-6}
    za = dblquad(f, -2.5, 1.5, lambda x: x + mb.split, lambda x: 3.5, **kw)[0]
    zb = dblquad(f, -2.5, 1.5, lambda x: -1.5, lambda x: x + mb.split, **kw)[0]
    df = mb.free_energy_difference()
    assert df == pytest.approx(-math.log(zb / za), abs=1e-5)
    assert df == pytest.approx(3.6386, abs=1e-4)
    assert mb.log_partition() == pytest.approx(math.log(za + zb) - umin, abs=1e-5)
    assert mb.log_partition() == pytest.approx(mb.log_partition_grid(), abs=1e-6)
    # states: the deep minimum is in A, the other two in B
    m = torch.tensor([p[:2] for p in MB_MINIMA])
    assert mb.in_state_a(m).tolist() == [True, False, False]
    # marginal density of s = y - x is normalised
    s = np.linspace(-3.0, 6.0, 3001)
    assert np.trapezoid(np.exp(-mb.cv_free_energy(s)), s) == pytest.approx(1.0, abs=1e-6)
