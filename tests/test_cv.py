"""Tests of collective variables against mdtraj and of periodic state ranges."""

from __future__ import annotations

import math
from pathlib import Path

import mdtraj as md
import numpy as np
import pytest
import torch

from bgflow_mini import cv

PDB = Path(__file__).parents[1] / "systems" / "aldp_vacuum" / "aldp.pdb"


@pytest.fixture(scope="module")
def traj():
    t = md.load(str(PDB))
    rng = np.random.default_rng(0)
    xyz = t.xyz[0][None] + 0.03 * rng.standard_normal((50, t.n_atoms, 3))
    return md.Trajectory(xyz.astype(np.float32), t.topology)


def test_torsion_angle_distance_match_mdtraj(traj):
    x = traj.xyz.astype(np.float64).reshape(len(traj), -1)
    quads = np.array([[4, 6, 8, 14], [6, 8, 14, 16], [0, 1, 4, 6], [1, 4, 6, 8]])
    np.testing.assert_allclose(cv.torsion(x, quads), md.compute_dihedrals(traj, quads), atol=1e-5)
    triples = np.array([[4, 6, 8], [6, 8, 14], [1, 4, 5]])
    np.testing.assert_allclose(cv.angle(x, triples), md.compute_angles(traj, triples), atol=1e-5)
    pairs = np.array([[0, 1], [4, 14], [6, 20]])
    np.testing.assert_allclose(cv.distance(x, pairs), md.compute_distances(traj, pairs), atol=1e-6)
    phi_idx, phi = md.compute_phi(traj)
    np.testing.assert_allclose(cv.torsion(x, phi_idx[0]), phi[:, 0], atol=1e-5)


def test_torch_path_is_differentiable_and_matches_numpy(traj):
    x = torch.tensor(traj.xyz.reshape(len(traj), -1), dtype=torch.float64, requires_grad=True)
    specs = {
        "phi": {"type": "torsion", "atoms": [4, 6, 8, 14]},
        "d": {"type": "distance", "atoms": [0, 21]},
    }
    vals = cv.compute_cvs(x, specs)
    assert vals["phi"].shape == (len(traj),)
    vals["phi"].sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    np.testing.assert_allclose(
        vals["phi"].detach().numpy(), cv.compute_cvs(x.detach().numpy(), specs)["phi"]
    )
    # 3-D layout gives the same
    np.testing.assert_allclose(
        cv.torsion(traj.xyz.astype(np.float64), [4, 6, 8, 14]), vals["phi"].detach().numpy()
    )


def test_periodic_ranges_across_the_cut():
    phi = np.array([-3.1, -2.6, -1.0, 0.5, 1.9, 2.1, 3.1, 3.1 - 2 * math.pi])
    assert cv.in_range(phi, 0.0, 2.0, periodic=True).tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    # (2.5, -2.5) crosses the cut: |phi| >= 2.5
    assert cv.in_range(phi, 2.5, -2.5, periodic=True).tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    # the same range written with hi > pi
    assert cv.in_range(phi, 2.5, 2 * math.pi - 2.5, periodic=True).tolist() == [
        1,
        1,
        0,
        0,
        0,
        0,
        1,
        1,
    ]
    # the complement of (0, 2) written as (2, 0)
    a = cv.in_range(phi, 0.0, 2.0, periodic=True)
    b = cv.in_range(phi, 2.0, 0.0, periodic=True)
    assert np.all(a ^ b)
    t = torch.tensor(phi)
    assert cv.in_range(t, 2.5, -2.5, periodic=True).tolist() == [
        True,
        True,
        False,
        False,
        False,
        False,
        True,
        True,
    ]


def test_in_state_and_errors():
    specs = {
        "phi": {"type": "torsion", "atoms": [4, 6, 8, 14]},
        "d": {"type": "distance", "atoms": [0, 1]},
    }
    vals = {"phi": np.array([0.5, 1.0, -1.0]), "d": np.array([0.1, 0.3, 0.1])}
    assert cv.in_state(vals, {"phi": [0, 2], "d": [0, 0.2]}, specs).tolist() == [True, False, False]
    with pytest.raises(KeyError, match="unknown CV"):
        cv.in_state(vals, {"psi": [0, 1]}, specs)
    with pytest.raises(KeyError, match="unknown CV 'chi'"):
        cv.compute_cvs(np.zeros((1, 66)), specs, names=["chi"])
    with pytest.raises(ValueError, match="CV type"):
        cv.compute_cv(np.zeros((1, 66)), {"type": "rmsd", "atoms": [0]})
    with pytest.raises(ValueError, match="out of range"):
        cv.torsion(np.zeros((1, 66)), [0, 1, 2, 40])
    with pytest.raises(ValueError, match="multiple of 3"):
        cv.distance(np.zeros((1, 10)), [0, 1])


