"""Chirality of the alpha carbons: does a generated peptide keep its L (or D) residues?

A flow on internal coordinates can place an alpha carbon's side chain on the wrong side
(a D residue from an L one) when the torsion that places CB is learnt wide. The force
field barely notices (most of the energy is the same for both hands), so such samples
keep finite weights and bias reweighted free energies. This module finds every chiral
alpha carbon of a topology and checks, per sample, the sign of the improper torsion
N-CA-C-CB (radians, :func:`bgflow_mini.cv.torsion`), which flips with the hand of the
centre. The reference is a known-good structure (a system's PDB), not a rule about L
or D, so a deliberate D residue is kept as D.

Example::

    centres = chiral_centres(system.mdtraj_topology)
    ref = reference_signs(system.positions, centres)
    kept, per_centre = chirality_fraction(samples, centres, ref)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cv import torsion

__all__ = [
    "ChiralCentre",
    "chiral_centres",
    "chirality_signs",
    "reference_signs",
    "kept_mask",
    "chirality_fraction",
]

_ATOMS = ("N", "CA", "C", "CB")


@dataclass(frozen=True)
class ChiralCentre:
    """An alpha carbon: ``residue`` label (e.g. ``"ALA2"``) and 0-based atom indices
    ``(N, CA, C, CB)``."""

    residue: str
    atoms: tuple[int, int, int, int]


def chiral_centres(topology) -> list[ChiralCentre]:
    """Every chiral alpha carbon of an ``mdtraj.Topology``: residues that hold atoms named
    N, CA, C and CB, glycine excepted (caps such as ACE and NME have no CA), in residue
    order. Labels are ``<resname><resSeq>`` (``<chain index>:<resname><resSeq>`` where
    several chains repeat a label)."""
    found_res = []
    for res in topology.residues:
        if res.name == "GLY":
            continue
        found: dict[str, int] = {}
        for atom in res.atoms:
            if atom.name in _ATOMS and atom.name not in found:
                found[atom.name] = atom.index
        if len(found) == len(_ATOMS):
            found_res.append((res, tuple(found[a] for a in _ATOMS)))
    labels = [f"{res.name}{res.resSeq}" for res, _ in found_res]
    return [
        ChiralCentre(label if labels.count(label) == 1 else f"{res.chain.index}:{label}", atoms)
        for label, (res, atoms) in zip(labels, found_res)
    ]


def _indices(centres: list[ChiralCentre]) -> np.ndarray:
    return np.array([c.atoms for c in centres], dtype=np.int64).reshape(-1, 4)


def chirality_signs(x, centres: list[ChiralCentre]) -> np.ndarray:
    """Sign (+1 / -1, int8) of the improper torsion N-CA-C-CB of each centre, ``(n, k)``.

    ``x``: positions ``(n, n_atoms*3)`` or ``(n, n_atoms, 3)`` in nm (numpy or torch).
    A non-finite or exactly planar centre gives 0 (matches neither hand).
    """
    x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    if not centres:
        return np.zeros((len(x), 0), dtype=np.int8)
    with np.errstate(invalid="ignore"):
        t = torsion(x, _indices(centres))  # (n, k)
    return np.where(np.isfinite(t), np.sign(t), 0).astype(np.int8)


def reference_signs(positions, centres: list[ChiralCentre]) -> np.ndarray:
    """Signs ``(k,)`` of one structure (``(n_atoms, 3)`` nm, e.g. a system's PDB positions).

    Raises ``ValueError`` if a centre of the reference is planar or not finite.
    """
    xyz = np.asarray(positions, dtype=np.float64).reshape(1, -1, 3)
    signs = chirality_signs(xyz, centres)[0]
    bad = [c.residue for c, s in zip(centres, signs) if s == 0]
    if bad:
        raise ValueError(f"reference structure has planar or non-finite alpha carbons: {bad}")
    return signs


def kept_mask(x, centres: list[ChiralCentre], reference_signs: np.ndarray) -> np.ndarray:
    """Boolean ``(n, k)``: centre ``j`` of sample ``i`` has the sign ``reference_signs[j]``."""
    ref = np.asarray(reference_signs).reshape(-1)
    if len(ref) != len(centres):
        raise ValueError(f"{len(centres)} centres but {len(ref)} reference signs")
    return chirality_signs(x, centres) == ref[None, :]


def chirality_fraction(
    x, centres: list[ChiralCentre], reference_signs: np.ndarray
) -> tuple[float, np.ndarray]:
    """Fraction of samples whose every centre has its reference sign, and per centre.

    Returns ``(kept, per_centre)``: ``kept`` the fraction of the ``n`` samples of ``x``
    in which all ``k`` centres keep the sign of ``reference_signs`` (1.0 without
    centres), ``per_centre`` ``(k,)`` the fraction for each centre. Samples with
    non-finite coordinates count as not kept.
    """
    same = kept_mask(x, centres, reference_signs)
    if same.shape[0] == 0:
        raise ValueError("no samples")
    return float(same.all(axis=1).mean()), same.mean(axis=0)
