"""Tests of the Z-matrix builder and validator (bgflow_mini.coordinates.zmatrix)."""

from __future__ import annotations

from pathlib import Path

import mdtraj as md
import numpy as np
import pytest
from openmm import app

from bgflow_mini.coordinates import bond_graph, build_zmatrix, validate_zmatrix

ROOT = Path(__file__).resolve().parents[1]
ALDP_PDB = ROOT / "systems" / "aldp_vacuum" / "aldp.pdb"
PEPTIDE_PDB = Path(__file__).resolve().parent / "data" / "ace_phe_pro_nme.pdb"

needs_aldp = pytest.mark.skipif(
    not ALDP_PDB.exists(), reason="systems/aldp_vacuum/aldp.pdb not present (written by systems)"
)


def _angle(x: np.ndarray, i: int, j: int, k: int) -> float:
    u, v = x[i] - x[j], x[k] - x[j]
    return float(np.degrees(np.arctan2(np.linalg.norm(np.cross(u, v)), np.dot(u, v))))


def _check_properties(z: np.ndarray, top: md.Topology, xyz: np.ndarray) -> None:
    """Properties every built Z-matrix must have (independent re-implementation)."""
    n = top.n_atoms
    assert z.shape == (n, 4) and z.dtype == np.int64
    assert sorted(z[:, 0].tolist()) == list(range(n))
    bonds = {frozenset((a.index, b.index)) for a, b in top.bonds}
    heavy = np.array([a.element.symbol != "H" for a in top.atoms])
    placed: list[int] = []
    for i, row in enumerate(z):
        a, refs = int(row[0]), [int(r) for r in row[1:]]
        k = min(i, 3)
        assert all(r == -1 for r in refs[k:])
        assert all(r in placed for r in refs[:k]), f"row {i} references an unplaced atom"
        assert len(set(refs[:k] + [a])) == k + 1
        if k >= 1:
            assert frozenset((a, refs[0])) in bonds, f"row {i}: bond ref not bonded"
        if k >= 2:
            assert 5.0 < _angle(xyz, a, refs[0], refs[1]) < 175.0
            assert frozenset((refs[0], refs[1])) in bonds, f"row {i}: angle ref not bonded"
            assert heavy[refs[1]] or not heavy[a], f"row {i}: heavy atom angle ref is an H"
        if k == 3:
            assert 5.0 < _angle(xyz, refs[0], refs[1], refs[2]) < 175.0
            # improper (sibling of the bond ref) or proper (neighbour of the angle ref)
            assert frozenset((refs[0], refs[2])) in bonds or frozenset(refs[1:]) in bonds
        placed.append(a)
    # heavy atoms first, then hydrogens
    kinds = heavy[z[:, 0]]
    assert not kinds.all() and not kinds[np.argmin(kinds) :].any()
    assert heavy[z[:3, 0]].all()


@needs_aldp
def test_aldp_zmatrix() -> None:
    traj = md.load(str(ALDP_PDB))
    z = build_zmatrix(traj.topology, positions=traj.xyz[0])
    _check_properties(z, traj.topology, traj.xyz[0])
    assert traj.n_atoms == 22
    # most central heavy atom is the C-alpha; N and C follow
    names = [a.name for a in traj.topology.atoms]
    assert [names[i] for i in z[:3, 0]] == ["CA", "N", "C"]
    torsions = {tuple(r) for r in z[3:].tolist()} | {tuple(r[::-1]) for r in z[3:].tolist()}
    phi = tuple(md.compute_phi(traj)[0][0].tolist())
    psi = tuple(md.compute_psi(traj)[0][0].tolist())
    assert phi in torsions and psi in torsions  # both backbone dihedrals are features
    # methyl hydrogens: the first one proper (heavy refs), the other two relative to it
    ch3 = [r for r in z.tolist() if r[1] == 1]
    assert len(ch3) == 3
    assert names[ch3[0][3]] == "N" and ch3[1][3] == ch3[0][0] == ch3[2][3]


@needs_aldp
def test_aldp_openmm_topology_gives_same_zmatrix() -> None:
    traj = md.load(str(ALDP_PDB))
    pdb = app.PDBFile(str(ALDP_PDB))
    z_md = build_zmatrix(traj.topology)
    z_mm = build_zmatrix(pdb.topology)
    np.testing.assert_array_equal(z_md, z_mm)
    validate_zmatrix(z_md, traj.xyz[0], pdb.topology)


@pytest.mark.skipif(
    not PEPTIDE_PDB.exists(),
    reason="tests/data/ace_phe_pro_nme.pdb missing (make_ace_phe_pro_nme.py)",
)
def test_peptide_with_rings() -> None:
    traj = md.load(str(PEPTIDE_PDB))
    assert traj.n_atoms == 46 and traj.topology.n_bonds == 47  # two rings
    z = build_zmatrix(traj.topology, positions=traj.xyz[0])
    _check_properties(z, traj.topology, traj.xyz[0])
    names = [str(a) for a in traj.topology.atoms]
    assert names[z[0, 0]] == "PHE2-CA"


