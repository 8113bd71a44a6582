"""Energies returning reduced energies u/kT of shape ``(batch,)``."""

from .base import Energy
from .openmm import OpenMMEnergy
from .regularization import LinLogCut, linlogcut
from .torchff import TorchForceField
from .toy import DoubleWell, MuellerBrown, ToyEnergy

__all__ = [
    "Energy",
    "OpenMMEnergy",
    "LinLogCut",
    "linlogcut",
    "DoubleWell",
    "MuellerBrown",
    "ToyEnergy",
    "TorchForceField",
]
