"""Internal coordinates: Z-matrices, ring frames, the IC <-> Cartesian flow and IC
normalisation."""

from __future__ import annotations

from .domain import DomainMap, SoftBox
from .internal import InternalCoordinates, bond_angles, bond_lengths, dihedral_angles
from .normalization import (
    CircularShift,
    ICTransform,
    Standardize,
    ic_transform,
    least_populated_angle,
    narrow_torsions,
    sibling_torsions,
)
from .rings import ring_systems, ring_zmatrix
from .whitening import Whiten, cartesian_blocks
from .zmatrix import bond_graph, build_zmatrix, validate_zmatrix

__all__ = [
    "InternalCoordinates",
    "bond_lengths",
    "bond_angles",
    "dihedral_angles",
    "Standardize",
    "CircularShift",
    "ICTransform",
    "ic_transform",
    "least_populated_angle",
    "narrow_torsions",
    "sibling_torsions",
    "build_zmatrix",
    "validate_zmatrix",
    "bond_graph",
    "ring_systems",
    "ring_zmatrix",
    "Whiten",
    "cartesian_blocks",
    "DomainMap",
    "SoftBox",
]
