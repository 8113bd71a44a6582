"""Reweighting estimators against exact answers for Gaussians."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from bgflow_mini.reweighting import (
    effective_sample_size,
    ess_tensor,
    free_energy_difference,
    free_energy_profile,
    free_energy_profile_2d,
)


def _gauss_logpdf(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma)


def _weighted_gaussian(n: int, mu: float, sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples of q = N(0, 1) and log weights to p = N(mu, sigma^2) (unnormalised)."""
    x = np.random.default_rng(seed).normal(size=n)
    return x, _gauss_logpdf(x, mu, sigma) - _gauss_logpdf(x, 0.0, 1.0) + 1234.5


# ---- effective sample size -------------------------------------------------------------
def test_ess_limits_and_invariance():
    assert effective_sample_size(np.zeros(100)) == pytest.approx(1.0, abs=1e-14)
    lw = np.zeros(1000)
    lw[7] = 50.0
    assert effective_sample_size(lw) == pytest.approx(1e-3, rel=1e-12)
    rng = np.random.default_rng(0)
    lw = rng.normal(0.0, 1.5, size=500)
    w = np.exp(lw)  # moderate weights: direct float64 formula is fine
    direct = w.sum() ** 2 / (w**2).sum() / w.size
    assert effective_sample_size(lw) == pytest.approx(direct, rel=1e-12)
    assert effective_sample_size(lw + 1000.0) == pytest.approx(direct, rel=1e-12)
    assert effective_sample_size(torch.as_tensor(lw - 1000.0)) == pytest.approx(direct, rel=1e-12)


def test_ess_wide_span_and_zero_weights():
    # log w spans > 2000 kT: the tail samples are effectively zero weight
    lw = np.concatenate([np.zeros(10), np.linspace(-2000.0, -700.0, 90)])
    ess = effective_sample_size(lw)
    assert math.isfinite(ess) and ess == pytest.approx(0.1, rel=1e-12)
    lw = np.array([0.0, 0.0, -np.inf, -np.inf])  # -inf: zero weight, still counted in N
    assert effective_sample_size(lw) == 0.5
    with pytest.raises(ValueError, match="1-D"):
        effective_sample_size(np.zeros((3, 2)))


def test_ess_exact_values():
    # weights [1, 1, 0, 0] -> (sum w)^2 / (N sum w^2) = 4 / (4 * 2) = 0.5
    assert effective_sample_size([0.0, 0.0, -np.inf, -np.inf]) == pytest.approx(0.5, rel=1e-15)
    # weights [2, 1, 1] -> 16 / (3 * 6) = 8 / 9
    assert effective_sample_size(np.log([2.0, 1.0, 1.0])) == pytest.approx(8 / 9, rel=1e-15)
    # one sample carries all the weight: 1 / N
    assert effective_sample_size([0.0, -np.inf, -np.inf, -np.inf, -np.inf]) == pytest.approx(0.2)
    assert effective_sample_size([3.0]) == 1.0


def test_ess_invalid_entries_weigh_zero_but_count():
    ref = effective_sample_size([math.log(2.0), 0.0, 0.0, -np.inf, -np.inf, -np.inf])
    assert ref == pytest.approx(16 / (6 * 6), rel=1e-15)
    for bad in (np.nan, np.inf, -np.inf):  # each invalid entry is a zero weight in N
        lw = np.array([math.log(2.0), 0.0, 0.0, bad, bad, bad])
        assert effective_sample_size(lw) == pytest.approx(ref, rel=1e-15)
    mixed = np.array([math.log(2.0), 0.0, 0.0, np.nan, np.inf, -np.inf])
    assert effective_sample_size(mixed) == pytest.approx(ref, rel=1e-15)
    assert effective_sample_size(torch.tensor(mixed)) == pytest.approx(ref, rel=1e-15)
    # no valid entry, or no entry at all: 0, never an error
    for lw in ([], [np.nan], [np.inf, np.inf], [-np.inf, -np.inf], [np.nan, np.inf, -np.inf]):
        assert effective_sample_size(np.array(lw, dtype=np.float64)) == 0.0
        assert effective_sample_size(torch.tensor(lw, dtype=torch.float32)) == 0.0
        assert effective_sample_size(list(lw)) == 0.0