# ---- feature CVs (non-molecular targets) ----------------------------------------------------
def test_coordinate_cv_numpy_and_torch():
    rng = np.random.default_rng(1)
    for dim in (1, 2, 5):
        x = rng.normal(size=(7, dim))
        for i in range(dim):
            out = cv.compute_cv(x, {"type": "coordinate", "index": i})
            assert isinstance(out, np.ndarray) and out.shape == (7,)
            np.testing.assert_array_equal(out, x[:, i])
            t = torch.tensor(x, dtype=torch.float32)
            out_t = cv.compute_cv(t, {"type": "coordinate", "index": i})
            assert out_t.dtype == torch.float32 and torch.equal(out_t, t[:, i])
    # not reshaped into atoms: dim 2 works, and (batch, n, 3) is flattened per sample
    x3 = rng.normal(size=(4, 2, 3))
    np.testing.assert_array_equal(cv.coordinate(x3, 4), x3[:, 1, 1])
    t = torch.tensor(rng.normal(size=(6, 2)), requires_grad=True)
    (g,) = torch.autograd.grad(cv.coordinate(t, 1).sum(), t)
    assert g[:, 0].eq(0).all() and g[:, 1].eq(1).all()
    for bad in (2, -1, 1.0, True, "0"):
        with pytest.raises(ValueError, match="index"):
            cv.compute_cv(np.zeros((3, 2)), {"type": "coordinate", "index": bad})
    with pytest.raises(ValueError, match="index"):
        cv.compute_cv(np.zeros((3, 2)), {"type": "coordinate"})
    with pytest.raises(ValueError, match="atoms"):
        cv.compute_cv(np.zeros((3, 2)), {"type": "coordinate", "index": 0, "atoms": [0]})
    with pytest.raises(ValueError, match=r"\(batch, dim\)"):
        cv.coordinate(np.zeros(3), 0)


def test_linear_cv_values_and_gradient():
    rng = np.random.default_rng(2)
    c = [-1.0, 2.5, 0.0, 0.25]
    x = rng.normal(size=(9, 4))
    ref = x[:, 0] * -1.0 + x[:, 1] * 2.5 + x[:, 3] * 0.25
    out = cv.compute_cv(x, {"type": "linear", "coefficients": c})
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, ref, rtol=1e-14, atol=1e-14)
    spec = {"type": "linear", "coefficients": c, "offset": 0.75}
    np.testing.assert_allclose(cv.compute_cv(x, spec), ref + 0.75, rtol=1e-14, atol=1e-14)
    t = torch.tensor(x, requires_grad=True)
    out_t = cv.compute_cv(t, spec)
    assert out_t.dtype == torch.float64 and out_t.shape == (9,)
    np.testing.assert_allclose(out_t.detach().numpy(), ref + 0.75, rtol=1e-14, atol=1e-14)
    (g,) = torch.autograd.grad(out_t.sum(), t)
    torch.testing.assert_close(g, torch.tensor(c, dtype=torch.float64).expand(9, 4))
    t32 = torch.tensor(x, dtype=torch.float32)
    assert cv.compute_cv(t32, spec).dtype == torch.float32
    # Müller-Brown style s = y - x on 2-D features
    xy = np.array([[0.0, 1.0], [2.0, -1.0]])
    s = cv.compute_cv(xy, {"type": "linear", "coefficients": [-1, 1]})
    np.testing.assert_array_equal(s, [1.0, -3.0])
    for bad in ([1.0, 2.0], [1.0] * 5, [1.0, np.nan, 0.0, 0.0], [[1.0, 2.0, 3.0, 4.0]]):
        with pytest.raises(ValueError, match="4 finite coefficients"):
            cv.compute_cv(x, {"type": "linear", "coefficients": bad})
    with pytest.raises(ValueError, match="offset"):
        cv.compute_cv(x, {"type": "linear", "coefficients": c, "offset": "1"})
    with pytest.raises(ValueError, match="coefficients"):
        cv.compute_cv(x, {"type": "linear", "coefficient": c})


