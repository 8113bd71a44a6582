"""Build a system folder (PDB + ``system.yaml``) from a peptide sequence or a PDB file.

:func:`build_system` writes a folder that :func:`bgflow_mini.systems.load_system` reads::

    from bgflow_mini.system_builder import build_system
    build_system("my_ala3", sequence="AAA", solvent="obc")      # ACE-ALA-ALA-ALA-NME
    build_system("my_protein", pdb="input.pdb", forcefield="amber14")

Steps: heavy atoms from the sequence (:func:`bgflow_mini.peptide_geometry.build_peptide`,
PeptideBuilder) or from the PDB (pdbfixer adds missing heavy atoms, never missing residues;
hydrogens in the file are dropped), hydrogens from ``openmm.app.Modeller.addHydrogens`` at
the given pH with the force field's templates (it also picks the histidine tautomer),
energy minimisation (NoCutoff, no constraints, tolerance 0.1 kJ/mol/nm) and the PDB written
with ``openmm.app.PDBFile.writeFile``. ``system.yaml`` names torsion CVs for every residue
that is not a cap (``phi_k``, ``psi_k``, ``chi1_k``, ``chi2_k`` where the side chain has
them, for residue k = 1..n; plain ``phi``, ``psi``, ``chi1``, ``chi2`` for a single residue;
proline also ``omega``), with the atom indices mdtraj's ``compute_phi / compute_psi /
compute_chi1 / compute_chi2`` use, and states (radians, ``lo <= v < hi``, periodic; a
range past pi wraps): ``phi_k_negative`` [-pi, 0) and ``phi_k_positive``
[0, 2) per residue, proline's ring pucker instead (``pucker_k_down`` chi1 in [0, 1.2),
``pucker_k_up`` chi1 in [-1.2, 0)), then chi1 rotamers of PHE/TYR/TRP/HIS (``chi1_k_plus``
[0, 2pi/3), ``chi1_k_trans`` [2pi/3, 4pi/3), ``chi1_k_minus`` [-2pi/3, 0)). The first two
states are the default pair for free-energy differences.

Supported: one chain of the 20 standard amino acids (protonation variants by name, e.g.
HID, CYX, in a PDB) with optional ACE/NME caps; force fields ``amber99sbildn`` and
``amber14`` in vacuum or OBC implicit solvent. Anything else is refused with a
:class:`SystemBuildError` before any work.
"""

from __future__ import annotations

import math
import random
import re
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import openmm
from openmm import app, unit

from .fileio import atomic_path, save_text
from .peptide_geometry import (
    AMINO_ACIDS,
    CAPS,
    DEFAULT_PHI,
    DEFAULT_PSI,
    ONE_TO_THREE,
    PROLINE_PHI,
    VARIANTS,
    build_peptide,
    peptide_cvs,
    peptide_states,
)

__all__ = [
    "SystemBuildError",
    "build_system",
    "check_supported_topology",
    "parse_sequence",
    "forcefield_files",
    "peptide_cvs",
    "peptide_states",
    "FORCEFIELDS",
    "SOLVENTS",
    "TERMINI",
]

FORCEFIELDS = ("amber99sbildn", "amber14")
SOLVENTS = ("vacuum", "obc")
TERMINI = ("capped", "zwitterion")
_FF_FILES = {  # OBC: both are OBC II (amber igb=5) with the force field's own radii
    ("amber99sbildn", "vacuum"): ["amber99sbildn.xml"],
    ("amber99sbildn", "obc"): ["amber99sbildn.xml", "amber99_obc.xml"],
    ("amber14", "vacuum"): ["amber14-all.xml"],
    ("amber14", "obc"): ["amber14-all.xml", "implicit/obc2.xml"],
}
_PEPTIDE = set(AMINO_ACIDS) | set(VARIANTS) | set(CAPS)
_WATERS = {"HOH", "WAT", "H2O", "DOD", "SOL", "TIP", "TIP3", "TIP4", "TIP5", "T3P", "T4P", "SPC"}
_IONS = {"NA", "CL", "K", "MG", "CA", "ZN", "LI", "RB", "CS", "F", "BR", "I", "IOD", "SOD",
         "CLA", "POT", "CAL", "MN", "FE", "FE2", "CU", "CO", "NI", "CD", "HG", "BA", "SR",
         "NA+", "CL-", "K+"}  # fmt: skip
SUPPORTED = (
    "one chain of the 20 standard amino acids (one-letter codes "
    f"{''.join(sorted(ONE_TO_THREE))}) with optional ACE/NME caps; no water, ions, ligands, "
    "unknown or non-standard residues"
)
MINIMIZE_TOLERANCE = 0.1  # kJ/mol/nm
REFERENCE_MAX_HEAVY_ATOMS = 50  # up to here the Reference platform (deterministic), then CPU
_PHI_PSI = f"{DEFAULT_PHI:g}/{DEFAULT_PSI:g}"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SystemBuildError(ValueError):
    """A molecule or option that :func:`build_system` does not support; the message says
    what is supported."""


