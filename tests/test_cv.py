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