def test_ess_numpy_torch_and_sequences_agree():
    lw = np.random.default_rng(3).normal(0.0, 2.0, size=257)
    lw[[5, 17, 100]] = [np.nan, np.inf, -np.inf]
    ref = effective_sample_size(lw)
    assert isinstance(ref, float) and 0.0 < ref < 1.0
    finite = lw[np.isfinite(lw)]
    w = np.exp(finite - finite.max())
    assert ref == pytest.approx(w.sum() ** 2 / (w**2).sum() / lw.size, rel=1e-12)
    t = torch.tensor(lw, requires_grad=True)  # detached inside, no error
    out = effective_sample_size(t)
    assert isinstance(out, float) and out == pytest.approx(ref, rel=1e-14)
    assert effective_sample_size(lw.tolist()) == pytest.approx(ref, rel=1e-14)
    # float32 input is computed in float64: exact for the float32 values
    lw32 = lw.astype(np.float32)
    ref32 = effective_sample_size(lw32.astype(np.float64))
    assert effective_sample_size(torch.tensor(lw32)) == pytest.approx(ref32, rel=1e-14)
    assert effective_sample_size(lw32) == pytest.approx(ref32, rel=1e-14)
    if torch.cuda.is_available():
        assert effective_sample_size(t.cuda()) == pytest.approx(ref, rel=1e-14)


# ---- free energy differences -------------------------------------------------------------
@pytest.mark.parametrize(("mu", "sigma", "cut"), [(0.7, 0.8, 0.0), (1.0, 0.1, 0.9)])
def test_free_energy_difference_gaussian(mu, sigma, cut):
    x, lw = _weighted_gaussian(40_000, mu, sigma, seed=1)
    if sigma == 0.1:
        assert lw.max() - lw.min() > 1000.0  # log w spans > 1000 kT
    p_a = norm.cdf(cut, mu, sigma)
    exact = -math.log((1 - p_a) / p_a)
    df, se = free_energy_difference(lw, x < cut, x >= cut, n_bootstrap=200, seed=0)
    assert 0.0 < se < 0.1
    assert abs(df - exact) < 4 * se


def test_free_energy_difference_unit_weights_and_inputs():
    rng = np.random.default_rng(2)
    x = rng.normal(0.5, 1.0, size=20_000)
    exact = -math.log(norm.sf(0.0, 0.5) / norm.cdf(0.0, 0.5))
    df, se = free_energy_difference(None, x < 0, x >= 0, seed=3)
    assert abs(df - exact) < 4 * se
    # point estimate is the plain count ratio; torch/list inputs give identical results
    assert df == pytest.approx(-math.log((x >= 0).sum() / (x < 0).sum()), rel=1e-12)
    t = torch.as_tensor(x)
    assert free_energy_difference(None, t < 0, t >= 0, seed=3) == (df, se)
    assert free_energy_difference(np.zeros(x.size), list(x < 0), (x >= 0).astype(int), seed=3) == (
        df,
        se,
    )


def test_free_energy_difference_extreme_weight_ratio():
    # state B carries a factor e^-800 less weight: no underflow in estimate or errors
    rng = np.random.default_rng(4)
    lw = np.concatenate([rng.normal(0, 0.3, 3000), rng.normal(-800.0, 0.3, 1000)])
    in_a = np.arange(4000) < 3000
    df, se = free_energy_difference(lw, in_a, ~in_a, seed=0)
    exact = np.logaddexp.reduce(lw[in_a]) - np.logaddexp.reduce(lw[~in_a])
    assert df == pytest.approx(exact, abs=1e-9) and 799 < df < 802
    assert 0.0 < se < 0.1


