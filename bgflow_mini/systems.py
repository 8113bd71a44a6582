"""Molecular systems described by a folder with a PDB file and a ``system.yaml``.

A system folder holds::

    <folder>/system.yaml   # configuration, keys below
    <folder>/<pdb>         # reference structure (nm after reading), standard residues

``system.yaml`` keys (``pdb``, ``forcefield`` and ``temperature`` are required)::

    name: aldp_vacuum                 # defaults to the folder name
    pdb: aldp.pdb
    forcefield: [amber99sbildn.xml]   # OpenMM force field XML files
    nonbonded_method: NoCutoff        # NoCutoff | CutoffNonPeriodic | CutoffPeriodic | PME ...
    nonbonded_cutoff: 1.0             # nm, only used by cutoff methods
    constraints: null                 # null | HBonds | AllBonds | HAngles
    rigid_water: false
    temperature: 300.0                # K
    cvs:                              # collective variables, 0-based atom indices
      phi: {type: torsion, atoms: [4, 6, 8, 14]}
    states:                           # CV ranges (radians / nm) defining metastable states
      phi_positive: {phi: [0.0, 2.0]}

CVs and states are evaluated by :mod:`bgflow_mini.cv` (the one implementation): torsions
lie in [-pi, pi), ranges are ``lo <= v < hi`` and torsion ranges are periodic (see
:func:`bgflow_mini.cv.in_range`).

Shipped systems live in the repository's ``systems/`` folder, which is installed as the
package data ``bgflow_mini.system_data``. Names are looked up in the folders listed in the
environment variable ``BGFLOW_MINI_SYSTEMS`` (``os.pathsep`` separated), then among the
shipped systems; a path to a folder is loaded directly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mdtraj
import numpy as np
import openmm
import torch
import yaml
from openmm import app, unit

from . import cv as cvmod
from .cv import CV_TYPES as _ATOM_CV_TYPES
from .cv import FEATURE_CV_TYPES as _FEATURE_CV_TYPES
from .units import kt_kjmol

__all__ = [
    "SystemConfigError",
    "MolecularSystem",
    "load_system",
    "available_systems",
    "system_search_paths",
    "VALID_KEYS",
]

ENV_VAR = "BGFLOW_MINI_SYSTEMS"
VALID_KEYS = (
    "name",
    "pdb",
    "forcefield",
    "nonbonded_method",
    "nonbonded_cutoff",
    "constraints",
    "rigid_water",
    "temperature",
    "cvs",
    "states",
)
REQUIRED_KEYS = ("pdb", "forcefield", "temperature")
NONBONDED_METHODS = ("NoCutoff", "CutoffNonPeriodic", "CutoffPeriodic", "Ewald", "PME", "LJPME")
CONSTRAINTS = {None: None, "HBonds": app.HBonds, "AllBonds": app.AllBonds, "HAngles": app.HAngles}


class SystemConfigError(ValueError):
    """A system folder, its ``system.yaml`` or its PDB cannot be turned into a system."""


@dataclass
class MolecularSystem:
    """An OpenMM system with its topology, reference positions and collective variables.

    Attributes:
        name: system name.
        path: folder the system was loaded from.
        topology: ``openmm.app.Topology``.
        system: ``openmm.System`` built from the force field.
        mdtraj_topology: the same topology as ``mdtraj.Topology``.
        positions: reference positions, shape (n_atoms, 3), float64, nm.
        temperature: K.
        kT: kJ/mol (= R T).
        cvs: ``{name: {"type": str, "atoms": list[int]}}``, 0-based indices.
        states: ``{name: {cv_name: [low, high]}}``.
        forcefield: list of OpenMM force field XML files.
        config: the parsed ``system.yaml`` with defaults filled in.
        n_atoms, dim: number of atoms and 3 * n_atoms.
    """

    name: str
    path: Path
    topology: app.Topology
    system: openmm.System
    mdtraj_topology: mdtraj.Topology
    positions: np.ndarray
    temperature: float
    kT: float
    cvs: dict[str, dict[str, Any]]
    states: dict[str, dict[str, list[float]]]
    forcefield: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    n_atoms: int = field(init=False)
    dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_atoms = int(self.positions.shape[0])
        self.dim = 3 * self.n_atoms

    def compute_cvs(
        self, x: torch.Tensor | np.ndarray, names: list[str] | None = None
    ) -> dict[str, torch.Tensor | np.ndarray]:
        """CVs of ``x`` ((batch, dim) or (batch, n_atoms, 3), nm) as ``{name: (batch,)}``.

        :func:`bgflow_mini.cv.compute_cvs` on this system's ``cvs`` (``names``: a subset):
        torch in, torch out (differentiable); numpy in, numpy (float64) out.
        """
        return cvmod.compute_cvs(x, self.cvs, names)

    def in_state(self, state: str, x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Boolean mask (batch,) of configurations inside all CV ranges of ``state``.

        :func:`bgflow_mini.cv.in_state` with this system's ``cvs``: ``lo <= v < hi``,
        periodic for torsions.
        """
        if state not in self.states:
            raise KeyError(f"unknown state {state!r}; available: {sorted(self.states)}")
        ranges = self.states[state]
        return cvmod.in_state(cvmod.compute_cvs(x, self.cvs, list(ranges)), ranges, self.cvs)


