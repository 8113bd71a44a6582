"""Chirality of alpha carbons (bgflow_mini.chirality): found in a topology, kept by MD,
flipped by a mirror image, counted per centre."""

from __future__ import annotations

from pathlib import Path

import mdtraj as md
import numpy as np
import pytest
import torch

from bgflow_mini import chirality as ch
from bgflow_mini.md import simulate
from bgflow_mini.systems import load_system

PDB = Path(__file__).parents[1] / "systems" / "aldp_vacuum" / "aldp.pdb"


@pytest.fixture(scope="module")
def aldp_md():
    system = load_system("aldp_vacuum")
    res = simulate(system, n_frames=300, save_every=50, seed=3, equilibration_steps=500,
                   progress=False)  # fmt: skip
    return system, res.trajectory.xyz.reshape(300, -1).astype(np.float64)


def test_aldp_has_one_l_alanine_centre(aldp_md):
    system, _ = aldp_md
    centres = ch.chiral_centres(system.mdtraj_topology)
    assert centres == [ch.ChiralCentre("ALA2", (6, 8, 14, 10))]  # N, CA, C, CB; no caps
    ref = ch.reference_signs(system.positions, centres)
    assert ref.tolist() == [-1]
    # independent check that the PDB is L-alanine, i.e. (S): with H away from the viewer,
    # N -> C -> CB runs counter-clockwise, so (N - CA) . ((C - CA) x (CB - CA)) > 0
    n, ca, c, cb = (system.positions[i] for i in centres[0].atoms)
    assert np.dot(n - ca, np.cross(c - ca, cb - ca)) > 0


def test_md_keeps_chirality_and_a_mirror_image_flips_it(aldp_md):
    system, x = aldp_md
    centres = ch.chiral_centres(system.mdtraj_topology)
    ref = ch.reference_signs(system.positions, centres)
    kept, per = ch.chirality_fraction(x, centres, ref)
    assert kept == 1.0 and per.tolist() == [1.0]
    kept, per = ch.chirality_fraction(-x, centres, ref)  # x -> -x: the D enantiomer
    assert kept == 0.0 and per.tolist() == [0.0]
    # half mirrored: 0.5; torch input and (n, atoms, 3) layout give the same
    mixed = np.concatenate([x[:100], -x[100:200]])
    assert ch.chirality_fraction(mixed, centres, ref)[0] == 0.5
    t = torch.as_tensor(mixed.reshape(200, -1, 3))
    assert ch.chirality_fraction(t, centres, ref)[0] == 0.5
    # non-finite coordinates do not count as kept
    bad = x[:10].copy()
    bad[0, 3 * 10] = np.nan  # CB of the first sample
    assert ch.chirality_signs(bad, centres)[0, 0] == 0
    assert ch.chirality_fraction(bad, centres, ref)[0] == pytest.approx(0.9)


def test_several_centres_counted_separately():
    t = md.load(str(PDB))
    two = t.stack(t)  # two copies of ALDP in one topology, as two chains
    centres = ch.chiral_centres(two.topology)
    assert [c.residue for c in centres] == ["0:ALA2", "1:ALA2"]  # unique labels
    assert centres[1].atoms == tuple(i + 22 for i in centres[0].atoms)
    xyz = two.xyz[0].astype(np.float64)
    ref = ch.reference_signs(xyz, centres)
    flipped = xyz.copy()
    flipped[22:] *= -1  # mirror the second copy only
    x = np.stack([xyz, flipped, xyz]).reshape(3, -1)
    kept, per = ch.chirality_fraction(x, centres, ref)
    assert kept == pytest.approx(2 / 3) and per.tolist() == pytest.approx([1.0, 2 / 3])
    with pytest.raises(ValueError, match="2 centres but 1"):
        ch.chirality_fraction(x, centres, ref[:1])


def test_glycine_and_residues_without_cb_are_not_centres():
    top = md.load(str(PDB)).topology
    top.residue(1).name = "GLY"
    assert ch.chiral_centres(top) == []
    top = md.load(str(PDB)).topology
    top.atom(10).name = "CX"  # no atom named CB
    assert ch.chiral_centres(top) == []
    kept, per = ch.chirality_fraction(np.zeros((4, 66)), [], np.zeros(0))
    assert kept == 1.0 and per.shape == (0,)
    with pytest.raises(ValueError, match="planar"):
        centres = ch.chiral_centres(md.load(str(PDB)).topology)
        ch.reference_signs(np.zeros((22, 3)), centres)
