"""Build the alanine dipeptide (ACE-ALA-NME) reference structure from scratch.

No alanine dipeptide PDB ships with OpenMM or mdtraj, so this script builds one
deterministically:

1. All 22 atoms are placed from ideal internal coordinates (bond lengths in nm,
   angles and dihedrals in degrees) with the natural-extension reference frame
   (NeRF) construction, starting in the C7eq basin (phi = -83 deg, psi = 73 deg),
   with trans peptide bonds, an L-alanine C-alpha (checked below) and staggered
   methyl groups.
2. The structure is energy-minimised with OpenMM (amber99sbildn.xml, NoCutoff,
   no constraints, Reference platform, tolerance 0.1 kJ/mol/nm).
3. Geometry checks (bond lengths, phi/psi window, chirality) are run and the
   result is written with ``openmm.app.PDBFile.writeFile`` (standard residues,
   no CONECT records) to ``aldp_vacuum/aldp.pdb`` and ``aldp_implicit/aldp.pdb``.

Atom order and names (0-based) follow the usual alanine dipeptide files::

    ACE:  0 HH31  1 CH3  2 HH32  3 HH33  4 C  5 O
    ALA:  6 N  7 H  8 CA  9 HA  10 CB  11 HB1  12 HB2  13 HB3  14 C  15 O
    NME: 16 N  17 H  18 C  19 H1  20 H2  21 H3

so phi = (4, 6, 8, 14) and psi = (6, 8, 14, 16). OpenMM and mdtraj both map
these names onto their internal templates (``pdbNames.xml``).

Usage::

    python systems/make_aldp.py            # writes both PDB files next to this script
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import openmm
from openmm import app, unit

__all__ = ["ATOMS", "build_initial_positions", "minimise", "main"]

# (residue, atom name, element) in file order
ATOMS: list[tuple[str, str, str]] = [
    ("ACE", "HH31", "H"),
    ("ACE", "CH3", "C"),
    ("ACE", "HH32", "H"),
    ("ACE", "HH33", "H"),
    ("ACE", "C", "C"),
    ("ACE", "O", "O"),
    ("ALA", "N", "N"),
    ("ALA", "H", "H"),
    ("ALA", "CA", "C"),
    ("ALA", "HA", "H"),
    ("ALA", "CB", "C"),
    ("ALA", "HB1", "H"),
    ("ALA", "HB2", "H"),
    ("ALA", "HB3", "H"),
    ("ALA", "C", "C"),
    ("ALA", "O", "O"),
    ("NME", "N", "N"),
    ("NME", "H", "H"),
    ("NME", "C", "C"),
    ("NME", "H1", "H"),
    ("NME", "H2", "H"),
    ("NME", "H3", "H"),
]

PHI0 = -83.0  # deg, C7eq
PSI0 = 73.0  # deg

# (atom, bond partner, angle partner, dihedral partner, bond nm, angle deg, dihedral deg);
# build order differs from file order, all indices are file indices
ZMATRIX: list[tuple[int, int, int, int, float, float, float]] = [
    (6, 4, 1, -1, 0.1335, 116.6, 180.0),  # N   (dihedral ref: a virtual seed point)
    (8, 6, 4, 1, 0.1458, 121.9, 180.0),  # CA  omega(ACE) trans
    (14, 8, 6, 4, 0.1525, 111.2, PHI0),  # C   phi
    (16, 14, 8, 6, 0.1335, 116.2, PSI0),  # N   psi
    (18, 16, 14, 8, 0.1449, 121.9, 180.0),  # C   omega(NME) trans
    (5, 4, 6, 8, 0.1229, 122.9, 0.0),  # O   (ACE)
    (15, 14, 16, 18, 0.1229, 122.9, 0.0),  # O   (ALA)
    (7, 6, 4, 5, 0.1010, 119.8, 180.0),  # H   (ALA N)
    (17, 16, 14, 15, 0.1010, 119.8, 180.0),  # H   (NME N)
    (10, 8, 14, 6, 0.1530, 110.1, 122.7),  # CB  (L-alanine, checked by chirality test)
    (9, 8, 6, 14, 0.1090, 109.5, 118.0),  # HA
    (11, 10, 8, 6, 0.1090, 109.5, 60.0),  # HB1
    (12, 10, 8, 6, 0.1090, 109.5, 180.0),  # HB2
    (13, 10, 8, 6, 0.1090, 109.5, -60.0),  # HB3
    (0, 1, 4, 6, 0.1090, 109.5, 0.0),  # HH31 (ACE methyl)
    (2, 1, 4, 6, 0.1090, 109.5, 120.0),  # HH32
    (3, 1, 4, 6, 0.1090, 109.5, -120.0),  # HH33
    (19, 18, 16, 14, 0.1090, 109.5, 180.0),  # H1 (NME methyl)
    (20, 18, 16, 14, 0.1090, 109.5, 60.0),  # H2
    (21, 18, 16, 14, 0.1090, 109.5, -60.0),  # H3
]


def _place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle: float, dih: float):
    """NeRF: position d with |cd| = bond, angle(b, c, d) = angle, dihedral(a, b, c, d) = dih."""
    theta, phi = np.deg2rad(angle), np.deg2rad(dih)
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d2 = np.array([-bond * np.cos(theta), bond * np.sin(theta) * np.cos(phi),
                   bond * np.sin(theta) * np.sin(phi)])  # fmt: skip
    return c + d2[0] * bc + d2[1] * m + d2[2] * n


def build_initial_positions() -> np.ndarray:
    """Ideal-geometry positions of shape (22, 3) in nm (file atom order)."""
    x = np.full((len(ATOMS), 3), np.nan)
    # seed: ACE CH3 (1), ACE C (4) and a virtual point fixing the initial plane
    x[1] = [0.0, 0.0, 0.0]
    x[4] = [0.152, 0.0, 0.0]
    virtual = np.array([0.0, 0.1, 0.0])
    # N is placed from (virtual, CH3, C); all others from placed atoms
    for i, (atom, j, k, l_, bond, angle, dih) in enumerate(ZMATRIX):
        ref_l = virtual if i == 0 else x[l_]
        x[atom] = _place(ref_l, x[k], x[j], bond, angle, dih)
    assert np.isfinite(x).all()
    return x


def make_topology() -> app.Topology:
    """OpenMM topology with the ACE/ALA/NME residues in file order (bonds via templates)."""
    top = app.Topology()
    chain = top.addChain("A")
    residues: dict[str, app.Residue] = {}
    for resname, name, element in ATOMS:
        if resname not in residues:
            residues[resname] = top.addResidue(resname, chain)
        top.addAtom(name, app.Element.getBySymbol(element), residues[resname])
    return top


def _roundtrip(top: app.Topology, x: np.ndarray) -> app.PDBFile:
    buf = io.StringIO()
    app.PDBFile.writeFile(top, x * unit.nanometer, buf)
    return app.PDBFile(io.StringIO(buf.getvalue()))


def minimise(pdb: app.PDBFile, tolerance: float = 0.1) -> tuple[np.ndarray, float, float]:
    """Minimise with amber99sbildn (vacuum); returns (positions nm, E_before, E_after kJ/mol)."""
    ff = app.ForceField("amber99sbildn.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    integrator = openmm.VerletIntegrator(0.001)
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(pdb.positions)
    e0 = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    openmm.LocalEnergyMinimizer.minimize(ctx, tolerance, 0)
    state = ctx.getState(getEnergy=True, getPositions=True)
    e1 = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    x = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    return x, e0, e1


def _dihedral(x: np.ndarray, idx: tuple[int, int, int, int]) -> float:
    p0, p1, p2, p3 = (x[i] for i in idx)
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / np.linalg.norm(b1)
    v = b0 - np.dot(b0, b1) * b1
    w = b2 - np.dot(b2, b1) * b1
    return float(np.arctan2(np.dot(np.cross(b1, v), w), np.dot(v, w)))


def check(top: app.Topology, x: np.ndarray) -> dict[str, float]:
    """Geometry sanity checks; raises AssertionError on a bad structure."""
    lengths = np.array([np.linalg.norm(x[a.index] - x[b.index]) for a, b in top.bonds()])
    assert top.getNumBonds() == 21, top.getNumBonds()
    assert 0.095 < lengths.min() and lengths.max() < 0.16, (lengths.min(), lengths.max())
    phi, psi = _dihedral(x, (4, 6, 8, 14)), _dihedral(x, (6, 8, 14, 16))
    assert -2.5 < phi < -1.0 and 0.5 < psi < 3.0, (phi, psi)
    ca = x[8]
    chirality = np.dot(x[6] - ca, np.cross(x[14] - ca, x[10] - ca))
    assert chirality > 0, "C-alpha is not L"  # same sign as the L residues in OpenMM's test.pdb
    return {"phi": phi, "psi": psi, "bond_min": lengths.min(), "bond_max": lengths.max()}


def main(out_dir: Path | None = None) -> None:
    here = Path(__file__).resolve().parent if out_dir is None else Path(out_dir)
    top = make_topology()
    pdb = _roundtrip(top, build_initial_positions())
    x, e0, e1 = minimise(pdb)
    info = check(pdb.topology, x)
    print(f"energy before/after minimisation: {e0:.2f} / {e1:.2f} kJ/mol")
    print(
        "phi={phi:.3f} rad psi={psi:.3f} rad bonds in [{bond_min:.4f}, {bond_max:.4f}] nm".format(
            **info
        )
    )
    for variant in ("aldp_vacuum", "aldp_implicit"):
        path = here / variant / "aldp.pdb"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            # write with the file's own names (top), not the internal ones after reading
            app.PDBFile.writeFile(top, x * unit.nanometer, fh)
        print(f"wrote {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