def forcefield_files(forcefield: str, solvent: str) -> list[str]:
    """OpenMM force field XML files for a force field name and a solvent model."""
    if forcefield not in FORCEFIELDS:
        raise SystemBuildError(f"forcefield={forcefield!r}: must be one of {list(FORCEFIELDS)}")
    if solvent not in SOLVENTS:
        raise SystemBuildError(f"solvent={solvent!r}: must be one of {list(SOLVENTS)}")
    return list(_FF_FILES[forcefield, solvent])


def parse_sequence(sequence: str) -> list[str]:
    """Three-letter codes of a sequence: one-letter codes (``"AAA"``, ``"W"``) or
    three-letter codes joined by dashes (``"ALA-PRO"``), case-insensitive."""
    if not isinstance(sequence, str) or not sequence.strip():
        raise SystemBuildError(
            f"sequence={sequence!r}: give one-letter codes (e.g. 'AAA') or three-letter codes "
            f"joined by dashes (e.g. 'ALA-PRO'); supported: {SUPPORTED}"
        )
    seq = sequence.strip().upper()
    if "-" in seq:
        codes = seq.split("-")
        bad = [c for c in codes if c not in AMINO_ACIDS]
        what = "three-letter code(s)"
    else:
        codes = [ONE_TO_THREE.get(c, c) for c in seq]
        bad = [c for c in seq if c not in ONE_TO_THREE]
        what = "residue letter(s)"
    if bad:
        raise SystemBuildError(
            f"sequence={sequence!r}: unknown {what} {sorted(set(bad))}; one-letter codes: "
            f"{''.join(sorted(ONE_TO_THREE))}, three-letter codes joined by dashes: "
            f"{', '.join(AMINO_ACIDS)}"
        )
    return codes


def _items(obj: Any) -> list:
    """Items of an OpenMM (method) or mdtraj (property) topology accessor."""
    return list(obj() if callable(obj) else obj)


def check_supported_topology(topology: Any) -> None:
    """Raise :class:`SystemBuildError` unless ``topology`` (OpenMM or mdtraj) is one chain
    of standard amino acids with optional caps: no water, ions, ligands, several chains."""
    water, ions, other, chains = Counter(), Counter(), Counter(), {}
    n_amino = 0
    for res in _items(topology.residues):
        name = res.name.strip().upper()
        if name in _WATERS or getattr(res, "is_water", False):
            water[name] += 1
        elif name in _IONS or (len(_items(res.atoms)) == 1 and name not in _PEPTIDE):
            ions[name] += 1
        elif name not in _PEPTIDE:
            other[name] += 1
        else:
            n_amino += name not in CAPS
            chain = res.chain
            label = getattr(chain, "id", None) or getattr(chain, "chain_id", None)
            chains[chain.index] = str(label if label else chain.index)
    problems = []
    if len(chains) > 1:
        problems.append(f"{len(chains)} chains ({', '.join(chains.values())})")
    for kind, counter in (("water", water), ("ions", ions), ("ligands, unknown or non-standard "
                                                             "residues", other)):  # fmt: skip
        if counter:
            problems.append(f"{kind} ({', '.join(f'{k} x{v}' for k, v in counter.items())})")
    if n_amino == 0:
        problems.append("no amino acid residue")
    if problems:
        raise SystemBuildError(
            f"unsupported molecule: {'; '.join(problems)}. Supported: {SUPPORTED}"
        )


def _atom(residue: app.Residue, name: str) -> int | None:
    return next((a.index for a in residue.atoms() if a.name == name), None)


