"""MD references: independent runs pooled with equal weight, series in time order."""

from __future__ import annotations

import numpy as np
import pytest

from bgflow_mini import free_energy as fe
from bgflow_mini.md_reference import MDReference, pool_runs

SPEC = {"x": {"kind": "distance"}}


def run(values: np.ndarray, k: int = 1, log_w: np.ndarray | None = None, path: str = "r"):
    """A fake run: one coordinate per frame (dim 3), ``k`` series of equal length."""
    pos = np.zeros((len(values), 3))
    pos[:, 0] = values
    temps = [300.0 * 1.2**i for i in range(k)]
    return MDReference(pos, path, log_w, k, temps if k > 1 else None)


def test_pool_orders_series_by_temperature_and_weights_runs_equally():
    rng = np.random.default_rng(0)
    n, k = 50, 3
    a = run(rng.normal(size=k * n), k, rng.normal(size=k * n), "a")
    b = run(rng.normal(size=k * n), k, 3.0 + rng.normal(size=k * n), "b")
    pooled = pool_runs([a, b])
    assert (pooled.n_runs, pooled.n_series, pooled.n_replicas) == (2, 6, 3)
    assert pooled.kind == "md_mbar" and pooled.label == "MD (2 runs x 3 replicas, MBAR)"
    assert pooled.n_target == 2 * n and pooled.path == "a, b"
    x = pooled.positions[:, 0].reshape(k, 2, n)  # temperature, run, time
    np.testing.assert_array_equal(x[:, 0], a.positions[:, 0].reshape(k, n))
    np.testing.assert_array_equal(x[:, 1], b.positions[:, 0].reshape(k, n))
    w = np.exp(pooled.log_w).reshape(k, 2, n)
    np.testing.assert_allclose(w[:, 0].sum(), 0.5)  # each run carries half the weight
    np.testing.assert_allclose(w[:, 1].sum(), 0.5)  # whatever its MBAR offset (3.0 here)
    wa = np.exp(a.log_w - a.log_w.max()).reshape(k, n)  # within a run: its MBAR weights
    np.testing.assert_allclose(w[:, 0] / w[:, 0].sum(), wa / wa.sum(), rtol=1e-12)
    # the target temperature's frames of both runs come first
    np.testing.assert_array_equal(
        pooled.positions[: pooled.n_target, 0],
        np.concatenate([a.positions[:n, 0], b.positions[:n, 0]]),
    )
    # each run's own frames come back in its own order
    for r, one in enumerate((a, b)):
        np.testing.assert_array_equal(pooled.positions[pooled.run_frames(r)], one.positions)
    np.testing.assert_array_equal(a.run_frames(0), np.arange(k * n))
    with pytest.raises(IndexError, match="run 2 of a reference with 2"):
        pooled.run_frames(2)


def test_pooled_runs_average_state_populations():
    """Two runs of counted frames (no MBAR): the pooled population is the runs' mean, and
    the block bootstrap of two independent runs narrows the error of one."""
    rng = np.random.default_rng(1)
    n = 4000
    runs = [run((rng.random(n) < p).astype(float) + 0.5) for p in (0.10, 0.30)]
    pooled = pool_runs(runs)
    assert pooled.kind == "md" and pooled.label == "MD (2 runs)" and pooled.log_w is None
    states = {"lo": {"x": [0.0, 1.0]}, "hi": {"x": [1.0, 2.0]}}
    x = {"x": pooled.positions[:, 0]}
    res = fe.md_delta_f(x, states, SPEC, "lo", "hi", 20, 100, 0, None, pooled.n_series)
    p_hi = [float((r.positions[:, 0] > 1.0).mean()) for r in runs]
    assert res["population_b"] == pytest.approx(np.mean(p_hi), rel=1e-12)
    assert res["dF"] == pytest.approx(-np.log(np.mean(p_hi) / (1 - np.mean(p_hi))), rel=1e-12)
    one = fe.md_delta_f({"x": runs[0].positions[:, 0]}, states, SPEC, "lo", "hi", 20, 100, 0)
    assert 0 < res["stderr"] < one["stderr"]


def test_pool_of_one_run_is_that_run_and_mismatches_are_refused():
    a = run(np.zeros(20), 2, np.zeros(20))
    assert pool_runs([a]) is a
    with pytest.raises(ValueError, match="at least one"):
        pool_runs([])
    with pytest.raises(ValueError, match="frames per"):
        pool_runs([a, run(np.zeros(30), 2, np.zeros(30))])
    with pytest.raises(ValueError, match="replica"):
        pool_runs([a, run(np.zeros(20), 1)])
    with pytest.raises(ValueError, match="temperatures"):
        b = run(np.zeros(20), 2, np.zeros(20))
        b.temperatures = [300.0, 400.0]
        pool_runs([a, b])
    with pytest.raises(ValueError, match="already"):
        pool_runs([pool_runs([a, a]), a])
    with pytest.raises(ValueError, match="runs"):
        MDReference(np.zeros((20, 3)), "x", None, 4, None, 3)


def test_load_reference_of_a_cache_entry(tmp_path):
    """One run's reference from a replica-exchange cache: the target temperature's frames,
    or every kept replica with its MBAR weights; a lone trajectory file has one replica."""
    from test_data import SETTINGS, toy_system

    from bgflow_mini.data import generate_or_load, load_replica_frames, load_trajectory
    from bgflow_mini.md_reference import load_reference
    from bgflow_mini.replica_pool import series_log_weights

    settings = {**SETTINGS, "n_replicas": 3, "keep_replicas": 2}
    entry = generate_or_load(toy_system(), settings, tmp_path, n_workers=1, progress=False)
    one = load_reference(entry, 1, stride=2)
    xyz = load_trajectory(entry).xyz[::2]
    np.testing.assert_array_equal(one.positions, xyz.reshape(len(xyz), -1).astype(np.float64))
    assert (one.kind, one.log_w, one.path) == ("md", None, str(entry.traj_path))
    two = load_reference(entry.path, 2)
    x, u, temps = load_replica_frames(entry, 2)
    assert (two.kind, two.n_series, two.path) == ("md_mbar", 2, str(entry.path))
    np.testing.assert_allclose(two.positions, x.reshape(-1, 6).double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(two.log_w, series_log_weights(u, temps), rtol=1e-12)
    assert two.temperatures == pytest.approx(list(temps))
    with pytest.raises(ValueError, match="one trajectory file"):
        load_reference(entry.traj_path, 2)