def system_search_paths() -> list[Path]:
    """Folders searched for named systems: ``$BGFLOW_MINI_SYSTEMS``, then the shipped ones
    (package data ``bgflow_mini.system_data``: the checkout's ``systems/`` in an editable
    install, a folder inside site-packages in a wheel install)."""
    from importlib.resources import files

    paths = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    paths.append(Path(str(files("bgflow_mini.system_data"))))
    return paths


def available_systems() -> list[str]:
    """Names of all systems (folders with a ``system.yaml``) in the search paths."""
    names = set()
    for root in system_search_paths():
        if root.is_dir():
            names.update(p.parent.name for p in root.glob("*/system.yaml"))
    return sorted(names)


def _resolve(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    looks_like_path = isinstance(name_or_path, os.PathLike) or os.sep in str(name_or_path)
    if path.is_dir() or looks_like_path:
        if not path.is_dir():
            raise SystemConfigError(f"system folder {str(path)!r} does not exist")
        return path.resolve()
    for root in system_search_paths():
        if (root / str(name_or_path)).is_dir():
            return (root / str(name_or_path)).resolve()
    raise SystemConfigError(
        f"unknown system {str(name_or_path)!r}; available: {available_systems()} "
        f"(searched {[str(p) for p in system_search_paths()]}; set ${ENV_VAR} or pass a path)"
    )


def _read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "system.yaml"
    if not cfg_path.is_file():
        raise SystemConfigError(f"missing system.yaml in {folder}")
    try:
        cfg = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as err:
        raise SystemConfigError(f"cannot parse {cfg_path}: {err}") from err
    if not isinstance(cfg, dict):
        raise SystemConfigError(f"{cfg_path} must hold a mapping, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(VALID_KEYS))
    if unknown:
        raise SystemConfigError(
            f"unknown key(s) {unknown} in {cfg_path}; valid keys: {list(VALID_KEYS)}"
        )
    missing = [k for k in REQUIRED_KEYS if cfg.get(k) is None]
    if missing:
        raise SystemConfigError(f"missing required key(s) {missing} in {cfg_path}")
    cfg.setdefault("name", folder.name)
    cfg.setdefault("nonbonded_method", "NoCutoff")
    cfg.setdefault("nonbonded_cutoff", 1.0)
    cfg.setdefault("constraints", None)
    cfg.setdefault("rigid_water", False)
    cfg["cvs"] = cfg.get("cvs") or {}
    cfg["states"] = cfg.get("states") or {}
    if isinstance(cfg["forcefield"], str):
        cfg["forcefield"] = [cfg["forcefield"]]
    if cfg["nonbonded_method"] not in NONBONDED_METHODS:
        raise SystemConfigError(
            f"nonbonded_method {cfg['nonbonded_method']!r} in {cfg_path} is not one of "
            f"{list(NONBONDED_METHODS)}"
        )
    if cfg["constraints"] in ("None", "none", "null"):
        cfg["constraints"] = None
    if cfg["constraints"] not in CONSTRAINTS:
        raise SystemConfigError(
            f"constraints {cfg['constraints']!r} in {cfg_path} is not one of {list(CONSTRAINTS)}"
        )
    try:
        cfg["temperature"] = float(cfg["temperature"])
    except (TypeError, ValueError) as err:
        raise SystemConfigError(f"temperature in {cfg_path} must be a number (K)") from err
    if not cfg["temperature"] > 0:
        raise SystemConfigError(f"temperature in {cfg_path} must be > 0 K")
    return cfg


def _check_cvs(cfg: dict[str, Any], n_atoms: int, where: Path) -> None:
    """Molecular systems take the atom-based CV types only (``cv.CV_TYPES``)."""
    for name, cv in cfg["cvs"].items():
        kind = cv.get("type") if isinstance(cv, dict) else None
        if kind in _FEATURE_CV_TYPES:
            raise SystemConfigError(
                f"CV {name!r} in {where}: type {kind!r} is for flat features of non-molecular "
                f"targets (toy energies); molecular systems take {sorted(_ATOM_CV_TYPES)}"
            )
        if not isinstance(cv, dict) or set(cv) != {"type", "atoms"}:
            raise SystemConfigError(f"CV {name!r} in {where} needs exactly the keys type, atoms")
        if kind not in tuple(_ATOM_CV_TYPES):
            raise SystemConfigError(
                f"CV {name!r} in {where}: unknown type {kind!r}; valid: {sorted(_ATOM_CV_TYPES)}"
            )
        atoms = cv["atoms"]
        n_need = _ATOM_CV_TYPES[kind]
        ok = isinstance(atoms, list) and len(atoms) == n_need
        ok = ok and all(isinstance(i, int) and not isinstance(i, bool) for i in atoms)
        if not ok or any(not 0 <= i < n_atoms for i in atoms) or len(set(atoms)) != n_need:
            raise SystemConfigError(
                f"CV {name!r} in {where}: atoms must be {n_need} distinct 0-based indices in "
                f"[0, {n_atoms}), got {atoms!r}"
            )
    for state, ranges in cfg["states"].items():
        if not isinstance(ranges, dict) or not ranges:
            raise SystemConfigError(f"state {state!r} in {where} must map CV names to [low, high]")
        for cv_name, rng in ranges.items():
            if cv_name not in cfg["cvs"]:
                raise SystemConfigError(
                    f"state {state!r} in {where} uses unknown CV {cv_name!r}; "
                    f"CVs: {sorted(cfg['cvs'])}"
                )
            valid = isinstance(rng, list) and len(rng) == 2
            valid = valid and all(isinstance(v, (int, float)) and math.isfinite(v) for v in rng)
            periodic = cfg["cvs"][cv_name].get("type") == "torsion"
            if not valid or rng[0] == rng[1] or (rng[0] > rng[1] and not periodic):
                raise SystemConfigError(
                    f"state {state!r} in {where}: range for {cv_name!r} must be [low, high] "
                    f"with low < high (torsions may wrap across +-pi: low > high), got {rng!r}"
                )
            ranges[cv_name] = [float(rng[0]), float(rng[1])]


def load_system(name_or_path: str | os.PathLike) -> MolecularSystem:
    """Load a shipped system by name (e.g. ``"aldp_vacuum"``) or a user system folder by path.

    Raises:
        SystemConfigError: unknown name, missing folder / YAML / PDB, invalid YAML keys or
            values, a residue the force field has no template for, bad CV indices.
    """
    folder = _resolve(name_or_path)
    cfg = _read_config(folder)
    pdb_path = folder / str(cfg["pdb"])
    if not pdb_path.is_file():
        raise SystemConfigError(f"missing PDB file {pdb_path} (key 'pdb' in system.yaml)")
    try:
        pdb = app.PDBFile(str(pdb_path))
    except Exception as err:  # OpenMM raises plain Exceptions on malformed PDBs
        raise SystemConfigError(f"cannot read PDB {pdb_path}: {err}") from err
    try:
        ff = app.ForceField(*cfg["forcefield"])
    except Exception as err:
        raise SystemConfigError(f"cannot load force field {cfg['forcefield']}: {err}") from err
    kwargs: dict[str, Any] = {
        "nonbondedMethod": getattr(app, cfg["nonbonded_method"]),
        "constraints": CONSTRAINTS[cfg["constraints"]],
        "rigidWater": bool(cfg["rigid_water"]),
    }
    if cfg["nonbonded_method"] != "NoCutoff":
        kwargs["nonbondedCutoff"] = float(cfg["nonbonded_cutoff"]) * unit.nanometer
    try:
        system = ff.createSystem(pdb.topology, **kwargs)
    except ValueError as err:
        residues = [f"{r.name}{r.id}" for r in pdb.topology.residues()]
        raise SystemConfigError(
            f"force field {cfg['forcefield']} cannot build a system from {pdb_path} "
            f"(residues {residues}): {err}"
        ) from err
    positions = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    positions = positions.astype(np.float64)
    _check_cvs(cfg, positions.shape[0], folder / "system.yaml")
    return MolecularSystem(
        name=str(cfg["name"]),
        path=folder,
        topology=pdb.topology,
        system=system,
        mdtraj_topology=mdtraj.Topology.from_openmm(pdb.topology),
        positions=positions,
        temperature=cfg["temperature"],
        kT=kt_kjmol(cfg["temperature"]),
        cvs=cfg["cvs"],
        states=cfg["states"],
        forcefield=list(cfg["forcefield"]),
        config=cfg,
    )
