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


def test_largest_weights_edge_cases():
    assert largest_weights([-np.inf, np.nan], [0.0, 0.0]) == []  # nothing carries weight
    heavy = largest_weights([0.0, -np.inf, 1.0], [1.0, 2.0, 3.0], k=5)  # fewer than k finite
    assert [h["index"] for h in heavy] == [2, 0] and heavy[0]["cvs"] == {}
    assert sum(h["share"] for h in heavy) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        largest_weights([0.0, 1.0], [0.0])
    with pytest.raises(ValueError, match="positive int"):
        largest_weights([0.0], [0.0], k=0)
