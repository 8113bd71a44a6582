"""Tests of bgflow_mini.evaluation helpers that need no trained model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bgflow_mini.evaluation import largest_weights
from bgflow_mini.report import summary_table


def test_largest_weights_finds_the_heavy_samples_and_their_cvs():
    rng = np.random.default_rng(0)
    n = 1000
    log_w = rng.normal(size=n)
    log_w[[17, 503]] = [9.0, 8.0]  # two heavy samples, 17 the heavier
    log_w[40] = np.nan  # carries no weight
    u = rng.normal(size=n)
    u[17] = 12.0
    values = {"phi": rng.uniform(-np.pi, np.pi, n), "d": rng.uniform(0.1, 0.5, n)}
    cvs = {"phi": {"type": "torsion", "atoms": [0, 1, 2, 3]}, "d": {"type": "distance"}}
    heavy = largest_weights(log_w, u, values, cvs, k=3)
    assert [h["index"] for h in heavy[:2]] == [17, 503]
    w = np.exp(np.where(np.isfinite(log_w), log_w, -np.inf) - 9.0)
    assert heavy[0]["share"] == pytest.approx(1.0 / w.sum())
    assert heavy[1]["share"] == pytest.approx(math.exp(-1.0) / w.sum())
    assert heavy[0]["share"] > heavy[1]["share"] > heavy[2]["share"]
    finite = np.isfinite(log_w)
    assert heavy[0]["log_w_above_median"] == pytest.approx(9.0 - np.median(log_w[finite]))
    assert heavy[0]["u_above_median"] == pytest.approx(12.0 - np.median(u))
    # torsions in degrees, distances as they are (nm)
    assert heavy[0]["cvs"]["phi"] == pytest.approx(math.degrees(values["phi"][17]))
    assert heavy[0]["cvs"]["d"] == pytest.approx(values["d"][17])
    # the summary shows the three largest with their CVs
    table = summary_table({"ess": 0.1, "largest_weights": heavy})
    assert table.count("largest weight") == 3
    assert f"{100 * heavy[0]['share']:.2f} %" in table and "phi " in table


def test_summary_shows_the_replica_pool_of_each_weighting():
    pool = {
        "weighting": "equal",
        "temperatures": [300.0, 356.2, 422.9],
        "n_frames": 900,
        "kish_frames": 900.0,
        "weight_share": [1 / 3, 1 / 3, 1 / 3],
        "phase_weightings": {"mbar": {"kish_frames": 410.4, "weight_share": [0.7, 0.2, 0.1]}},
    }
    table = summary_table({"ess": 0.1, "data_info": {"replica_pool": pool}})
    head = "| ML draws, 300/356/423 K pool"
    assert f"{head}, equal weights: share per temperature | 0.333 / 0.333 / 0.333 (Kish " in table
    assert f"{head}, mbar weights: share per temperature | 0.700 / 0.200 / 0.100 (Kish " in table
    assert "effective 410 of 900 frames" in table
    assert "pool" not in summary_table({"ess": 0.1, "data_info": {}})


def test_largest_weights_edge_cases():
    assert largest_weights([-np.inf, np.nan], [0.0, 0.0]) == []  # nothing carries weight
    heavy = largest_weights([0.0, -np.inf, 1.0], [1.0, 2.0, 3.0], k=5)  # fewer than k finite
    assert [h["index"] for h in heavy] == [2, 0] and heavy[0]["cvs"] == {}
    assert sum(h["share"] for h in heavy) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        largest_weights([0.0, 1.0], [0.0])
    with pytest.raises(ValueError, match="positive int"):
        largest_weights([0.0], [0.0], k=0)


def test_block_free_energy_with_series_and_weights():
    """Series sampled at the same times are blocked together; weights count frames."""
    from bgflow_mini.evaluation import block_free_energy

    rng = np.random.default_rng(0)
    a = rng.random((2, 400)) < 0.7
    b = ~a
    one = block_free_energy(a.ravel(), b.ravel(), 10, 50, 0)
    ones = block_free_energy(a, b, 10, 50, 0, weights=np.ones(a.shape))
    assert ones[0] == pytest.approx(-math.log(b.sum() / a.sum())) == pytest.approx(one[0])
    w = np.where(a, 2.0, 1.0)  # doubling the weight of state a moves dF by ln 2
    assert block_free_energy(a, b, 10, 50, 0, weights=w)[0] == pytest.approx(ones[0] + math.log(2))
    w0 = np.stack([np.ones(400), np.zeros(400)])  # the second series weighs nothing
    solo = block_free_energy(a[0], b[0], 10, 50, 0)
    assert block_free_energy(a, b, 10, 50, 0, weights=w0) == pytest.approx(solo)
    with pytest.raises(ValueError, match="non-negative"):
        block_free_energy(a, b, 10, 50, 0, weights=-w)
    with pytest.raises(ValueError, match="shape"):
        block_free_energy(a, b, 10, 50, 0, weights=np.ones(3))
