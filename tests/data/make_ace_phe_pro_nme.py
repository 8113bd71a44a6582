"""Build ``ace_phe_pro_nme.pdb``: a capped dipeptide with two rings (test molecule).

Heavy atoms are placed from ideal internal coordinates (NeRF), hydrogens are added
with ``openmm.app.Modeller.addHydrogens`` and the structure is minimised with
amber99sbildn (NoCutoff, vacuum).  46 atoms; the phenyl ring tests side-chain ring
closure, the proline ring closes onto the backbone N.

Usage::

    python tests/data/make_ace_phe_pro_nme.py   # writes the PDB next to this script
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openmm
from openmm import app, unit

__all__ = ["build", "main"]


def _place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle: float, dih: float):
    """NeRF: d with |cd| = bond (nm), angle(b, c, d) = angle, dihedral(a, b, c, d) = dih."""
    theta, phi = np.deg2rad(angle), np.deg2rad(dih)
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    r = bond * np.sin(theta)
    return c - bond * np.cos(theta) * bc + r * np.cos(phi) * m + r * np.sin(phi) * n


def _cbeta(n: np.ndarray, ca: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Ideal L-amino-acid C-beta from the backbone (the usual Angstrom-based formula)."""
    n, ca, c = 10 * n, 10 * ca, 10 * c
    b, cc = ca - n, c - ca
    a = np.cross(b, cc)
    return (-0.58273431 * a + 0.56802827 * b - 0.54067466 * cc + ca) / 10


def build() -> tuple[app.Topology, np.ndarray]:
    """Heavy-atom topology (standard bonds) and positions (nm)."""
    x: dict[str, np.ndarray] = {}
    x["ACE:CH3"] = np.zeros(3)
    x["ACE:C"] = np.array([0.152, 0.0, 0.0])
    seed = np.array([0.0, 0.1, 0.0])
    x["PHE:N"] = _place(seed, x["ACE:CH3"], x["ACE:C"], 0.1335, 116.6, 180.0)
    x["PHE:CA"] = _place(x["ACE:CH3"], x["ACE:C"], x["PHE:N"], 0.1458, 121.9, 180.0)
    x["PHE:C"] = _place(x["ACE:C"], x["PHE:N"], x["PHE:CA"], 0.1525, 111.2, -75.0)
    x["PRO:N"] = _place(x["PHE:N"], x["PHE:CA"], x["PHE:C"], 0.1335, 116.2, 150.0)
    x["PRO:CA"] = _place(x["PHE:CA"], x["PHE:C"], x["PRO:N"], 0.1458, 121.9, 180.0)
    x["PRO:C"] = _place(x["PHE:C"], x["PRO:N"], x["PRO:CA"], 0.1525, 111.2, -65.0)
    x["NME:N"] = _place(x["PRO:N"], x["PRO:CA"], x["PRO:C"], 0.1335, 116.2, 140.0)
    x["NME:C"] = _place(x["PRO:CA"], x["PRO:C"], x["NME:N"], 0.1449, 121.9, 180.0)
    x["ACE:O"] = _place(x["PHE:CA"], x["PHE:N"], x["ACE:C"], 0.1229, 122.9, 0.0)
    x["PHE:O"] = _place(x["PRO:CA"], x["PRO:N"], x["PHE:C"], 0.1229, 122.9, 0.0)
    x["PRO:O"] = _place(x["NME:C"], x["NME:N"], x["PRO:C"], 0.1229, 122.9, 0.0)
    for res in ("PHE", "PRO"):
        x[f"{res}:CB"] = _cbeta(x[f"{res}:N"], x[f"{res}:CA"], x[f"{res}:C"])
    n_, ca, cb = x["PHE:N"], x["PHE:CA"], x["PHE:CB"]
    x["PHE:CG"] = _place(n_, ca, cb, 0.151, 114.0, -60.0)
    x["PHE:CD1"] = _place(ca, cb, x["PHE:CG"], 0.139, 120.0, 90.0)
    x["PHE:CD2"] = _place(ca, cb, x["PHE:CG"], 0.139, 120.0, -90.0)
    x["PHE:CE1"] = _place(cb, x["PHE:CG"], x["PHE:CD1"], 0.139, 120.0, 180.0)
    x["PHE:CE2"] = _place(cb, x["PHE:CG"], x["PHE:CD2"], 0.139, 120.0, 180.0)
    x["PHE:CZ"] = _place(x["PHE:CG"], x["PHE:CD1"], x["PHE:CE1"], 0.139, 120.0, 0.0)
    n_, ca, cb = x["PRO:N"], x["PRO:CA"], x["PRO:CB"]
    x["PRO:CG"] = _place(n_, ca, cb, 0.150, 104.5, 30.0)
    x["PRO:CD"] = _place(ca, cb, x["PRO:CG"], 0.150, 105.0, -35.0)

    order = {
        "ACE": ["CH3", "C", "O"],
        "PHE": ["N", "CA", "CB", "CG", "CD1", "CE1", "CZ", "CE2", "CD2", "C", "O"],
        "PRO": ["N", "CD", "CG", "CB", "CA", "C", "O"],
        "NME": ["N", "C"],
    }
    top = app.Topology()
    chain = top.addChain("A")
    pos = []
    for resname, names in order.items():
        res = top.addResidue(resname, chain)
        for name in names:
            top.addAtom(name, app.Element.getBySymbol(name[0]), res)
            pos.append(x[f"{resname}:{name}"])
    top.createStandardBonds()
    return top, np.asarray(pos)


def main(out: Path | None = None) -> Path:
    out = Path(__file__).resolve().parent / "ace_phe_pro_nme.pdb" if out is None else out
    top, pos = build()
    ring_gap = np.linalg.norm(pos[18] - pos[19])  # PRO N - CD before minimisation
    assert 0.12 < ring_gap < 0.2, ring_gap
    ff = app.ForceField("amber99sbildn.xml")
    modeller = app.Modeller(top, pos * unit.nanometer)
    modeller.addHydrogens(ff)
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    integrator = openmm.VerletIntegrator(0.001)
    platform = openmm.Platform.getPlatformByName("Reference")
    ctx = openmm.Context(system, integrator, platform)
    ctx.setPositions(modeller.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 0.1)
    state = ctx.getState(getPositions=True, getEnergy=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    xyz = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    atoms = {(a.residue.name, a.name): a.index for a in modeller.topology.atoms()}
    n_, ca, c, cb = (xyz[atoms[("PHE", k)]] for k in ("N", "CA", "C", "CB"))
    assert np.dot(n_ - ca, np.cross(c - ca, cb - ca)) > 0, "PHE C-alpha is not L"
    lengths = [np.linalg.norm(xyz[a.index] - xyz[b.index]) for a, b in modeller.topology.bonds()]
    assert 0.09 < min(lengths) and max(lengths) < 0.16, (min(lengths), max(lengths))
    with open(out, "w") as f:
        app.PDBFile.writeFile(modeller.topology, xyz * unit.nanometer, f)
    print(f"{out.name}: {modeller.topology.getNumAtoms()} atoms, E = {energy:.1f} kJ/mol")
    return out


if __name__ == "__main__":
    main()
