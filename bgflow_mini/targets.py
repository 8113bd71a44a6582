"""One interface over what a Boltzmann generator is trained for: a molecule or a toy energy.

A :class:`Target` has a name, a dimension, named CVs and states, reference data (MD for
molecules, a Metropolis sampler for toys), a way to build its generator and its target
energy, an exact ΔF where one is known, and a ``spec`` (plain data) from which
:func:`load_target` rebuilds it, e.g. from a checkpoint. Code that trains, samples or
analyses uses this interface and never asks which kind of target it has.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from .energies import Energy
from .energies.toy import ToyEnergy
from .generator import BoltzmannGenerator

__all__ = [
    "Target",
    "MolecularTarget",
    "ToyTarget",
    "UnsupportedSystemError",
    "as_target",
    "load_target",
    "import_object",
]


class UnsupportedSystemError(ValueError):
    """The system uses a feature the internal-coordinate generator does not support yet."""


def import_object(path: str) -> Any:
    """The object named by a dotted path ``"package.module.name"``."""
    module, _, name = str(path).rpartition(".")
    if not module:
        raise ValueError(f"{path!r} is not a dotted path package.module.name")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {path!r}: {err}") from err


class Target(ABC):
    """What a generator learns to sample: energy, CVs, states, reference data.

    Attributes:
        kind: ``"molecular"`` or ``"toy"``.
        name: a short name (the system or toy name).
        dim: features per configuration (3 x atoms for molecules, nm).
        cvs: ``{name: spec}`` (see :mod:`bgflow_mini.cv`).
        states: ``{name: {cv: [lo, hi]}}``.
        default_states: the pair ``(state_a, state_b)`` reported by default.
        topology: an ``mdtraj.Topology`` for molecules, ``None`` for toys.
    """

    kind: str
    name: str
    dim: int
    topology: Any = None

    @property
    @abstractmethod
    def cvs(self) -> dict[str, dict]: ...

    @property
    @abstractmethod
    def states(self) -> dict[str, dict[str, list[float]]]: ...

    @property
    def default_states(self) -> tuple[str, str]:
        names = list(self.states)
        if len(names) < 2:
            raise ValueError(f"target {self.name!r} defines fewer than two states: {names}")
        return names[0], names[1]

    @abstractmethod
    def energy(self, backend: Callable[[Any], Energy] | None = None) -> Energy:
        """The target's reduced energy (kT); ``backend(system)`` builds it for molecules."""

    @abstractmethod
    def data(self, *, seed: int = 0, progress: bool = True, **settings: Any):
        """Reference configurations split into train/val/test blocks (a ``DataSplit``)."""

    def generator(
        self,
        train_x: Tensor,
        flow_factory: Callable,
        energy: Energy | None = None,
        bounded_ics: bool = False,
        ring_coordinates: str = "cartesian",
    ) -> BoltzmannGenerator:
        """A fresh generator fitted to ``train_x`` (normalisation), its ``.spec`` naming this
        target. Molecules only: ``bounded_ics`` keeps bonds and angles in their domain;
        ``ring_coordinates`` is ``"cartesian"`` (ring atoms in a per-ring frame) or
        ``"internal"`` (see :func:`~bgflow_mini.pipeline.molecular_generator`)."""
        gen = self._build(train_x, flow_factory, energy, bounded_ics, ring_coordinates)
        gen.spec["target"] = self.spec()
        return gen

    @abstractmethod
    def _build(
        self, train_x, flow_factory, energy, bounded_ics, ring_coordinates
    ) -> BoltzmannGenerator:
        """The generator of :meth:`generator`, before the target is recorded in its spec."""

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """Plain data from which :func:`load_target` rebuilds this target."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A hash of everything that defines the energy surface."""

    def reference_delta_f(self, state_a: str, state_b: str) -> float | None:
        """Exact ``F(state_b) - F(state_a)`` in kT where known (toys), else None."""
        return None

    def check_supported(self) -> None:  # noqa: B027 - optional hook, nothing to check here
        """Raise :class:`UnsupportedSystemError` for targets the generators cannot handle."""