def test_cv_types_and_unknown_type_error():
    assert cv.CV_TYPES == {"torsion": 4, "angle": 3, "distance": 2}
    assert set(cv.ALL_CV_TYPES) == {"torsion", "angle", "distance", "coordinate", "linear"}
    assert set(cv.FEATURE_CV_TYPES) == {"coordinate", "linear"}
    with pytest.raises(ValueError, match="CV type") as err:
        cv.compute_cv(np.zeros((1, 6)), {"type": "rmsd"})
    for kind in cv.ALL_CV_TYPES:
        assert repr(kind) in str(err.value)
    with pytest.raises(ValueError, match="atoms"):
        cv.compute_cv(np.zeros((1, 6)), {"type": "distance"})
    assert cv.is_periodic({"type": "torsion", "atoms": [0, 1, 2, 3]})
    for spec in ({"type": "coordinate", "index": 0}, {"type": "linear"}, {"type": "angle"}, None):
        assert not cv.is_periodic(spec)


def test_feature_cvs_are_not_periodic_in_states_and_bins():
    from bgflow_mini import free_energy as fe

    specs = {
        "x": {"type": "coordinate", "index": 0},
        "s": {"type": "linear", "coefficients": [-1.0, 1.0]},
        "phi": {"type": "torsion", "atoms": [0, 1, 2, 3]},
    }
    x = np.array([[4.0, 0.0], [-4.0, 0.0], [3.0, 10.0], [4.0 - 2 * math.pi, 0.0]])
    vals = cv.compute_cvs(x, {k: specs[k] for k in ("x", "s")})
    np.testing.assert_allclose(vals["s"], [-4.0, 4.0, 7.0, 2 * math.pi - 4.0], rtol=1e-15)
    # not periodic: 4 - 2 pi is not in [3.5, 5), as it would be for a torsion
    assert cv.in_state(vals, {"x": [3.5, 5.0]}, specs).tolist() == [True, False, False, False]
    assert cv.in_state(vals, {"s": [3.0, 8.0]}, specs).tolist() == [False, True, True, False]
    tors = {"x": vals["x"], "phi": vals["x"]}
    assert cv.in_state(tors, {"phi": [3.5, 5.0]}, specs).tolist() == [True, False, False, True]
    t = {k: torch.tensor(v) for k, v in vals.items()}
    assert cv.in_state(t, {"x": [3.5, 5.0]}, specs).tolist() == [True, False, False, False]
    edges = fe.cv_edges(specs["s"], [vals["s"]], 11)
    np.testing.assert_allclose(edges, np.linspace(-4.0, 7.0, 12))
    edges_x = fe.cv_edges(specs["x"], [vals["x"], np.array([np.nan, 6.0])], 5)
    np.testing.assert_allclose(edges_x, np.linspace(-4.0, 6.0, 6))
    c, f, _ = fe.pmf_1d(vals["x"], specs["x"], edges_x, None, n_bootstrap=0)
    assert np.isfinite(f[0]) and np.isinf(f[1]) and np.isfinite(f[-1])  # 4.0 kept as is
    chunks = fe.chunked_cvs([x[:2], x[2:]], specs, ["x", "s"])
    np.testing.assert_array_equal(chunks["s"], vals["s"])


def test_molecular_systems_reject_feature_cvs(tmp_path):
    from bgflow_mini.systems import SystemConfigError, _check_cvs

    cfg = {"cvs": {"x": {"type": "coordinate", "index": 0}}, "states": {}}
    with pytest.raises(SystemConfigError, match="non-molecular.*'torsion'"):
        _check_cvs(cfg, 22, tmp_path / "system.yaml")
    cfg = {"cvs": {"s": {"type": "linear", "coefficients": [1.0] * 66}}, "states": {}}
    with pytest.raises(SystemConfigError, match="non-molecular"):
        _check_cvs(cfg, 22, tmp_path / "system.yaml")
    cfg = {"cvs": {"d": {"type": "distance", "atoms": [0, 3]}}, "states": {}}
    _check_cvs(cfg, 22, tmp_path / "system.yaml")  # molecular types still fine


