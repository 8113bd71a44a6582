"""Collective variables from Cartesian coordinates, and states as CV ranges.

Positions are ``(batch, n_atoms*3)`` or ``(batch, n_atoms, 3)`` in nm, as torch
tensors (differentiable) or numpy arrays (numpy in, numpy out). Torsions follow the
IUPAC sign convention used by ``mdtraj.compute_dihedrals`` and lie in [-pi, pi).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "torsion",
    "angle",
    "distance",
    "compute_cv",
    "compute_cvs",
    "in_range",
    "in_state",
    "CV_TYPES",
]

CV_TYPES = {"torsion": 4, "angle": 3, "distance": 2}


def _as_xyz(x) -> tuple[Tensor, bool]:
    is_numpy = isinstance(x, np.ndarray)
    t = torch.as_tensor(x, dtype=torch.float64) if is_numpy else x
    if not isinstance(t, Tensor):
        raise TypeError(f"positions must be a tensor or numpy array, got {type(x).__name__}")
    if t.ndim == 2:
        if t.shape[1] % 3:
            raise ValueError(f"positions (batch, n_atoms*3) need a multiple of 3, got {t.shape}")
        t = t.reshape(t.shape[0], -1, 3)
    if t.ndim != 3 or t.shape[2] != 3:
        raise ValueError(
            f"positions must be (batch, n_atoms*3) or (batch, n_atoms, 3), got {tuple(t.shape)}"
        )
    return t, is_numpy


def _atoms(atoms, n: int, n_atoms: int) -> Tensor:
    idx = torch.as_tensor(np.asarray(atoms, dtype=np.int64))
    if idx.ndim == 1:
        idx = idx[None]
    if idx.ndim != 2 or idx.shape[1] != n:
        raise ValueError(f"expected {n} atom indices per CV, got shape {tuple(idx.shape)}")
    if (idx < 0).any() or (idx >= n_atoms).any():
        raise ValueError(f"atom indices {idx.tolist()} out of range for {n_atoms} atoms")
    return idx


def _out(values: Tensor, atoms, is_numpy: bool):
    if np.asarray(atoms).ndim == 1:
        values = values[:, 0]
    return values.detach().cpu().numpy() if is_numpy else values


def torsion(x, atoms):
    """Dihedral angle (radians, [-pi, pi)) of atoms ``(4,)`` or ``(k, 4)``.

    Returns ``(batch,)`` for one quadruple or ``(batch, k)`` for ``k`` of them.
    """
    xyz, is_numpy = _as_xyz(x)
    idx = _atoms(atoms, 4, xyz.shape[1]).to(xyz.device)
    p = xyz[:, idx]  # (batch, k, 4, 3)
    b0, b1, b2 = (
        p[..., 1, :] - p[..., 0, :],
        p[..., 2, :] - p[..., 1, :],
        p[..., 3, :] - p[..., 2, :],
    )
    n1, n2 = torch.cross(b0, b1, dim=-1), torch.cross(b1, b2, dim=-1)
    m = torch.cross(b1 / b1.norm(dim=-1, keepdim=True), n1, dim=-1)
    phi = torch.atan2((m * n2).sum(-1), (n1 * n2).sum(-1))
    phi = torch.where(phi >= math.pi, phi - 2 * math.pi, phi)
    return _out(phi, atoms, is_numpy)


def angle(x, atoms):
    """Bond angle (radians, [0, pi]) at the middle atom of ``(3,)`` or ``(k, 3)`` atoms."""
    xyz, is_numpy = _as_xyz(x)
    idx = _atoms(atoms, 3, xyz.shape[1]).to(xyz.device)
    p = xyz[:, idx]
    u, v = p[..., 0, :] - p[..., 1, :], p[..., 2, :] - p[..., 1, :]
    theta = torch.atan2(torch.cross(u, v, dim=-1).norm(dim=-1), (u * v).sum(-1))
    return _out(theta, atoms, is_numpy)


def distance(x, atoms):
    """Distance (nm) between the atoms of ``(2,)`` or ``(k, 2)`` index pairs."""
    xyz, is_numpy = _as_xyz(x)
    idx = _atoms(atoms, 2, xyz.shape[1]).to(xyz.device)
    p = xyz[:, idx]
    return _out((p[..., 1, :] - p[..., 0, :]).norm(dim=-1), atoms, is_numpy)


_FUNCS = {"torsion": torsion, "angle": angle, "distance": distance}


def compute_cv(x, spec: Mapping):
    """One CV from a spec ``{"type": "torsion"|"angle"|"distance", "atoms": [...]}``."""
    kind = spec.get("type") if isinstance(spec, Mapping) else None
    if kind not in _FUNCS:
        raise ValueError(f"CV type must be one of {sorted(_FUNCS)}, got {kind!r} in {spec!r}")
    return _FUNCS[kind](x, spec["atoms"])


def compute_cvs(x, cvs: Mapping[str, Mapping], names: Sequence[str] | None = None) -> dict:
    """Named CVs (e.g. a system's ``cvs``) -> ``{name: values (batch,)}``.

    ``names`` selects a subset; an unknown name raises ``KeyError`` listing the known ones.
    """
    names = list(cvs) if names is None else list(names)
    for name in names:
        if name not in cvs:
            raise KeyError(f"unknown CV {name!r}; this system defines {sorted(cvs)}")
    return {name: compute_cv(x, cvs[name]) for name in names}


def in_range(values, lo: float, hi: float, periodic: bool = False):
    """Boolean mask of ``lo <= values < hi``.

    For periodic CVs (torsions, period 2 pi) values and bounds are wrapped to
    [-pi, pi) first, and a range with ``lo > hi`` after wrapping crosses the ±pi cut,
    e.g. ``(2.5, -2.5)`` selects ``|phi| >= 2.5``.
    """
    if not periodic:
        return (values >= lo) & (values < hi)
    if hi - lo >= 2 * math.pi:
        return values == values  # everything (NaN excluded)
    lib = np if isinstance(values, np.ndarray) else torch
    wrap = lambda a: (a + math.pi) % (2 * math.pi) - math.pi  # noqa: E731
    v, lo_w, hi_w = wrap(values), wrap(lo), wrap(hi)
    if lo_w <= hi_w:
        return (v >= lo_w) & (v < hi_w)
    return lib.logical_or(v >= lo_w, v < hi_w)


def in_state(cv_values: Mapping, state: Mapping, cvs: Mapping[str, Mapping] | None = None):
    """Mask of samples inside a state given as CV ranges ``{name: [lo, hi]}``.

    ``cv_values`` maps CV names to values ``(batch,)``; ``cvs`` (the CV specs) marks
    which CVs are torsions (periodic). All ranges must hold (logical and).
    """
    mask = None
    for name, bounds in state.items():
        if name not in cv_values:
            raise KeyError(f"state uses unknown CV {name!r}; known: {sorted(cv_values)}")
        if len(bounds) != 2:
            raise ValueError(f"range of {name!r} must be [lo, hi], got {bounds!r}")
        periodic = cvs is not None and cvs.get(name, {}).get("type") == "torsion"
        m = in_range(cv_values[name], float(bounds[0]), float(bounds[1]), periodic)
        mask = m if mask is None else mask & m
    if mask is None:
        raise ValueError("a state needs at least one CV range")
    return mask