class MolecularTarget(Target):
    """A :class:`~bgflow_mini.systems.MolecularSystem` (OpenMM) as a target."""

    kind = "molecular"

    def __init__(self, system: Any) -> None:
        self.system = system
        self.name = str(system.name)
        self.dim = int(system.dim)
        self.topology = system.mdtraj_topology

    @property
    def cvs(self) -> dict[str, dict]:
        return self.system.cvs

    @property
    def states(self) -> dict[str, dict[str, list[float]]]:
        return self.system.states

    def energy(self, backend: Callable[[Any], Energy] | None = None) -> Energy:
        if backend is None:
            from .energies import OpenMMEnergy

            backend = OpenMMEnergy
        return backend(self.system)

    def data(self, *, seed: int = 0, progress: bool = True, **settings: Any):
        """MD data from the cache (generated on a miss): ``md`` (settings), ``data_dir``,
        ``fractions``, ``stride``, ``n_workers``, ``replicas``, ``replica_weights``,
        ``reference_seeds``, ``extra_weightings`` (see
        :func:`~bgflow_mini.pipeline.molecular_data`); other settings are ignored."""
        from .pipeline import molecular_data

        return molecular_data(
            self.system,
            settings["md"],
            settings.get("data_dir", "data"),
            fractions=tuple(settings.get("fractions", (0.8, 0.1, 0.1))),
            stride=int(settings.get("stride", 1)),
            n_workers=settings.get("n_workers"),
            progress=progress,
            replicas=int(settings.get("replicas") or 1),
            replica_weights=str(settings.get("replica_weights") or "mbar"),
            reference_seeds=list(settings.get("reference_seeds") or ()),
            extra_weightings=list(settings.get("extra_weightings") or ()),
        )

    def _build(
        self, train_x, flow_factory, energy, bounded_ics, ring_coordinates
    ) -> BoltzmannGenerator:
        from .pipeline import molecular_generator

        self.check_supported()
        return molecular_generator(
            self.system,
            train_x,
            flow_factory,
            energy,
            bounded_ics=bounded_ics,
            ring_coordinates=ring_coordinates,
        )

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "path": str(self.system.path),
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> str:
        from .data import system_fingerprint

        return system_fingerprint(self.system)

    def check_supported(self) -> None:
        cfg = getattr(self.system, "config", {}) or {}
        problems = []
        if cfg.get("constraints") is not None:
            problems.append(
                f"constraints {cfg['constraints']!r} (the internal-coordinate flow treats "
                "constrained bonds as free; use constraints: null)"
            )
        molecules = self.topology.find_molecules()
        if len(molecules) > 1:
            parts = []
            for mol in molecules:
                names = sorted({a.residue.name for a in mol})
                parts.append(f"{len(mol)} atoms ({'/'.join(names)[:40]})")
            problems.append(
                f"{len(molecules)} separate molecules: {', '.join(parts[:6])}"
                + (", ..." if len(parts) > 6 else "")
                + " (waters, ions, ligands and several chains are not supported yet: the "
                "internal coordinates need one bonded molecule, e.g. one peptide chain in "
                "vacuum or implicit solvent)"
            )
        if self.system.system.usesPeriodicBoundaryConditions():
            problems.append(
                f"a periodic nonbonded method ({cfg.get('nonbonded_method')}); use NoCutoff "
                "or CutoffNonPeriodic (vacuum or implicit solvent)"
            )
        if problems:
            raise UnsupportedSystemError(
                f"system {self.name!r} is not supported yet: " + "; ".join(problems)
            )