# ---- peptides: Ramachandran pairs, CVs of states, overlapping ranges --------------------------
T = {"type": "torsion", "atoms": [0, 1, 2, 3]}
D = {"type": "distance", "atoms": [0, 1]}


def test_ramachandran_pairs_found_by_name():
    cvs = {
        "phi_10": T, "psi_10": T, "chi1_2": T, "phi_2": T, "psi_2": T, "phi_1": T,
        "psi_1": T, "phi_3": T, "psi_3": D, "phi_4": T, "omega_1": T, "phi": T, "psi": T,
    }  # fmt: skip
    assert cv.ramachandran_pairs(cvs) == [
        ("", "phi", "psi"),
        ("1", "phi_1", "psi_1"),
        ("2", "phi_2", "psi_2"),
        ("10", "phi_10", "psi_10"),  # natural order; phi_3 (psi_3 a distance), phi_4 left out
    ]
    assert cv.ramachandran_pairs({"phi": T}) == []
    assert cv.ramachandran_pairs({"phix": T, "psix": T, "phi_": T, "psi_": T}) == []


def test_state_cvs_in_order_and_unknown_ones_named():
    states = {"a": {"phi_1": [0, 1], "chi1_1": [2.5, -2.5]}, "b": {"d": [0, 1], "phi_1": [1, 2]}}
    assert cv.state_cvs(states) == ["phi_1", "chi1_1", "d"]
    with pytest.raises(KeyError, match="state 'b' uses unknown CV 'd'"):
        cv.state_cvs(states, {"phi_1": T, "chi1_1": T})


def test_in_state_is_an_and_over_several_cvs_with_a_range_across_the_cut():
    specs = {"phi": T, "chi1": T, "d": D}
    rng = np.random.default_rng(1)
    n = 5000
    vals = {
        "phi": rng.uniform(-math.pi, math.pi, n),
        "chi1": rng.uniform(-math.pi, math.pi, n),
        "d": rng.uniform(0.0, 0.5, n),
    }
    state = {"phi": [-math.pi, 0.0], "chi1": [2.0, -2.0], "d": [0.1, 0.3]}
    got = np.asarray(cv.in_state(vals, state, specs))
    want = (vals["phi"] < 0) & (np.abs(vals["chi1"]) >= 2.0) & (vals["d"] >= 0.1)
    want &= vals["d"] < 0.3
    np.testing.assert_array_equal(got, want)
    assert 0.03 < got.mean() < 0.08  # about 1/2 * 0.36 * 0.4
    # the same range on a non-periodic CV selects nothing (lo > hi)
    assert not np.asarray(cv.in_state(vals, {"d": [0.3, 0.1]}, specs)).any()


def test_ranges_overlap_and_disjoint_states():
    pi = math.pi
    assert not cv.ranges_overlap([-pi, 0.0], [0.0, 2.0], periodic=True)
    assert cv.ranges_overlap([-3.2, 0.0], [0.0, 3.2], periodic=True)  # both wrap past ±pi
    assert not cv.ranges_overlap([-3.2, 0.0], [0.0, 3.2])  # not periodic: touching only
    assert cv.ranges_overlap([2.5, -2.5], [-pi, -2.8], periodic=True)  # across the cut
    assert not cv.ranges_overlap([2.5, -2.5], [-2.5, 2.5], periodic=True)  # complements
    assert cv.ranges_overlap([0.0, 2 * pi], [1.0, 1.1], periodic=True)  # a full turn
    specs = {"phi": T, "psi": T, "d": D}
    a = {"phi": [-pi, 0.0], "psi": [0.5, 2.5]}
    assert cv.states_disjoint(a, {"phi": [0.0, 2.0]}, specs)
    assert cv.states_disjoint(a, {"phi": [-1.0, 1.0], "psi": [-2.0, 0.5]}, specs)
    assert not cv.states_disjoint(a, {"psi": [1.0, 3.0]}, specs)  # phi < 0 in both possible
    assert not cv.states_disjoint(a, {"d": [0.0, 0.2]}, specs)  # no shared CV
