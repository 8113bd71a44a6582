"""The Pareto tail diagnostic: known tail shapes recovered, invariances, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bgflow_mini.pareto import PARETO_K_RELIABLE, describe_k, gpd_fit, pareto_k, tail_size
from bgflow_mini.reweighting import effective_sample_size


@pytest.mark.parametrize("k", [0.25, 0.5, 0.8, 1.0])
def test_pareto_weights_give_their_shape(k):
    """Weights w = U^-k (a Pareto tail of shape k): the fit recovers k over 10^5 draws."""
    rng = np.random.default_rng(1)
    ks = [pareto_k(-k * np.log(rng.uniform(size=100_000)))["k"] for _ in range(4)]
    assert np.mean(ks) == pytest.approx(k, abs=0.06)


def test_gpd_fit_recovers_shape_and_scale():
    rng = np.random.default_rng(2)
    k, sigma = 0.4, 2.5
    x = sigma / k * (rng.uniform(size=20_000) ** -k - 1.0)  # GPD(k, sigma) by inversion
    k_hat, sigma_hat = gpd_fit(x)
    assert k_hat == pytest.approx(k, abs=0.03) and sigma_hat == pytest.approx(sigma, rel=0.05)
    # a light (bounded, k < 0) tail: uniform exceedances are GPD(-1, L)
    k_hat, sigma_hat = gpd_fit(rng.uniform(0.0, 3.0, size=20_000))
    assert k_hat == pytest.approx(-1.0, abs=0.05) and sigma_hat == pytest.approx(3.0, rel=0.05)
    with pytest.raises(ValueError, match="exceedances"):
        gpd_fit(np.zeros(10))


def test_light_and_heavy_lognormal_weights_are_told_apart():
    """Log-normal weights: sigma 0.5 is reliable (finite variance), sigma 3 is not; the
    ESS of such sets says less than k does about further sets."""
    rng = np.random.default_rng(3)
    light = pareto_k(0.5 * rng.normal(size=50_000))
    heavy = pareto_k(3.0 * rng.normal(size=50_000))
    assert light["k"] < 0.3 < PARETO_K_RELIABLE < heavy["k"]
    assert light["tail"] == heavy["tail"] == tail_size(50_000) == math.ceil(3 * math.sqrt(5e4))


def test_pareto_k_invariances_and_inputs():
    rng = np.random.default_rng(4)
    lw = 1.5 * rng.normal(size=5_000)
    ref = pareto_k(lw)
    assert pareto_k(lw + 700.0)["k"] == pytest.approx(ref["k"], abs=1e-9)  # constant shift
    assert pareto_k(rng.permutation(lw))["k"] == pytest.approx(ref["k"], abs=1e-12)  # order
    assert pareto_k(torch.from_numpy(lw))["k"] == ref["k"]  # torch and numpy agree
    assert pareto_k(list(lw))["k"] == ref["k"]
    # non-finite entries are zero weights: below the tail they change nothing but N
    bad = np.concatenate([lw, [np.nan, -np.inf]])
    assert pareto_k(bad)["n"] == 5_002 and math.isfinite(pareto_k(bad)["k"])
    assert effective_sample_size(bad) < effective_sample_size(lw)
    with pytest.raises(ValueError, match="1-D"):
        pareto_k(np.zeros((3, 3)))


def test_pareto_k_without_a_tail_to_fit():
    """Too few samples, equal weights or no finite weight: NaN, not an error."""
    assert math.isnan(pareto_k(np.zeros(10))["k"])  # tail of 2 weights
    assert math.isnan(pareto_k(np.zeros(1_000))["k"])  # every weight equal: no tail
    assert math.isnan(pareto_k(np.full(1_000, -np.inf))["k"])
    assert math.isnan(pareto_k(np.array([]))["k"])


def test_describe_k_bands():
    assert describe_k(0.2).startswith("finite variance")
    assert describe_k(0.6).startswith("infinite variance")
    assert describe_k(0.7) == describe_k(1.3) and describe_k(0.7).startswith("estimates unre")
    assert describe_k(math.nan) == "no tail to fit"