class ToyTarget(Target):
    """An analytic :class:`~bgflow_mini.energies.toy.ToyEnergy` as a target."""

    kind = "toy"

    def __init__(self, energy: ToyEnergy, name: str | None = None) -> None:
        if not isinstance(energy, ToyEnergy):
            raise TypeError(f"a toy target needs a ToyEnergy, got {type(energy).__name__}")
        self.toy = energy
        self.name = str(name or energy.name)
        self.dim = int(energy.dim)

    @property
    def cvs(self) -> dict[str, dict]:
        return self.toy.cvs

    @property
    def states(self) -> dict[str, dict[str, list[float]]]:
        return self.toy.states

    @property
    def default_states(self) -> tuple[str, str]:
        return tuple(self.toy.default_states)

    def energy(self, backend: Callable[[Any], Energy] | None = None) -> Energy:
        return self.toy  # the toy is its own energy; backends do not apply

    def data(self, *, seed: int = 0, progress: bool = True, **settings: Any):
        """Metropolis samples: ``toy`` (sampler settings) and ``fractions``."""
        from .pipeline import toy_data

        return toy_data(
            self.toy,
            **dict(settings.get("toy") or {}),
            fractions=tuple(settings.get("fractions", (0.8, 0.1, 0.1))),
            seed=seed,
        )

    def _build(
        self, train_x, flow_factory, energy, bounded_ics, ring_coordinates
    ) -> BoltzmannGenerator:
        from .pipeline import toy_generator

        gen = toy_generator(self.toy, train_x, flow_factory)
        if energy is not None:
            gen.energy = energy
        return gen

    def spec(self) -> dict[str, Any]:
        cls = type(self.toy)
        return {
            "kind": self.kind,
            "name": self.name,
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "kwargs": dict(self.toy.init_args),
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> str:
        cls = type(self.toy)
        text = json.dumps([cls.__qualname__, self.toy.init_args], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def reference_delta_f(self, state_a: str, state_b: str) -> float | None:
        return self.toy.reference_delta_f(state_a, state_b)


def as_target(obj: Any) -> Target:
    """A :class:`Target` from a target, a molecular system, a toy energy or a system
    name / folder (loaded with :func:`~bgflow_mini.systems.load_system`)."""
    if isinstance(obj, Target):
        return obj
    if isinstance(obj, ToyEnergy):
        return ToyTarget(obj)
    if isinstance(obj, str | os.PathLike):
        from .systems import load_system

        return MolecularTarget(load_system(obj))
    if hasattr(obj, "mdtraj_topology") and hasattr(obj, "system"):
        return MolecularTarget(obj)
    raise TypeError(
        f"cannot make a target from {type(obj).__name__}: give a MolecularSystem, a "
        "ToyEnergy or a system name/folder"
    )


def load_target(spec: Mapping[str, Any], check_fingerprint: bool = True) -> Target:
    """Rebuild a target from :meth:`Target.spec` (e.g. a checkpoint's).

    A molecular target is loaded from the folder it was trained from when that folder still
    holds the same system, else by name (shipped systems, ``$BGFLOW_MINI_SYSTEMS``). With
    ``check_fingerprint`` a system whose force field or structure changed is an error.
    """
    kind = spec.get("kind")
    if kind == "toy":
        energy = import_object(spec["class"])(**dict(spec.get("kwargs") or {}))
        target: Target = ToyTarget(energy, spec.get("name"))
    elif kind == "molecular":
        from .systems import load_system

        # the folder it was trained from when it is still there and unchanged, else by name
        path = spec.get("path")
        target = None
        if path and os.path.isdir(path):
            target = MolecularTarget(load_system(path))
            if spec.get("fingerprint") and target.fingerprint() != spec["fingerprint"]:
                target = None
        if target is None:
            target = MolecularTarget(load_system(spec["name"]))
    else:
        raise ValueError(f"unknown target kind {kind!r} in {dict(spec)!r}")
    want = spec.get("fingerprint")
    if check_fingerprint and want and target.fingerprint() != want:
        raise ValueError(
            f"system {target.name!r} found here differs from the one the model was trained "
            f"on (fingerprint {target.fingerprint()} vs {want}): its force field, structure "
            "or settings changed"
        )
    return target