def _pdbfixer_heavy_atoms(path: Path) -> tuple[app.Topology, Any, str]:
    """The PDB's first model with missing heavy atoms added (pdbfixer), hydrogens dropped."""
    try:
        from pdbfixer import PDBFixer
    except ImportError as err:
        raise ImportError(
            "building from a PDB needs pdbfixer: pip install pdbfixer "
            "(or pip install 'bgflow_mini[system]')"
        ) from err
    try:
        fixer = PDBFixer(filename=str(path))
    except Exception as err:  # OpenMM/pdbfixer raise plain Exceptions on malformed files
        raise SystemBuildError(f"cannot read PDB {path}: {err}") from err
    check_supported_topology(fixer.topology)
    fixer.missingResidues = {}  # never model missing residues (loops) from SEQRES
    fixer.findNonstandardResidues()
    if fixer.nonstandardResidues:
        names = sorted({r.name for r, _ in fixer.nonstandardResidues})
        raise SystemBuildError(f"non-standard residues {names} in {path}. Supported: {SUPPORTED}")
    fixer.findMissingAtoms()
    added = sum(len(v) for v in fixer.missingAtoms.values())
    added += sum(len(v) for v in fixer.missingTerminals.values())
    fixer.addMissingAtoms(seed=0)
    modeller = app.Modeller(fixer.topology, fixer.positions)
    modeller.delete([a for a in modeller.topology.atoms() if a.element == app.element.hydrogen])
    residues = list(modeller.topology.residues())
    xyz = modeller.getPositions().value_in_unit(unit.nanometer)
    for r1, r2 in zip(residues[:-1], residues[1:]):
        c, n = _atom(r1, "C"), _atom(r2, "N")
        gap = np.linalg.norm(np.subtract(xyz[c], xyz[n])) if None not in (c, n) else 0.0
        if gap > 0.2:
            raise SystemBuildError(
                f"chain break between {r1.name}{r1.id} and {r2.name}{r2.id} in {path} (C-N "
                f"{gap:.2f} nm): missing residues are not built. Supported: {SUPPORTED}"
            )
    return modeller.topology, modeller.positions, f"pdbfixer added {added} heavy atom(s)"


def _minimize(
    system: openmm.System, positions: Any, minimize: bool, platform: str
) -> tuple[np.ndarray, float, float]:
    """Positions (nm) and energies before / after minimisation (kJ/mol)."""
    integrator = openmm.VerletIntegrator(0.001 * unit.picoseconds)
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    ctx.setPositions(positions)
    e0 = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    if minimize:
        openmm.LocalEnergyMinimizer.minimize(ctx, MINIMIZE_TOLERANCE, 0)
    state = ctx.getState(getEnergy=True, getPositions=True)
    e1 = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    x = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), np.float64)
    del ctx, integrator
    if not (math.isfinite(e1) and np.isfinite(x).all()):
        raise SystemBuildError(f"the energy is not finite after minimisation ({e1} kJ/mol)")
    return x, e0, e1


def _yaml_text(header: list[str], cfg: dict[str, Any]) -> str:
    lines = [f"# {t}" for h in header for t in textwrap.wrap(h, 96, subsequent_indent="  ")]
    lines += [f"name: {cfg['name']}", f"pdb: {cfg['pdb']}",
              f"forcefield: [{', '.join(cfg['forcefield'])}]", "nonbonded_method: NoCutoff",
              "constraints: null", "rigid_water: false",
              f"temperature: {cfg['temperature']!r}  # K",
              f"# 0-based atom indices; equal to mdtraj.compute_phi / compute_psi / "
              f"compute_chi1 / compute_chi2 on {cfg['pdb']}",
              "cvs:" if cfg["cvs"] else "cvs: {}"]  # fmt: skip
    lines += [f"  {k}: {{type: torsion, atoms: {v['atoms']}}}" for k, v in cfg["cvs"].items()]
    lines.append("# states as CV ranges in radians: lo <= v < hi, periodic (hi > pi wraps)")
    lines.append("states:" if cfg["states"] else "states: {}")
    for state, ranges in cfg["states"].items():
        body = ", ".join(f"{cv}: [{lo!r}, {hi!r}]" for cv, (lo, hi) in ranges.items())
        lines.append(f"  {state}: {{{body}}}")
    return "\n".join(lines) + "\n"


