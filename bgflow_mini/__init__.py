"""bgflow_mini: Boltzmann generators with normalizing flows, OpenMM energies and reweighting.

Public names: :class:`BoltzmannGenerator`, the priors :class:`StandardNormal`,
:class:`DiagonalNormal`, :class:`NormalUniform`, :class:`Trainer` / :class:`Phase`,
:func:`load_generator` / :func:`save_generator` (self-describing checkpoints) and
:func:`as_target` / :func:`load_target`. Every sub-module is reachable as an attribute
(imported on first use), e.g. ``import bgflow_mini as bg; bg.systems.load_system(...)``,
``bg.reweighting``, ``bg.energies``, ``bg.flows``, ``bg.coordinates``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .checkpoint import load_generator, save_generator
from .distributions import DiagonalNormal, NormalUniform, StandardNormal
from .generator import BoltzmannGenerator
from .targets import as_target, load_target
from .training import Phase, Trainer

try:
    __version__ = version("bgflow_mini")  # pyproject.toml is the one place it is set
except PackageNotFoundError:  # a checkout on sys.path without an install
    __version__ = "0+unknown"

__all__ = [
    "BoltzmannGenerator",
    "StandardNormal",
    "DiagonalNormal",
    "NormalUniform",
    "Trainer",
    "Phase",
    "load_generator",
    "save_generator",
    "as_target",
    "load_target",
]

SUBMODULES = (
    "ais",
    "analysis",
    "annealing",
    "averaging",
    "bounds",
    "checkpoint",
    "chirality",
    "coordinates",
    "cv",
    "data",
    "distributed",
    "distributions",
    "energies",
    "evaluation",
    "file_lock",
    "fileio",
    "flows",
    "free_energy",
    "free_energy_io",
    "generator",
    "losses",
    "md",
    "md_checkpoint",
    "md_reference",
    "monitor",
    "pareto",
    "peptide_geometry",
    "pipeline",
    "plotting",
    "records",
    "replica",
    "replica_pool",
    "replica_workers",
    "report",
    "reweighting",
    "ring_geometry",
    "run_evaluation",
    "run_logger",
    "samples",
    "sampling",
    "schedules",
    "sharded_draws",
    "state_balance",
    "state_feedback",
    "symmetry",
    "system_builder",
    "systems",
    "targets",
    "toy_recipes",
    "training",
    "units",
    "weight_drivers",
)


def __getattr__(name: str) -> Any:
    """Import a sub-module on first attribute access (``bg.systems``, ``bg.md``, ...)."""
    if name in SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'bgflow_mini' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBMODULES))
