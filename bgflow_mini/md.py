"""Molecular dynamics data generation: plain Langevin MD and replica exchange.

:func:`simulate` runs one temperature (plain MD) or a temperature ladder (parallel
tempering, see :mod:`bgflow_mini.replica`) through the same code path and returns an
:class:`MDResult` holding the target-temperature trajectory (mdtraj, nm), its potential
energies (kJ/mol) and a JSON-able ``info`` dict (swap acceptance per neighbour pair, phi
statistics, wall time, throughput).

``system`` is a :class:`bgflow_mini.systems.MolecularSystem` or any object with
``.system`` (openmm.System), ``.topology`` (openmm.app.Topology), ``.positions``
(``(n_atoms, 3)`` nm) and ``.temperature`` (K); ``.mdtraj_topology``, ``.cvs`` and
``.name`` are used when present.

phi transitions: frames are assigned to ``phi > 0`` when ``margin < phi < pi - margin``
and to ``phi < 0`` when ``-pi + margin < phi < -margin`` (radians); frames outside both
cores keep the previous assignment (hysteresis), and each change of assignment counts as
one transition. The phi>0 population is the plain fraction of frames with ``phi > 0``.
For proteins, ``info["cis_peptide_fraction"]`` is the fraction of frames with any
``|omega| < 90 deg`` (cis peptide bonds are rare but in the Boltzmann distribution).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import mdtraj
import numpy as np
import openmm
from openmm import unit

from bgflow_mini.replica import run_replicas
from bgflow_mini.units import MOLAR_GAS_CONSTANT

__all__ = [
    "MD_DEFAULTS",
    "MDResult",
    "count_transitions",
    "degrees_of_freedom",
    "geometric_ladder",
    "peptide_omega_indices",
    "replica_exchange",
    "repartition_hydrogen_mass",
    "resolve_settings",
    "simulate",
    "simulate_from_settings",
]

MD_DEFAULTS: dict[str, Any] = {
    "n_frames": 1000,
    "save_every": 100,  # steps
    "timestep": 0.001,  # ps
    "friction": 1.0,  # 1/ps
    "temperature": None,  # K, target; None -> system's
    "n_replicas": 1,
    "t_max": 1000.0,  # K, top of the geometric ladder
    "temperatures": None,  # explicit ladder (K), overrides n_replicas / t_max
    "swap_every": 500,  # steps
    "equilibration_steps": 10000,
    "minimize": True,
    "seed": 0,
    "platform": "Reference",
    "hydrogen_mass": None,  # amu; None: the force field's masses (see repartition_hydrogen_mass)
    "keep_replicas": 1,  # positions saved for the k lowest temperatures (1: the target's only)
}


@dataclass
class MDResult:
    """Output of :func:`simulate`.

    Attributes:
        trajectory: target-temperature frames (mdtraj, nm), ``n_frames`` frames.
        energies: potential energies of those frames, kJ/mol, ``(n_frames,)``.
        temperatures: replica temperatures, K, ``(n_replicas,)``; index 0 is the target.
        replica_energies: potential energies at every temperature, ``(n_replicas, n_frames)``.
        kinetic_energies: kJ/mol, ``(n_replicas, n_frames)``.
        walkers: which replica walker sat at each temperature, ``(n_replicas, n_frames)``.
        replica_positions: ``(n_replicas, n_frames, n_atoms, 3)`` nm if ``keep_all`` else None.
        info: JSON-able summary (see :func:`simulate`).
    """

    trajectory: mdtraj.Trajectory
    energies: np.ndarray
    temperatures: np.ndarray
    replica_energies: np.ndarray
    kinetic_energies: np.ndarray
    walkers: np.ndarray
    replica_positions: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def geometric_ladder(t_min: float = 300.0, t_max: float = 1000.0, n: int = 8) -> np.ndarray:
    """Temperatures ``t_min * (t_max / t_min) ** (k / (n - 1))``, K, shape ``(n,)``."""
    if n < 1 or t_min <= 0 or (n > 1 and t_max <= t_min):
        raise ValueError(f"need n >= 1 and 0 < t_min < t_max, got {t_min}, {t_max}, {n}")
    if n == 1:
        return np.array([float(t_min)])
    return float(t_min) * (float(t_max) / float(t_min)) ** (np.arange(n) / (n - 1))


def degrees_of_freedom(system: openmm.System) -> int:
    """Kinetic degrees of freedom: ``3N`` minus constraints, minus 3 with CMMotionRemover."""
    n = sum(
        system.getParticleMass(i).value_in_unit(unit.dalton) > 0
        for i in range(system.getNumParticles())
    )
    dof = 3 * n - system.getNumConstraints()
    if any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces()):
        dof -= 3
    return int(dof)


def count_transitions(phi: np.ndarray, margin: float = math.radians(20.0)) -> int:
    """Transitions between ``phi > 0`` and ``phi < 0`` cores with hysteresis (radians)."""
    phi = np.asarray(phi, dtype=float)
    pos = (phi > margin) & (phi < math.pi - margin)
    neg = (phi < -margin) & (phi > -math.pi + margin)
    state = np.where(pos, 1, np.where(neg, -1, 0))
    committed = state[state != 0]
    return int(np.count_nonzero(np.diff(committed))) if committed.size > 1 else 0


def _positions_nm(positions: Any) -> np.ndarray:
    if hasattr(positions, "value_in_unit"):
        positions = positions.value_in_unit(unit.nanometer)
    return np.asarray(positions, dtype=np.float64).reshape(-1, 3)


def _mdtraj_topology(system: Any) -> mdtraj.Topology:
    top = getattr(system, "mdtraj_topology", None)
    return top if top is not None else mdtraj.Topology.from_openmm(system.topology)


def peptide_omega_indices(top: mdtraj.Topology) -> np.ndarray:
    """Atom quadruplets ``(X, C, N, Y)`` of the peptide bonds C(i)-N(i+1), shape ``(n, 4)``.

    X and Y are the carbons bonded to C and N (CA, or the CH3/C of ACE/NME caps).
    """
    nbrs: dict[int, list[Any]] = {}
    for a, b in top.bonds:
        nbrs.setdefault(a.index, []).append(b)
        nbrs.setdefault(b.index, []).append(a)
    quads = []
    for a, b in top.bonds:
        c, n = (a, b) if a.name == "C" else (b, a)
        if c.name != "C" or n.name != "N" or c.residue.index == n.residue.index:
            continue
        xs = [x for x in nbrs[c.index] if x.element.symbol == "C"]
        ys = [y for y in nbrs[n.index] if y.element.symbol == "C" and y.index != c.index]
        if xs and ys:
            quads.append([xs[0].index, c.index, n.index, min(ys, key=lambda y: y.index).index])
    return np.asarray(quads, dtype=int).reshape(-1, 4)


def _cv_info(traj: mdtraj.Trajectory, cvs: dict[str, Any] | None) -> dict[str, Any]:
    """phi statistics (if a ``phi`` torsion CV exists) and the cis-peptide frame fraction."""
    info: dict[str, Any] = {}
    omega_idx = peptide_omega_indices(traj.topology)
    if len(omega_idx):
        omega = mdtraj.compute_dihedrals(traj, omega_idx, periodic=False)
        info["cis_peptide_fraction"] = float(np.mean(np.any(np.abs(omega) < np.pi / 2, axis=1)))
    spec = (cvs or {}).get("phi")
    if not spec or spec.get("type", "torsion") != "torsion":
        return info
    phi = mdtraj.compute_dihedrals(traj, [list(spec["atoms"])], periodic=False)[:, 0]
    info["phi_transitions"] = count_transitions(phi)
    info["phi_sign_changes"] = int(np.count_nonzero(np.diff(np.sign(phi))))
    info["phi_positive_fraction"] = float(np.mean(phi > 0))
    return info


def repartition_hydrogen_mass(
    system: openmm.System, topology: openmm.app.Topology, hydrogen_mass: float
) -> openmm.System:
    """A copy of ``system`` with every hydrogen's mass set to ``hydrogen_mass`` (amu), the
    difference taken from the heavy atom it is bonded to (total mass unchanged).

    Masses do not enter the Boltzmann distribution of positions, exp(-U(x) / kT), so MD with
    the repartitioned masses samples the same configurations (exactly so without
    constraints, as in the shipped systems; with coupled constraints a mass-dependent
    factor appears); heavier hydrogens slow the fastest (X-H) vibrations, which allows a
    longer timestep (e.g. 2 fs without constraints) and so more nanoseconds per wall-clock
    minute. Hydrogens bonded to a massless (fixed) atom keep their mass. Raises
    ``ValueError`` when a hydrogen has no heavy-atom bond or a heavy atom would be left
    lighter than 1 amu.
    """
    mass = float(hydrogen_mass)
    if not mass > 0:
        raise ValueError(f"hydrogen_mass must be positive (amu), got {hydrogen_mass!r}")
    out = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    amu = unit.dalton
    partner: dict[int, int] = {}
    for bond in topology.bonds():
        a, b = bond[0], bond[1]
        for h, heavy in ((a, b), (b, a)):
            if _is_hydrogen(h) and heavy.element is not None and not _is_hydrogen(heavy):
                partner[h.index] = heavy.index
    for atom in topology.atoms():
        if _is_hydrogen(atom) and atom.index not in partner:
            raise ValueError(f"hydrogen {atom} has no bond to a heavy atom: cannot repartition")
    for h, heavy in partner.items():
        old = out.getParticleMass(h).value_in_unit(amu)
        heavy_mass = out.getParticleMass(heavy).value_in_unit(amu)
        if old == 0 or heavy_mass == 0:  # fixed atoms (mass 0) stay fixed
            continue
        new_heavy = heavy_mass - (mass - old)
        if new_heavy < 1.0:
            raise ValueError(
                f"hydrogen_mass={mass} leaves atom {heavy} with {new_heavy:.2f} amu (< 1 amu)"
            )
        out.setParticleMass(heavy, new_heavy * amu)
        out.setParticleMass(h, mass * amu)
    return out


def _is_hydrogen(atom: Any) -> bool:
    return atom.element is not None and atom.element.symbol == "H"


def simulate(
    system: Any,
    n_frames: int,
    save_every: int = 100,
    temperature: float | None = None,
    temperatures: list[float] | np.ndarray | None = None,
    swap_every: int | None = 500,
    timestep: float = 0.001,
    friction: float = 1.0,
    seed: int = 0,
    platform: str = "Reference",
    platform_properties: dict[str, str] | None = None,
    minimize: bool = True,
    equilibration_steps: int = 10000,
    n_workers: int | None = None,
    keep_all: bool = False,
    progress: bool = True,
    hydrogen_mass: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
    keep_checkpoint: bool = False,
) -> MDResult:
    """Langevin MD (``LangevinMiddleIntegrator``) at one or several temperatures.

    Arguments:
        system: molecular system (see module docstring).
        n_frames: frames to save per temperature; ``save_every``: steps between frames.
        temperature: target K (default ``system.temperature``) for plain MD.
        temperatures: increasing ladder (K) for replica exchange; overrides ``temperature``.
        swap_every: steps between swap attempts (replica exchange only).
        timestep: ps; friction: 1/ps; seed: integrator, velocity and swap seeds.
        platform: OpenMM platform name ("Reference", "CPU", ...).
        minimize: energy-minimise the starting structure; equilibration_steps: unsaved
            steps (with swaps) before production.
        n_workers: worker processes (default: one per core, at most one per replica);
            1 runs everything in this process. With the CPU platform and several
            workers, each context gets one thread unless ``platform_properties`` says
            otherwise. Results are reproducible for fixed (seed, n_workers, platform) on
            Reference; another ``n_workers`` gives statistically equivalent, different noise.
        keep_all: also return positions at every temperature.
        hydrogen_mass: amu; when given, MD runs with hydrogen masses repartitioned
            (:func:`repartition_hydrogen_mass`): the same configurational distribution,
            stable at a longer ``timestep``. ``None``: the force field's masses.
        checkpoint, checkpoint_every: a folder for the frames and the run's state (saved
            at most every ``checkpoint_every`` seconds); the same call after a crash goes
            on from there (:func:`bgflow_mini.replica.run_replicas`); ``keep_checkpoint``
            leaves the finished run there for the caller to delete once it is stored.

    Returns:
        :class:`MDResult`; ``info`` has ``swap_acceptance`` per neighbour pair, phi
        statistics when the system has a ``phi`` CV, ``wall_time_s`` and ``ns_per_day``
        (per replica, production only).
    """
    if temperatures is None:
        t0 = float(system.temperature if temperature is None else temperature)
        temps = np.array([t0])
    else:
        temps = np.asarray(temperatures, dtype=float)
    omm_system = system.system
    if hydrogen_mass is not None:
        omm_system = repartition_hydrogen_mass(omm_system, system.topology, hydrogen_mass)
    elif timestep > 0.0015 and omm_system.getNumConstraints() == 0:
        if any(_is_hydrogen(a) for a in system.topology.atoms()):
            warnings.warn(
                f"MD with a {timestep * 1000:g} fs timestep, no constraints and the force "
                "field's hydrogen masses: X-H vibrations are not resolved (energies drift, "
                "the sampled distribution is biased); use hydrogen_mass=4.0 or timestep "
                "0.001",
                stacklevel=2,
            )
    out = run_replicas(
        omm_system,
        _positions_nm(system.positions),
        temps.tolist(),
        n_frames=int(n_frames),
        save_every=int(save_every),
        swap_every=swap_every,
        timestep=timestep,
        friction=friction,
        seed=seed,
        platform=platform,
        platform_properties=platform_properties,
        minimize=minimize,
        equilibration_steps=equilibration_steps,
        n_workers=n_workers,
        keep_all=keep_all,
        progress=progress,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        keep_checkpoint=keep_checkpoint,
    )
    xyz = out["positions"][0] if keep_all else out["positions"]
    time_ps = (np.arange(1, n_frames + 1) * save_every * timestep).astype(np.float32)
    traj = mdtraj.Trajectory(xyz, _mdtraj_topology(system), time=time_ps)

    dof = degrees_of_freedom(omm_system)
    t_kin = 2.0 * out["kinetic"] / (dof * MOLAR_GAS_CONSTANT)
    prod_ns = out["production_steps"] * timestep / 1000.0
    acc = out["swap_accepts"] / np.maximum(out["swap_attempts"], 1)
    info: dict[str, Any] = {
        "n_frames": int(n_frames),
        "n_replicas": len(temps),
        "temperatures": temps.tolist(),
        "timestep_ps": float(timestep),
        "save_every": int(save_every),
        "swap_every": int(swap_every) if len(temps) > 1 and swap_every else None,
        "platform": platform,
        "hydrogen_mass": None if hydrogen_mass is None else float(hydrogen_mass),
        "n_workers": out["n_workers"],
        "ns_per_replica": prod_ns,
        "wall_time_s": out["wall_time_s"],
        "setup_time_s": out["setup_time_s"],
        "production_time_s": out["production_time_s"],
        "ns_per_day": prod_ns / max(out["production_time_s"], 1e-12) * 86400.0,
        "swap_acceptance": acc.tolist(),
        "swap_attempts": out["swap_attempts"].tolist(),
        "round_trips": out["round_trips"],
        "kinetic_temperature": t_kin.mean(axis=1).tolist(),
        "degrees_of_freedom": dof,
        "mean_energy": out["potential"].mean(axis=1).tolist(),
    }
    if out["resumed_at_steps"]:
        info["resumed_at_steps"] = out["resumed_at_steps"]
    info.update(_cv_info(traj, getattr(system, "cvs", None)))
    return MDResult(
        trajectory=traj,
        energies=out["potential"][0].copy(),
        temperatures=temps,
        replica_energies=out["potential"],
        kinetic_energies=out["kinetic"],
        walkers=out["walkers"],
        replica_positions=out["positions"] if keep_all else None,
        info=info,
    )


def replica_exchange(
    system: Any,
    temperatures: list[float] | np.ndarray,
    n_frames: int,
    save_every: int = 100,
    swap_every: int = 500,
    **kwargs: Any,
) -> MDResult:
    """Parallel tempering; same as ``simulate(system, ..., temperatures=temperatures)``."""
    return simulate(
        system, n_frames, save_every, temperatures=temperatures, swap_every=swap_every, **kwargs
    )


def resolve_settings(settings: dict[str, Any], system_temperature: float) -> dict[str, Any]:
    """Fill defaults from :data:`MD_DEFAULTS` and resolve the temperature ladder.

    Unknown keys raise ``KeyError``. The result (plain JSON types) fully determines the
    trajectory, so it is what the data cache hashes.
    """
    unknown = set(settings) - set(MD_DEFAULTS)
    if unknown:
        raise KeyError(f"unknown MD settings {sorted(unknown)}; known: {sorted(MD_DEFAULTS)}")
    s = {**MD_DEFAULTS, **dict(settings)}
    t0 = float(system_temperature if s["temperature"] is None else s["temperature"])
    if s["temperatures"] is not None:
        temps = [float(t) for t in s["temperatures"]]
    else:
        temps = geometric_ladder(t0, float(s["t_max"]), int(s["n_replicas"])).tolist()
    n_rep = len(temps)
    extra = {}  # set only when used, so caches made before the option keep their keys
    if s["hydrogen_mass"] is not None:
        extra["hydrogen_mass"] = float(s["hydrogen_mass"])
    keep = s["keep_replicas"]
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n_rep:
        raise ValueError(
            f"keep_replicas must be an int in 1..{n_rep} (the number of replicas), got {keep!r}"
        )
    if keep > 1:
        extra["keep_replicas"] = keep
    return {
        "n_frames": int(s["n_frames"]),
        "save_every": int(s["save_every"]),
        "timestep": float(s["timestep"]),
        "friction": float(s["friction"]),
        "temperatures": [round(t, 6) for t in temps],
        "swap_every": int(s["swap_every"]) if n_rep > 1 else None,
        "equilibration_steps": int(s["equilibration_steps"]),
        "minimize": bool(s["minimize"]),
        "seed": int(s["seed"]),
        "platform": str(s["platform"]),
        **extra,
    }


def simulate_from_settings(
    system: Any,
    settings: dict[str, Any],
    n_workers: int | None = None,
    progress: bool = True,
    platform_properties: dict[str, str] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
    keep_checkpoint: bool = False,
) -> MDResult:
    """Run :func:`simulate` from a settings dict (keys of :data:`MD_DEFAULTS`);
    ``checkpoint``, ``checkpoint_every``, ``keep_checkpoint``: a folder to resume from after
    a crash, saved at most every that many seconds (see :func:`simulate`).

    With ``keep_replicas > 1`` the result's ``replica_positions`` holds every replica
    (the cache keeps the ``keep_replicas`` lowest temperatures).
    """
    s = resolve_settings(settings, system.temperature)
    temps = s.pop("temperatures")
    keep = s.pop("keep_replicas", 1)
    return simulate(
        system,
        temperatures=temps,
        n_workers=n_workers,
        progress=progress,
        platform_properties=platform_properties,
        keep_all=keep > 1,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        keep_checkpoint=keep_checkpoint,
        **s,
    )