def build_system(
    out_dir: str | Path,
    *,
    sequence: str | None = None,
    pdb: str | Path | None = None,
    name: str | None = None,
    forcefield: str = "amber99sbildn",
    solvent: str = "vacuum",
    termini: str = "capped",
    temperature: float = 300.0,
    minimize: bool = True,
    ph: float = 7.0,
    overwrite: bool = False,
    command: str | None = None,
) -> Path:
    """Write a system folder ``out_dir`` (``<name>.pdb`` + ``system.yaml``); returns it.

    Arguments:
        out_dir: folder to write; must be empty or absent unless ``overwrite``.
        sequence: one-letter codes (``"AAA"``) or dash-joined three-letter codes
            (``"ALA-PRO"``); or
        pdb: path of a PDB file (one chain, standard residues; its own termini are kept,
            missing heavy atoms are added, its hydrogens are replaced).
        name: system name (default: the folder name).
        forcefield: ``"amber99sbildn"`` or ``"amber14"``; solvent: ``"vacuum"`` or ``"obc"``.
        termini: ``"capped"`` (ACE/NME) or ``"zwitterion"``; sequences only.
        temperature: K, written to ``system.yaml``.
        minimize: energy-minimise (tolerance 0.1 kJ/mol/nm) before writing.
        ph: pH for the protonation states chosen by ``Modeller.addHydrogens``.
        command: how the build was started, for the header (default: this call).

    Raises:
        SystemBuildError: an unsupported option or molecule (before any work).
    """
    out = Path(out_dir)
    ff_files = forcefield_files(forcefield, solvent)
    if termini not in TERMINI:
        raise SystemBuildError(f"termini={termini!r}: must be one of {list(TERMINI)}")
    if (sequence is None) == (pdb is None):
        raise SystemBuildError("give exactly one of sequence=... or pdb=...")
    number = (int, float)
    if isinstance(temperature, bool) or not (
        isinstance(temperature, number) and 0 < temperature < math.inf
    ):
        raise SystemBuildError(f"temperature={temperature!r}: must be a number > 0 (K)")
    if isinstance(ph, bool) or not (isinstance(ph, number) and 0 <= ph <= 14):
        raise SystemBuildError(f"ph={ph!r}: must be a number in [0, 14]")
    name = out.name if name is None else str(name)
    if not _NAME.match(name):
        raise SystemBuildError(f"name={name!r}: letters, digits, '_', '.', '-' only")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise SystemBuildError(f"out={str(out)!r} is not an empty folder (overwrite=true)")
    residues = parse_sequence(sequence) if sequence is not None else None
    if pdb is not None and not Path(pdb).is_file():
        raise SystemBuildError(f"pdb={str(pdb)!r}: no such file")

    ff = app.ForceField(*ff_files)
    if residues is not None:
        topology, positions = build_peptide(residues, termini)
        positions = positions * unit.nanometer
        pro = f", PRO phi {PROLINE_PHI:g}" if "PRO" in residues else ""
        source = f"{termini} {'-'.join(residues)} (PeptideBuilder, phi/psi {_PHI_PSI}{pro} deg)"
    else:
        topology, positions, source = _pdbfixer_heavy_atoms(Path(pdb))
        source = f"{Path(pdb).name}: {source}"
    small = topology.getNumAtoms() <= REFERENCE_MAX_HEAVY_ATOMS
    platform = "Reference" if small else "CPU"
    modeller = app.Modeller(topology, positions)
    saved = random.getstate()  # Modeller starts new hydrogens at random.random() offsets
    random.seed(0)  # reproducible builds
    try:
        placer = openmm.Platform.getPlatformByName(platform)  # minimises the new hydrogens
        variants = modeller.addHydrogens(ff, pH=ph, platform=placer)
        system = ff.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    except ValueError as err:  # no template, e.g. an unusual protonation or terminus
        raise SystemBuildError(f"{ff_files} cannot parametrise the molecule: {err}") from err
    finally:
        random.setstate(saved)
    topology = modeller.topology
    n_atoms = topology.getNumAtoms()
    x, e0, e1 = _minimize(system, modeller.positions, minimize, platform)
    for a, b in topology.bonds():
        length = float(np.linalg.norm(x[a.index] - x[b.index]))
        if not 0.08 < length < 0.25:
            raise SystemBuildError(
                f"bond {a.residue.name}{a.residue.id}:{a.name}-{b.name} is {length:.3f} nm "
                f"after {'minimisation' if minimize else 'building'} (use minimize=true)"
            )
    cvs = peptide_cvs(topology)
    states = peptide_states(topology, cvs)
    cfg = {"name": name, "pdb": f"{name}.pdb", "forcefield": ff_files,
           "temperature": float(temperature), "cvs": cvs, "states": states}  # fmt: skip
    chosen = [f"{r.name}{r.id}->{v}" for r, v in zip(topology.residues(), variants) if v]
    what = f"sequence={sequence!r}, termini={termini!r}" if pdb is None else f"pdb={str(pdb)!r}"
    call = command or (
        f"build_system({str(out)!r}, {what}, forcefield={forcefield!r}, solvent={solvent!r}, "
        f"temperature={temperature}, minimize={minimize}, ph={ph})"
    )
    header = [
        f"{name}: {source}; {', '.join(ff_files)}, {n_atoms} atoms.",
        f"Built by: {call}",
        f"(bgflow_mini.system_builder; OpenMM {openmm.__version__}). Hydrogens: OpenMM "
        f"Modeller at pH {ph}{' (' + ', '.join(chosen) + ')' if chosen else ''}.",
        f"Energy {e0:.1f} -> {e1:.1f} kJ/mol ({'minimised' if minimize else 'not minimised'}"
        f", NoCutoff, no constraints, {platform} platform).",
    ]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / cfg["pdb"]) as tmp, open(tmp, "w") as fh:
        app.PDBFile.writeFile(topology, x * unit.nanometer, fh, keepIds=True)
    save_text(_yaml_text(header, cfg), out / "system.yaml")
    from .systems import SystemConfigError, load_system  # the folder must load as written

    try:
        load_system(out)
    except SystemConfigError as err:
        raise SystemBuildError(f"the written folder {out} does not load: {err}") from err
    return out