def test_bootstrap_error_scaling_and_calibration():
    ses = []
    for n in (4000, 16000):
        x, lw = _weighted_gaussian(n, 0.5, 0.9, seed=n)
        ses.append(free_energy_difference(lw, x < 0.3, x >= 0.3, seed=1)[1])
    assert ses[0] / ses[1] == pytest.approx(2.0, rel=0.15)
    # the bootstrap error matches the spread over independent data sets
    ests, errs = [], []
    for rep in range(60):
        x, lw = _weighted_gaussian(1500, 0.5, 0.9, seed=100 + rep)
        d, s = free_energy_difference(lw, x < 0.3, x >= 0.3, n_bootstrap=100, seed=rep)
        ests.append(d)
        errs.append(s)
    assert np.std(ests, ddof=1) / np.mean(errs) == pytest.approx(1.0, abs=0.3)
    # seeded bootstrap is reproducible
    x, lw = _weighted_gaussian(1000, 0.5, 0.9, seed=0)
    r1 = free_energy_difference(lw, x < 0, x >= 0, seed=42)
    assert r1 == free_energy_difference(lw, x < 0, x >= 0, seed=42)
    assert math.isnan(free_energy_difference(lw, x < 0, x >= 0, n_bootstrap=0)[1])


def test_free_energy_difference_errors():
    x = np.linspace(-1, 1, 10)
    with pytest.raises(ValueError, match="no samples"):
        free_energy_difference(None, x < -5, x > 0)
    with pytest.raises(ValueError, match="no samples"):  # state with only zero weights
        free_energy_difference(np.where(x < 0, -np.inf, 0.0), x < 0, x > 0)
    with pytest.raises(ValueError, match="overlap"):
        free_energy_difference(None, x < 0.5, x > 0)
    with pytest.raises(ValueError, match="entries"):
        free_energy_difference(np.zeros(9), x < 0, x > 0)
    with pytest.raises(ValueError, match="shape"):
        free_energy_difference(None, x < 0, (x > 0)[:5])
    with pytest.raises(ValueError, match="NaN"):
        free_energy_difference(np.full(10, np.nan), x < 0, x > 0)


# ---- profiles ----------------------------------------------------------------------------
def _exact_bin_free_energy(edges: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    """-ln of the exact bin-averaged density of N(mu, sigma^2)."""
    return -np.log(np.diff(norm.cdf(edges, mu, sigma)) / np.diff(edges))


def _check_profile(f, err, exact):
    """Agreement up to the (estimated) additive constant, within 4 bootstrap errors."""
    ok = np.isfinite(f)
    wt = 1.0 / err[ok] ** 2
    offset = np.sum(wt * (f[ok] - exact[ok])) / wt.sum()
    resid = f[ok] - exact[ok] - offset
    assert (np.abs(resid) < 4 * err[ok] + 1e-3).all()
    chi2 = np.mean((resid / err[ok]) ** 2)
    assert 0.3 < chi2 < 2.5


def test_profile_weighted_gaussian():
    x, lw = _weighted_gaussian(50_000, 0.8, 0.7, seed=5)
    edges = np.linspace(-1.0, 2.5, 29)
    c, f, err = free_energy_profile(x, lw, edges, seed=0)
    np.testing.assert_allclose(c, 0.5 * (edges[1:] + edges[:-1]))
    assert f.min() == 0.0 and np.isfinite(f).all() and (err > 0).all()
    _check_profile(f, err, _exact_bin_free_energy(edges, 0.8, 0.7))
    # same histogram with int bins + range
    c2, f2, _ = free_energy_profile(torch.as_tensor(x), lw, 28, range=(-1.0, 2.5), seed=0)
    np.testing.assert_allclose(c2, c, atol=1e-12)
    np.testing.assert_allclose(f2, f, atol=1e-9)


def test_profile_unit_weights_nonuniform_bins_and_empty_bins():
    x = np.random.default_rng(6).normal(size=30_000)
    edges = np.array([-6.0, -5.5, -2.0, -1.0, -0.5, 0.0, 0.3, 0.8, 1.5, 2.5])
    _, f, err = free_energy_profile(x, None, edges, seed=1)
    assert f[0] == np.inf and err[0] == np.inf  # no sample below -5.5
    _check_profile(f, err, _exact_bin_free_energy(edges, 0.0, 1.0))
    # bootstrap errors shrink like 1/sqrt(N)
    x4 = np.random.default_rng(7).normal(size=4 * 30_000)
    _, _, err4 = free_energy_profile(x4, None, edges, seed=1)
    ratio = err[1:] / err4[1:]
    assert np.median(ratio) == pytest.approx(2.0, rel=0.15)


def test_profile_2d_against_exact():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=40_000), rng.normal(size=40_000)
    # target: independent N(0.5, 0.8^2) x N(-0.3, 1.2^2)
    lw = (
        _gauss_logpdf(x, 0.5, 0.8)
        + _gauss_logpdf(y, -0.3, 1.2)
        - _gauss_logpdf(x, 0, 1)
        - _gauss_logpdf(y, 0, 1)
    )
    e1, e2 = np.linspace(-1.5, 2.0, 8), np.linspace(-2.0, 1.5, 6)
    c1, c2, f, err = free_energy_profile_2d(x, y, lw, (e1, e2), seed=0)
    assert f.shape == err.shape == (7, 5) and c1.shape == (7,) and c2.shape == (5,)
    exact = _exact_bin_free_energy(e1, 0.5, 0.8)[:, None] + _exact_bin_free_energy(e2, -0.3, 1.2)
    _check_profile(f.ravel(), err.ravel(), exact.ravel())
    # int bins + range give the same grid
    _, _, f2, _ = free_energy_profile_2d(x, y, lw, 5, range=((-1.5, 2.0), (-2.0, 1.5)), seed=0)
    assert f2.shape == (5, 5)
    with pytest.raises(ValueError):
        free_energy_profile_2d(x, y[:-1], lw, 5)