def test_bond_list_input_and_hydrogen_mask() -> None:
    # ethanol C0 C1 O2, H3-5 on C0, H6-7 on C1, H8 on O2
    bonds = [(0, 1), (1, 2), (0, 3), (0, 4), (0, 5), (1, 6), (1, 7), (2, 8)]
    h = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1], dtype=bool)
    z = build_zmatrix(bonds, hydrogens=h)
    assert z[0, 0] == 1 and set(z[1:3, 0]) == {0, 2}
    assert h[z[3:, 0]].all()
    n, b, is_h = bond_graph(np.asarray(bonds))
    assert n == 9 and b.shape == (8, 2) and not is_h.any()
    z_all_heavy = build_zmatrix(bonds)
    validate_zmatrix(z_all_heavy, topology_or_bonds=(9, np.asarray(bonds)))


def test_collinear_start_is_avoided() -> None:
    # acetonitrile: H3C-C#N is linear, so (N, C, CH3) must not be an angle triple
    pos = np.array(
        [[0, 0, 0], [0.146, 0, 0], [0.262, 0, 0], [-0.036, 0.103, 0]]
        + [[-0.036, -0.051, 0.089], [-0.036, -0.051, -0.089]]
    )
    bonds = [(0, 1), (1, 2), (0, 3), (0, 4), (0, 5)]
    h = [False, False, False, True, True, True]
    naive = build_zmatrix(bonds, hydrogens=h)  # without positions the linear triple is used
    with pytest.raises(ValueError, match=r"row 2 .*collinear"):
        validate_zmatrix(naive, pos)
    z = build_zmatrix(bonds, hydrogens=h, positions=pos)
    validate_zmatrix(z, pos, bonds)


def test_disconnected_and_tiny_graphs_raise() -> None:
    with pytest.raises(ValueError, match="not connected"):
        build_zmatrix([(0, 1), (1, 2), (3, 4), (4, 5)])
    with pytest.raises(ValueError, match="at least 3"):
        build_zmatrix([(0, 1)])
    with pytest.raises(ValueError, match="shape"):
        build_zmatrix(np.zeros((3, 3), dtype=int))
    with pytest.raises(ValueError, match="positions"):
        build_zmatrix([(0, 1), (1, 2)], positions=np.zeros((2, 3)))


GOOD = np.array([[1, -1, -1, -1], [0, 1, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0]])
CHAIN_BONDS = [(0, 1), (1, 2), (2, 3)]
ZIGZAG = np.array([[0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.2, 0.14, 0.0], [0.35, 0.14, 0.05]])


@pytest.mark.parametrize(
    "zmatrix, match",
    [
        (np.array([[1, -1, -1, -1], [0, 1, -1, -1], [0, 1, 2, -1], [3, 2, 1, 0]]), "duplicated"),
        (np.array([[1, -1, -1, -1], [0, 1, -1, -1], [2, 1, 0, -1], [4, 2, 1, 0]]), "row 3"),
        (np.array([[1, -1, -1, -1], [0, 1, -1, -1], [2, 3, 0, -1], [3, 2, 1, 0]]), "row 2"),
        (np.array([[1, -1, -1, -1], [0, 1, -1, -1], [2, 1, 1, -1], [3, 2, 1, 0]]), "row 2"),
        (np.array([[1, -1, -1, -1], [0, 1, 2, -1], [2, 1, 0, -1], [3, 2, 1, 0]]), "row 1"),
        (np.array([[1, -1, -1, -1], [0, 1, -1, -1], [2, 1, 0, -1], [3, 2, 1, -1]]), "row 3"),
        (np.array([[1, 0, -1, -1], [0, 1, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0]]), "row 0"),
        (np.array([[1, -1, -1], [0, 1, -1]]), "shape"),
        (np.array([[0, -1, -1, -1], [1, 0, -1, -1]]), "at least 3"),
    ],
)
def test_invalid_zmatrices_raise(zmatrix: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_zmatrix(zmatrix)


def test_validate_checks_bonds_and_collinearity() -> None:
    assert validate_zmatrix(GOOD, ZIGZAG, CHAIN_BONDS).shape == (4, 4)
    not_bonded = np.array([[1, -1, -1, -1], [0, 1, -1, -1], [2, 1, 0, -1], [3, 1, 2, 0]])
    validate_zmatrix(not_bonded)  # structurally fine ...
    with pytest.raises(ValueError, match=r"row 3: atom 3 is not bonded"):
        validate_zmatrix(not_bonded, topology_or_bonds=CHAIN_BONDS)  # ... but 3-1 is no bond
    linear = ZIGZAG.copy()
    linear[3] = linear[2] + 2.0 * (linear[2] - linear[1])  # atoms 1, 2, 3 on a line
    with pytest.raises(ValueError, match=r"row 3 \(atom 3\).*collinear"):
        validate_zmatrix(GOOD, linear)
    with pytest.raises(ValueError, match="has 4 atoms but the topology has 5"):
        validate_zmatrix(GOOD, topology_or_bonds=[(0, 1), (1, 2), (2, 3), (3, 4)])
