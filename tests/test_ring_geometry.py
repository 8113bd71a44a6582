"""ring_bond_stats: ring bond lengths of samples against MD."""

from __future__ import annotations

from pathlib import Path

import mdtraj as md
import numpy as np

from bgflow_mini.ring_geometry import ring_bond_stats, ring_bonds

PDB = Path(__file__).resolve().parent / "data" / "ace_phe_pro_nme.pdb"


def test_ring_bonds_and_stats() -> None:
    traj = md.load(str(PDB))
    top = traj.topology
    bonds = ring_bonds(top)
    assert len(bonds) == 6 + 5  # Phe and Pro rings
    assert ring_bonds(md.load(str(PDB)).atom_slice(range(6)).topology) == []
    rng = np.random.default_rng(0)
    ref = traj.xyz.reshape(1, -1) + 0.002 * rng.normal(size=(2000, 3 * top.n_atoms))
    same = ring_bond_stats(ref[:1000], ref[1000:], top)
    assert same["n_ring_bonds"] == 11 and 0.9 < same["min_std_ratio"] <= same["max_std_ratio"] < 1.1
    assert same["max_mean_rel_error"] < 0.005
    # stretch one ring bond: its mean moves and the fraction >5% off rises
    xyz = ref[:1000].reshape(1000, -1, 3).copy()
    i, j = bonds[0]
    xyz[:, j] += 0.1 * (xyz[:, j] - xyz[:, i])
    bad = ring_bond_stats(xyz.reshape(1000, -1), ref[1000:], top)
    stretched = [v for v in bad["bonds"].values() if v["mean_rel_error"] > 0.09]
    assert len(stretched) == 1 and stretched[0]["off_5pct"] > 0.9
    assert bad["max_mean_rel_error"] > 0.09
    finite = np.zeros(1000, dtype=bool)
    finite[:10] = True
    assert ring_bond_stats(ref[:1000], ref[1000:], top, finite)["bonds"]
    assert (
        ring_bond_stats(ref[:10], ref[10:20], md.load(str(PDB)).atom_slice(range(6)).topology) == {}
    )