def test_profile_errors():
    x = np.linspace(0, 1, 50)
    with pytest.raises(ValueError, match="entries"):
        free_energy_profile(x, np.zeros(49), 5)
    with pytest.raises(ValueError, match="cv"):
        free_energy_profile(np.append(x, np.nan), None, 5)
    with pytest.raises(ValueError, match="inside the bins"):
        free_energy_profile(x, None, 5, range=(2.0, 3.0))
    with pytest.raises(ValueError):
        free_energy_profile(x, None, np.array([0.0, 1.0, 0.5]))


def test_block_ess_shows_a_heavy_tail():
    """One huge weight ruins the ESS of its block (and of the whole set), not the others."""
    from bgflow_mini.reweighting import block_ess

    lw = np.zeros(1000)
    flat = block_ess(lw, 5)
    assert flat == {"n_blocks": 5, "block_size": 200, "min": 1.0, "median": 1.0, "max": 1.0}
    lw[3] = 50.0
    b = block_ess(lw, 5)
    assert b["min"] == pytest.approx(1 / 200) and b["median"] == b["max"] == 1.0
    assert effective_sample_size(lw) == pytest.approx(1 / 1000)
    assert block_ess(np.zeros(7), 3)["block_size"] == 2  # the remainder is left out
    with pytest.raises(ValueError, match="n_blocks"):
        block_ess(lw, 0)


def test_ess_tensor_matches_the_kish_formula_without_leaving_the_tensor():
    g = torch.Generator().manual_seed(3)
    lw = torch.randn(500, generator=g, dtype=torch.float64) * 3.0 + 1000.0
    w = torch.exp(lw - lw.max())
    want = float(w.sum() ** 2 / (w.pow(2).sum() * 500))
    got = ess_tensor(lw)
    assert got.shape == () and got.dtype == torch.float64
    assert abs(float(got) - want) < 1e-12
    # NaN, +inf and -inf are samples of zero weight; float32 input
    bad = lw.clone()
    bad[:3] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
    kept = torch.exp(bad[3:] - bad[3:].max())
    want = float(kept.sum() ** 2 / (kept.pow(2).sum() * 500))
    assert abs(float(ess_tensor(bad.float() - 1000.0)) - want) < 1e-5
    assert float(ess_tensor(torch.full((4,), math.nan))) == 0.0
    assert float(ess_tensor(torch.zeros(0))) == 0.0
    assert float(ess_tensor(torch.zeros(7))) == 1.0
    with pytest.raises(ValueError, match="1-D"):
        ess_tensor(torch.zeros(2, 2))
