"""Tests of pooled replica-exchange frames and their MBAR weights (bgflow_mini.replica_pool)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bgflow_mini.replica_pool import kish_size, pool_log_weights, temperature_log_weights
from bgflow_mini.units import MOLAR_GAS_CONSTANT as R_KJ  # kJ/(mol K)

K_SPRING = 100.0  # kJ/(mol nm^2)
DIM = 6


def harmonic_frames(temps: list[float], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact Boltzmann samples of a DIM-dimensional harmonic well at each temperature:
    their potential energies (kJ/mol) and ladder indices, shuffled across temperatures."""
    rng = np.random.default_rng(seed)
    u, rep = [], []
    for i, t in enumerate(temps):
        x = rng.normal(0.0, math.sqrt(R_KJ * t / K_SPRING), (n, DIM))
        u.append(0.5 * K_SPRING * (x**2).sum(1))
        rep.append(np.full(n, i))
    order = rng.permutation(n * len(temps))
    return np.concatenate(u)[order], np.concatenate(rep)[order]


def test_mbar_free_energies_and_target_average_match_the_exact_values() -> None:
    temps = [300.0, 360.0, 430.0]
    u, rep = harmonic_frames(temps, 20_000)
    log_w, f = temperature_log_weights(u, rep, np.array(temps))
    # Z_k is proportional to T_k^(DIM/2): f_k - f_0 = -(DIM/2) ln(T_k / T_0)
    exact = -(DIM / 2) * np.log(np.array(temps) / temps[0])
    assert f[0] == 0.0
    np.testing.assert_allclose(f, exact, atol=0.01)
    w = np.exp(log_w)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    # <U> at the target temperature is (DIM / 2) R T_0 (equipartition)
    assert (w * u).sum() == pytest.approx(DIM / 2 * R_KJ * temps[0], rel=0.01)
    # the hot frames add information: more effective frames than the target's 20,000
    assert 20_000 < kish_size(log_w) < 60_000
    # the target's own frames carry most of the weight, hotter ones less and less
    shares = [w[rep == r].sum() for r in range(3)]
    assert shares[0] > shares[1] > shares[2] > 0


def test_weights_for_a_hotter_target_and_equal_weights() -> None:
    temps = [300.0, 360.0, 430.0]
    u, rep = harmonic_frames(temps, 10_000, seed=1)
    log_w, _ = temperature_log_weights(u, rep, np.array(temps), target=2)
    assert (np.exp(log_w) * u).sum() == pytest.approx(DIM / 2 * R_KJ * 430.0, rel=0.015)
    eq = pool_log_weights(u, rep, np.array(temps), "equal")
    np.testing.assert_allclose(eq, -math.log(len(u)))
    assert kish_size(eq) == pytest.approx(len(u))
    mixture_mean = np.mean(u)
    assert (np.exp(eq) * u).sum() == pytest.approx(mixture_mean)
    mbar = pool_log_weights(u, rep, np.array(temps), "mbar")
    np.testing.assert_allclose(mbar, temperature_log_weights(u, rep, np.array(temps))[0])


def test_one_temperature_gives_equal_weights() -> None:
    u, rep = harmonic_frames([300.0], 500)
    log_w, f = temperature_log_weights(u, rep, np.array([300.0]))
    np.testing.assert_allclose(log_w, -math.log(500), atol=1e-10)
    assert f.tolist() == [0.0]


def test_errors() -> None:
    u, rep = harmonic_frames([300.0, 400.0], 50)
    temps = np.array([300.0, 400.0])
    with pytest.raises(ValueError, match="one of"):
        pool_log_weights(u, rep, temps, "uniform")
    with pytest.raises(ValueError, match="every temperature needs frames"):
        temperature_log_weights(u, np.zeros_like(rep), temps)
    with pytest.raises(ValueError, match="shape"):
        temperature_log_weights(u, rep[:-1], temps)
    with pytest.raises(ValueError, match="finite"):
        temperature_log_weights(np.where(rep == 1, np.nan, u), rep, temps)
    with pytest.raises(ValueError, match="target"):
        temperature_log_weights(u, rep, temps, target=2)
