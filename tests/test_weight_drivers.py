"""Which coordinates log w follows: binned R^2 against known answers, Z-matrix coordinates
against mdtraj, and the per-state selection."""

from __future__ import annotations

import math
from pathlib import Path

import mdtraj as md
import numpy as np
import pytest

from bgflow_mini.coordinates import build_zmatrix
from bgflow_mini.weight_drivers import (
    binned_r2,
    energy_slope,
    weight_drivers,
    zmatrix_coordinates,
)

ALDP_PDB = Path(__file__).resolve().parents[1] / "systems" / "aldp_vacuum" / "aldp.pdb"


def _linear(n: int = 20_000, seed: int = 0):
    """log w = 2 sqrt(3) s + e with s ~ U(0, 1), e ~ N(0, 1): R^2 = 1 / 2 (0.4988 with
    20 equal-count bins, which lose the within-bin variance 1 / 400 of the signal)."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(size=n)
    log_w = 2 * np.sqrt(3) * s + rng.normal(size=n)
    return log_w, np.stack([rng.uniform(size=n), s, np.full(n, 0.3)], axis=1)


def test_binned_r2_matches_the_explained_variance():
    log_w, feats = _linear()
    r2 = binned_r2(log_w, feats, bins=20)
    assert r2[1] == pytest.approx(0.4988, abs=0.015)
    assert 0 <= r2[0] < 0.005  # unrelated: about 19 / 20,000
    assert r2[2] == 0.0  # constant column
    assert np.all(binned_r2(np.full(100, 2.0), feats[:100]) == 0.0)  # constant log w


def test_binned_r2_depends_on_ranks_and_log_w_differences_only():
    log_w, feats = _linear(5_000, seed=1)
    r2 = binned_r2(log_w, feats)
    monotone = np.stack([np.exp(feats[:, 0]), feats[:, 1] ** 3 - 7, feats[:, 2]], axis=1)
    np.testing.assert_allclose(binned_r2(log_w + 123.0, monotone), r2, rtol=1e-12, atol=1e-15)


def test_clipping_keeps_a_few_hopeless_samples_from_owning_the_variance():
    log_w, feats = _linear()
    bad = log_w.copy()
    bad[:3] = [-1e6, -np.inf, np.nan]  # high-energy and broken samples
    r2 = binned_r2(bad, feats)
    assert r2[1] == pytest.approx(0.4988, abs=0.015)
    unclipped = binned_r2(np.nan_to_num(bad, nan=-1e6, neginf=-1e6), feats, clip=1e9)
    assert unclipped[1] < 0.01  # the one sample at -1e6 owns the variance
    with pytest.raises(ValueError, match="bins"):
        binned_r2(log_w, feats, bins=1)
    with pytest.raises(ValueError, match="features"):
        binned_r2(log_w, feats[:10])


@pytest.fixture(scope="module")
def aldp():
    """200 jittered copies of alanine dipeptide (0.01 nm), its Z-matrix and atom names."""
    traj = md.load(str(ALDP_PDB))
    rng = np.random.default_rng(2)
    xyz = traj.xyz[0] + 0.01 * rng.normal(size=(200, traj.n_atoms, 3)).astype(np.float32)
    rows = build_zmatrix(traj.topology, positions=traj.xyz[0])
    names = [f"{a.residue.name}{a.residue.resSeq}:{a.name}" for a in traj.topology.atoms]
    return md.Trajectory(xyz, traj.topology), rows, names


def test_zmatrix_coordinates_equal_mdtraj(aldp):
    traj, rows, names = aldp
    values, labels = zmatrix_coordinates(traj.xyz, rows, names)
    n = traj.n_atoms
    assert values.shape == (200, 3 * n - 6) and len(labels) == 3 * n - 6
    bonds, angles, torsions = rows[1:, :2], rows[2:, :3], rows[3:, :4]
    want = np.concatenate(
        [
            md.compute_distances(traj, bonds, periodic=False),
            md.compute_angles(traj, angles, periodic=False),
            md.compute_dihedrals(traj, torsions, periodic=False),
        ],
        axis=1,
    )
    diff = values - want
    diff[:, 2 * n - 3 :] = (diff[:, 2 * n - 3 :] + np.pi) % (2 * np.pi) - np.pi  # at +-pi
    assert np.abs(diff).max() < 1e-5
    kinds = [label.split()[0] for label in labels]
    assert kinds == ["bond"] * (n - 1) + ["angle"] * (n - 2) + ["torsion"] * (n - 3)


def test_labels_drop_a_repeated_residue_prefix():
    x = np.zeros((1, 4, 3))
    x[0, 1, 0], x[0, 2, :2], x[0, 3] = 0.1, (0.1, 0.1), (0.2, 0.1, 0.1)
    rows = [[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0]]
    _, labels = zmatrix_coordinates(x, rows, ["ACE1:C", "ALA2:N", "ALA2:CA", "ALA2:CB"])
    assert labels == [
        "bond ALA2:N-ACE1:C",
        "bond ALA2:CA-N",
        "bond ALA2:CB-CA",
        "angle ALA2:CA-N-ACE1:C",
        "angle ALA2:CB-CA-N",
        "torsion ALA2:CB-CA-N-ACE1:C",
    ]
    _, plain = zmatrix_coordinates(x, rows)
    assert plain[-1] == "torsion 3-2-1-0"


def test_weight_drivers_finds_the_torsion_and_the_heavy_state(aldp):
    traj, rows, names = aldp
    values, labels = zmatrix_coordinates(traj.xyz, rows, names)
    j = len(labels) - 1  # the last torsion drives log w
    log_w = 3.0 * np.cos(values[:, j])
    heavy = log_w > np.quantile(log_w, 0.5)  # half the samples, nearly all of sum w^2
    light = ~heavy
    out = weight_drivers(traj.xyz, log_w, rows, names, masks={"a": heavy, "b": light}, top=3)
    assert out["all"][0]["coordinate"] == labels[j] and out["all"][0]["r2"] > 0.9
    assert [d["r2"] for d in out["all"]] == sorted((d["r2"] for d in out["all"]), reverse=True)
    assert len(out["all"]) == 3 and list(out["states"]) == ["a"]  # b: < 10 % of sum w^2
    assert out["states"]["a"][0]["coordinate"] == labels[j]
    few = weight_drivers(traj.xyz, log_w, rows, names, masks={"a": heavy}, bins=40)
    assert few["states"] == {}  # 100 samples < 5 * 40


def test_weight_drivers_gives_the_same_in_chunks_and_in_float32(aldp):
    traj, rows, names = aldp
    rng = np.random.default_rng(3)
    log_w = rng.normal(size=200)
    masks = {"all_of_them": np.ones(200, bool)}
    ref = weight_drivers(traj.xyz.astype(np.float64), log_w, rows, names, masks=masks, top=60)
    got = weight_drivers(traj.xyz, log_w, rows, names, masks=masks, top=60, chunk_rows=5)
    assert got["states"].keys() == ref["states"].keys() == {"all_of_them"}
    for key in ("all", "states"):
        a = ref[key] if key == "all" else ref[key]["all_of_them"]
        b = got[key] if key == "all" else got[key]["all_of_them"]
        assert {d["coordinate"] for d in a} == {d["coordinate"] for d in b}
        r2a = {d["coordinate"]: d["r2"] for d in a}
        assert all(abs(d["r2"] - r2a[d["coordinate"]]) < 0.02 for d in b)


@pytest.mark.parametrize("sigma", [0.8, 1.0, 1.25])
def test_energy_slope_gives_the_temperature_of_a_tempered_gaussian(sigma):
    """Target u = |x|^2 / 2 (kT), generator N(0, sigma^2 I) in 3 dimensions: log q =
    -u / sigma^2 + c, so log w = (1 / sigma^2 - 1) u + c exactly and the generator is the
    target at sigma^2 times its temperature."""
    rng = np.random.default_rng(0)
    x = sigma * rng.normal(size=(20_000, 3))
    u = 0.5 * np.square(x).sum(1)
    log_q = -u / sigma**2 - 1.5 * np.log(2 * np.pi * sigma**2)
    out = energy_slope(-u - log_q, u)
    assert out["slope"] == pytest.approx(1 / sigma**2 - 1, abs=1e-9)
    assert out["temperature_ratio"] == pytest.approx(sigma**2, rel=1e-9)
    assert out["r2"] == pytest.approx(1.0 if sigma != 1.0 else 0.0, abs=1e-9)
    # clipped: samples more than clip below the largest log w are left out of the fit
    assert out["n"] == int((-u - log_q >= (-u - log_q).max() - 15.0).sum())


def test_energy_slope_of_weights_unrelated_to_the_energy_and_degenerate_inputs():
    rng = np.random.default_rng(1)
    u = rng.normal(size=50_000)
    out = energy_slope(rng.normal(size=50_000), u)  # log w independent of u
    assert abs(out["slope"]) < 0.02 and out["r2"] < 1e-3
    assert out["temperature_ratio"] == pytest.approx(1.0, abs=0.02)
    lw = -2.0 * u  # slope -2: 1 + s < 0, no temperature fits
    assert energy_slope(lw, u)["temperature_ratio"] == math.inf
    # non-finite energies and weights are left out; too few samples give NaN
    u2, lw2 = u.copy(), -0.5 * u
    u2[:10], lw2[10:20] = np.inf, -np.inf
    assert energy_slope(lw2, u2)["n"] == 50_000 - 20
    assert energy_slope(lw2, u2)["slope"] == pytest.approx(-0.5)
    assert math.isnan(energy_slope([0.0, 1.0], [1.0, 2.0])["slope"])
    assert math.isnan(energy_slope(np.zeros(10), np.ones(10))["r2"])  # constant u
    with pytest.raises(ValueError, match="same shape"):
        energy_slope(np.zeros(3), np.zeros(4))
