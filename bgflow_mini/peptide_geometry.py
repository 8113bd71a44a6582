"""Heavy-atom geometry of a linear peptide from its sequence (PeptideBuilder), with caps.

:func:`build_peptide` places every heavy atom of a chain of standard L-amino acids from
ideal internal coordinates (PeptideBuilder, on biopython), all residues at the same
backbone torsions (polyproline II by default: phi = -75 deg, psi = 145 deg, an extended
chain without clashes at any length; proline at phi = -65 deg, which its ring fixes) and
trans peptide bonds. Caps are made from two extra glycines built at the chain ends:

- ACE (acetyl): the first glycine's CA becomes the methyl carbon CH3, its C and O are kept,
  its N is dropped;
- NME (N-methylamide): the last glycine's N is kept, its CA becomes the methyl carbon C
  (the name OpenMM's amber templates use), its C and O are dropped.

Zwitterionic chains get the terminal OXT instead. The result is an OpenMM topology with
the standard bonds (no hydrogens: :mod:`bgflow_mini.system_builder` adds them with
``openmm.app.Modeller``) and positions in nm.

:func:`peptide_cvs` and :func:`peptide_states` name the torsion CVs and states of any
single-chain peptide topology (see :mod:`bgflow_mini.system_builder`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from openmm import app

__all__ = [
    "THREE_TO_ONE",
    "ONE_TO_THREE",
    "AMINO_ACIDS",
    "CAPS",
    "CHI1_ATOM",
    "CHI2_ATOM",
    "AROMATIC",
    "DEFAULT_PHI",
    "DEFAULT_PSI",
    "PROLINE_PHI",
    "VARIANTS",
    "PUCKER",
    "ROTAMERS",
    "build_peptide",
    "peptide_cvs",
    "peptide_states",
]

THREE_TO_ONE: dict[str, str] = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C",
    "GLN": "Q", "GLU": "E", "GLY": "G", "HIS": "H", "ILE": "I",
    "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F", "PRO": "P",
    "SER": "S", "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V",
}  # fmt: skip
"""The 20 standard amino acids: three-letter -> one-letter code."""
ONE_TO_THREE: dict[str, str] = {one: three for three, one in THREE_TO_ONE.items()}
AMINO_ACIDS: tuple[str, ...] = tuple(THREE_TO_ONE)
CAPS: tuple[str, ...] = ("ACE", "NME")
"""Amber cap residues: acetyl (N-terminal) and N-methylamide (C-terminal)."""
CHI1_ATOM: dict[str, str] = {
    "ARG": "CG", "ASN": "CG", "ASP": "CG", "CYS": "SG", "GLN": "CG", "GLU": "CG",
    "HIS": "CG", "ILE": "CG1", "LEU": "CG", "LYS": "CG", "MET": "CG", "PHE": "CG",
    "PRO": "CG", "SER": "OG", "THR": "OG1", "TRP": "CG", "TYR": "CG", "VAL": "CG1",
}  # fmt: skip
"""Fourth atom of the side-chain torsion chi1 = N-CA-CB-<atom> (mdtraj's choice)."""
CHI2_ATOM: dict[str, str] = {
    "ARG": "CD", "ASN": "OD1", "ASP": "OD1", "GLN": "CD", "GLU": "CD", "HIS": "ND1",
    "ILE": "CD1", "LEU": "CD1", "LYS": "CD", "MET": "SD", "PHE": "CD1", "PRO": "CD",
    "TRP": "CD1", "TYR": "CD1",
}  # fmt: skip
"""Fourth atom of chi2 = CA-CB-<chi1's atom>-<atom> (mdtraj's choice; e.g. Trp's indole
flip between its two modes, near -110 and +80 degrees in vacuum)."""
VARIANTS: dict[str, str] = {"HID": "HIS", "HIE": "HIS", "HIP": "HIS", "CYX": "CYS", "CYM": "CYS",
                            "ASH": "ASP", "GLH": "GLU", "LYN": "LYS"}  # fmt: skip
"""Protonation-variant residue names -> standard name."""
AROMATIC: tuple[str, ...] = ("PHE", "TYR", "TRP", "HIS")
PUCKER: dict[str, list[float]] = {"down": [0.0, 1.2], "up": [-1.2, 0.0]}
"""Proline ring pucker as chi1 ranges (rad): down = C-gamma endo (chi1 > 0), up = exo."""
ROTAMERS: dict[str, list[float]] = {
    "plus": [0.0, 2 * math.pi / 3],
    "trans": [2 * math.pi / 3, 4 * math.pi / 3],  # wraps across +-pi
    "minus": [-2 * math.pi / 3, 0.0],
}
"""chi1 rotamers (rad) named by the sign of chi1 (Lovell's p / t / m)."""
DEFAULT_PHI = -75.0  # deg, polyproline II
DEFAULT_PSI = 145.0  # deg
PROLINE_PHI = -65.0  # deg


def _peptidebuilder():
    try:
        import PeptideBuilder
        from PeptideBuilder import Geometry
    except ImportError as err:  # an optional extra
        raise ImportError(
            "building a peptide from a sequence needs PeptideBuilder and biopython: "
            "pip install PeptideBuilder biopython (or pip install 'bgflow_mini[system]')"
        ) from err
    return PeptideBuilder, Geometry


def build_peptide(
    residues: Sequence[str],
    termini: str = "capped",
    phi: float = DEFAULT_PHI,
    psi: float = DEFAULT_PSI,
) -> tuple[app.Topology, np.ndarray]:
    """Heavy atoms of a peptide of standard L-amino acids, one chain ``A``.

    Arguments:
        residues: three-letter codes of :data:`AMINO_ACIDS`, N- to C-terminus.
        termini: ``"capped"`` (ACE-...-NME) or ``"zwitterion"`` (free termini with OXT;
            the charges come with the hydrogens added later).
        phi, psi: backbone torsions of every residue in degrees (proline: phi =
            :data:`PROLINE_PHI`).

    Returns:
        ``(topology, positions)``: OpenMM topology with standard bonds, residues numbered
        from 1 (caps included), and heavy-atom positions of shape (n_atoms, 3) in nm.
    """
    unknown = [r for r in residues if r not in THREE_TO_ONE]
    if not residues or unknown:
        raise ValueError(f"residues must be among {list(AMINO_ACIDS)}, got {list(residues)}")
    if termini not in ("capped", "zwitterion"):
        raise ValueError(f"termini must be 'capped' or 'zwitterion', got {termini!r}")
    builder, geometry = _peptidebuilder()
    codes = [THREE_TO_ONE[r] for r in residues]
    capped = termini == "capped"
    if capped:
        codes = ["G", *codes, "G"]
    geos = []
    for code in codes:
        geo = geometry.geometry(code)
        geo.phi = PROLINE_PHI if code == "P" else float(phi)  # phi of this residue
        geo.psi_im1 = float(psi)  # psi of the residue before it
        geo.omega = 180.0  # trans peptide bond to the residue before
        geos.append(geo)
    structure = builder.make_structure_from_geos(geos)
    if not capped:
        builder.add_terminal_OXT(structure)
    built = list(structure[0]["A"])

    topology = app.Topology()
    chain = topology.addChain("A")
    positions = []
    for i, res in enumerate(built):
        name = res.get_resname()
        atoms = [(a.get_id(), a.element, a.get_coord()) for a in res]
        if capped and i == 0:  # GLY -> ACE
            name = "ACE"
            atoms = [("CH3" if a == "CA" else a, e, x) for a, e, x in atoms if a != "N"]
        elif capped and i == len(built) - 1:  # GLY -> NME
            name = "NME"
            atoms = [("C" if a == "CA" else a, e, x) for a, e, x in atoms if a in ("N", "CA")]
        residue = topology.addResidue(name, chain, id=str(i + 1))
        for atom_name, element, xyz in atoms:
            topology.addAtom(atom_name, app.Element.getBySymbol(element), residue)
            positions.append(np.asarray(xyz, dtype=np.float64) / 10.0)  # Angstrom -> nm
    topology.createStandardBonds()
    return topology, np.stack(positions)


def _atom(residue: app.Residue, name: str) -> int | None:
    return next((a.index for a in residue.atoms() if a.name == name), None)


def _amino_acids(topology: app.Topology) -> list[tuple[int, app.Residue, str]]:
    """(number k = 1.., residue, base name) of every residue that is not a cap."""
    residues = [r for r in topology.residues() if r.name not in CAPS]
    return [(k, r, VARIANTS.get(r.name, r.name)) for k, r in enumerate(residues, 1)]


def peptide_cvs(topology: app.Topology) -> dict[str, dict[str, Any]]:
    """Torsion CVs phi, psi, chi1, chi2 of every non-cap residue that has them (0-based
    atom indices, the atoms mdtraj uses); suffix ``_k`` (k = 1..n) unless there is a single
    residue.
    Proline also gets ``omega`` of the peptide bond before it (CA or the ACE methyl, C,
    N, CA): X-Pro bonds are cis in a few per cent of frames (ACE-Pro in vacuum: 6 %)."""
    residues, amino = list(topology.residues()), _amino_acids(topology)
    cvs: dict[str, dict[str, Any]] = {}
    for k, res, base in amino:
        sfx = "" if len(amino) == 1 else f"_{k}"
        n, ca, c, cb = (_atom(res, a) for a in ("N", "CA", "C", "CB"))
        prev = _atom(residues[res.index - 1], "C") if res.index > 0 else None
        nxt = _atom(residues[res.index + 1], "N") if res.index + 1 < len(residues) else None
        gamma = _atom(res, CHI1_ATOM[base]) if base in CHI1_ATOM else None
        delta = _atom(res, CHI2_ATOM[base]) if base in CHI2_ATOM else None
        terms = [("phi", (prev, n, ca, c)), ("psi", (n, ca, c, nxt)), ("chi1", (n, ca, cb, gamma))]
        terms.append(("chi2", (ca, cb, gamma, delta)))
        if base == "PRO" and res.index > 0:
            before = residues[res.index - 1]
            ca_prev = (
                _atom(before, "CA") if _atom(before, "CA") is not None else _atom(before, "CH3")
            )
            terms.append(("omega", (ca_prev, prev, n, ca)))
        for cv, atoms in terms:
            if all(i is not None for i in atoms):
                cvs[f"{cv}{sfx}"] = {"type": "torsion", "atoms": [int(i) for i in atoms]}
    return cvs


def peptide_states(
    topology: app.Topology, cvs: dict[str, dict[str, Any]]
) -> dict[str, dict[str, list[float]]]:
    """States (radians): phi sign per residue (proline: ring pucker on chi1), then the
    proline peptide bond (``omega_trans`` / ``omega_cis``) and the chi1 rotamers of
    aromatic residues (:data:`PUCKER`, :data:`ROTAMERS`; as in
    :mod:`bgflow_mini.system_builder`)."""
    amino = _amino_acids(topology)
    backbone: dict[str, dict[str, list[float]]] = {}
    rotamers: dict[str, dict[str, list[float]]] = {}
    for k, _, base in amino:
        sfx = "" if len(amino) == 1 else f"_{k}"
        phi, chi1 = f"phi{sfx}", f"chi1{sfx}"
        if base == "PRO" and chi1 in cvs:
            for label, rng in PUCKER.items():
                backbone[f"pucker{sfx}_{label}"] = {chi1: list(rng)}
        elif phi in cvs:
            backbone[f"{phi}_negative"] = {phi: [-math.pi, 0.0]}
            backbone[f"{phi}_positive"] = {phi: [0.0, 2.0]}
        omega = f"omega{sfx}"
        if base == "PRO" and omega in cvs:  # trans written as [pi/2, 3 pi/2]: wraps
            rotamers[f"{omega}_trans"] = {omega: [math.pi / 2, 3 * math.pi / 2]}
            rotamers[f"{omega}_cis"] = {omega: [-math.pi / 2, math.pi / 2]}
        if base in AROMATIC and chi1 in cvs:
            for label, rng in ROTAMERS.items():
                rotamers[f"{chi1}_{label}"] = {chi1: list(rng)}
    return {**backbone, **rotamers}
