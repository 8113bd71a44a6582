"""bgflow_mini: Boltzmann generators with normalizing flows, OpenMM energies and reweighting.

Public names: :class:`BoltzmannGenerator`, the priors :class:`StandardNormal`,
:class:`DiagonalNormal`, :class:`NormalUniform`, and :class:`Trainer` / :class:`Phase`.
Sub-packages: ``flows``, ``energies``, ``coordinates``; modules ``losses``,
``reweighting``, ``sampling``, ``cv``, ``systems``, ``md``, ``data``, ``plotting``,
``evaluation``, ``pipeline``, ``free_energy``, ``bounds``, ``toy_recipes``.
"""

from .distributions import DiagonalNormal, NormalUniform, StandardNormal
from .generator import BoltzmannGenerator
from .training import Phase, Trainer

__version__ = "0.1.0"

__all__ = [
    "BoltzmannGenerator",
    "StandardNormal",
    "DiagonalNormal",
    "NormalUniform",
    "Trainer",
    "Phase",
]
