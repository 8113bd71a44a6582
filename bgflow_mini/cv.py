"""Collective variables (CVs) from Cartesian coordinates or flat features, and states.

Molecular CVs (``torsion``, ``angle``, ``distance``) take positions ``(batch,
n_atoms*3)`` or ``(batch, n_atoms, 3)`` in nm and atom indices; torsions follow the
IUPAC sign convention used by ``mdtraj.compute_dihedrals`` and lie in [-pi, pi).
Feature CVs (``coordinate``, ``linear``) take flat features ``(batch, dim)`` of any
target (e.g. the 2-D toy energies) and need no atoms. Inputs are torch tensors
(differentiable, results follow their device/dtype) or numpy arrays (computed in
float64; numpy in, numpy out). Only torsions are periodic (period 2 pi).

Peptides name their backbone torsions ``phi``/``psi`` (one residue, e.g. a capped
dipeptide) or ``phi_k``/``psi_k`` (residue ``k``); :func:`ramachandran_pairs` finds every
such pair among a system's CVs.

CV specs (e.g. a system's ``cvs`` entries)::

    {"type": "torsion", "atoms": [i, j, k, l]}    # radians, [-pi, pi), periodic
    {"type": "angle", "atoms": [i, j, k]}         # radians, [0, pi]
    {"type": "distance", "atoms": [i, j]}         # nm
    {"type": "coordinate", "index": i}            # x[:, i]
    {"type": "linear", "coefficients": [c0, ..., c_{dim-1}], "offset": 0.0}  # x @ c + offset
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .units import wrap_angle

__all__ = [
    "torsion",
    "angle",
    "distance",
    "coordinate",
    "linear",
    "compute_cv",
    "compute_cvs",
    "is_periodic",
    "in_range",
    "in_state",
    "state_cvs",
    "ranges_overlap",
    "states_disjoint",
    "ramachandran_pairs",
    "CV_TYPES",
    "FEATURE_CV_TYPES",
    "ALL_CV_TYPES",
    "PERIODIC_CV_TYPES",
]

CV_TYPES = {"torsion": 4, "angle": 3, "distance": 2}
"""Molecular (atom-based) CV types -> number of atom indices in their ``atoms``."""
FEATURE_CV_TYPES = ("coordinate", "linear")
"""CV types on flat features ``(batch, dim)``, for any target (no atoms)."""
ALL_CV_TYPES = (*CV_TYPES, *FEATURE_CV_TYPES)
"""Every type :func:`compute_cv` accepts."""
PERIODIC_CV_TYPES = ("torsion",)
"""CV types with period 2 pi (values in [-pi, pi)); all others are non-periodic."""

_FEATURE_KEYS = {
    "coordinate": ({"type", "index"}, set()),
    "linear": ({"type", "coefficients"}, {"offset"}),
}


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
    phi = wrap_angle(phi)  # atan2 may return +pi
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


def _as_features(x) -> tuple[Tensor, bool]:
    is_numpy = isinstance(x, np.ndarray)
    t = torch.as_tensor(x, dtype=torch.float64) if is_numpy else x
    if not isinstance(t, Tensor):
        raise TypeError(f"features must be a tensor or numpy array, got {type(x).__name__}")
    if t.ndim < 2:
        raise ValueError(f"features must be (batch, dim), got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1), is_numpy


def _check_keys(spec: Mapping) -> None:
    required, optional = _FEATURE_KEYS[spec["type"]]
    missing, extra = required - set(spec), set(spec) - required - optional
    if missing or extra:
        raise ValueError(
            f"a {spec['type']!r} CV needs the keys {sorted(required)}"
            + (f" (optional: {sorted(optional)})" if optional else "")
            + f", got {sorted(spec)} in {dict(spec)!r}"
        )


def coordinate(x, index: int):
    """Feature ``index`` of flat features ``(batch, dim)``: ``x[:, index]``, shape (batch,).

    Inputs with more dimensions are flattened per sample first (``(batch, n, 3)`` ->
    ``(batch, 3 n)``). ``index`` must be an integer in [0, dim).
    """
    t, is_numpy = _as_features(x)
    dim = t.shape[1]
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < dim:
        raise ValueError(f"coordinate index must be an integer in [0, {dim}), got {index!r}")
    out = t[:, int(index)]
    return out.detach().cpu().numpy() if is_numpy else out


def linear(x, coefficients: Sequence[float], offset: float = 0.0):
    """Linear combination ``x @ coefficients + offset`` of flat features ``(batch, dim)``.

    ``coefficients`` needs ``dim`` finite numbers; returns (batch,) (numpy in, numpy out;
    differentiable in torch, gradient = coefficients).
    """
    t, is_numpy = _as_features(x)
    dim = t.shape[1]
    c = np.asarray(coefficients, dtype=np.float64)
    if c.shape != (dim,) or not np.isfinite(c).all():
        raise ValueError(
            f"linear CV needs {dim} finite coefficients (one per feature), got {coefficients!r}"
        )
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real):
        raise ValueError(f"linear CV offset must be a number, got {offset!r}")
    dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    out = t.to(dtype) @ torch.as_tensor(c, dtype=dtype, device=t.device) + float(offset)
    return out.detach().cpu().numpy() if is_numpy else out


_FUNCS = {"torsion": torsion, "angle": angle, "distance": distance}


def compute_cv(x, spec: Mapping):
    """One CV from a spec (types in the module docstring; unknown types raise ``ValueError``).

    ``x``: positions (molecular types) or flat features ``(batch, dim)`` (feature types).
    Returns ``(batch,)`` values (numpy in, numpy out).
    """
    kind = spec.get("type") if isinstance(spec, Mapping) else None
    if kind not in ALL_CV_TYPES:
        raise ValueError(f"CV type must be one of {list(ALL_CV_TYPES)}, got {kind!r} in {spec!r}")
    if kind in _FUNCS:
        if "atoms" not in spec:
            raise ValueError(f"a {kind!r} CV needs 'atoms' ({CV_TYPES[kind]} indices): {spec!r}")
        return _FUNCS[kind](x, spec["atoms"])
    _check_keys(spec)
    if kind == "coordinate":
        return coordinate(x, spec["index"])
    return linear(x, spec["coefficients"], spec.get("offset", 0.0))


def is_periodic(spec: Mapping | None) -> bool:
    """True for CV specs of a periodic type (torsions, period 2 pi); False for None."""
    return isinstance(spec, Mapping) and spec.get("type") in PERIODIC_CV_TYPES


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
    v, lo_w, hi_w = wrap_angle(values), wrap_angle(lo), wrap_angle(hi)
    if lo_w <= hi_w:
        return (v >= lo_w) & (v < hi_w)
    return lib.logical_or(v >= lo_w, v < hi_w)


def in_state(cv_values: Mapping, state: Mapping, cvs: Mapping[str, Mapping] | None = None):
    """Mask of samples inside a state given as CV ranges ``{name: [lo, hi]}``.

    ``cv_values`` maps CV names to values ``(batch,)``; ``cvs`` (the CV specs) marks
    which CVs are periodic (torsions, :func:`is_periodic`); without ``cvs`` none is.
    All ranges must hold (logical and).
    """
    mask = None
    for name, bounds in state.items():
        if name not in cv_values:
            raise KeyError(f"state uses unknown CV {name!r}; known: {sorted(cv_values)}")
        if len(bounds) != 2:
            raise ValueError(f"range of {name!r} must be [lo, hi], got {bounds!r}")
        periodic = cvs is not None and is_periodic(cvs.get(name))
        m = in_range(cv_values[name], float(bounds[0]), float(bounds[1]), periodic)
        mask = m if mask is None else mask & m
    if mask is None:
        raise ValueError("a state needs at least one CV range")
    return mask


def state_cvs(states: Mapping[str, Mapping], cvs: Mapping[str, Mapping] | None = None) -> list:
    """Names of the CVs that ``states`` (``{state: {cv: [lo, hi]}}``) use, in first-use order.

    With ``cvs`` (the CV specs) a CV that is not defined raises ``KeyError`` naming the
    state, so a caller can refuse before any expensive work.
    """
    names: dict[str, None] = {}
    for state, ranges in states.items():
        for name in ranges:
            if cvs is not None and name not in cvs:
                raise KeyError(
                    f"state {state!r} uses unknown CV {name!r}; this system defines {sorted(cvs)}"
                )
            names[str(name)] = None
    return list(names)


def _arcs(lo: float, hi: float, periodic: bool) -> list[tuple[float, float]]:
    """``[lo, hi)`` as half-open intervals, split at the ±pi cut for periodic CVs."""
    if not periodic:
        return [(lo, hi)]
    if hi - lo >= 2 * math.pi:
        return [(-math.pi, math.pi)]
    lo_w, hi_w = wrap_angle(lo), wrap_angle(hi)
    return [(lo_w, hi_w)] if lo_w <= hi_w else [(lo_w, math.pi), (-math.pi, hi_w)]


def ranges_overlap(a: Sequence[float], b: Sequence[float], periodic: bool = False) -> bool:
    """True if the ranges ``a = [lo, hi]`` and ``b`` share a value, read as in
    :func:`in_range` (``lo <= v < hi``; periodic ranges wrapped, possibly across the cut)."""
    arcs_a = _arcs(float(a[0]), float(a[1]), periodic)
    arcs_b = _arcs(float(b[0]), float(b[1]), periodic)
    return any(max(p[0], q[0]) < min(p[1], q[1]) for p in arcs_a for q in arcs_b)


def states_disjoint(a: Mapping, b: Mapping, cvs: Mapping[str, Mapping] | None = None) -> bool:
    """True if no configuration can lie in both states: they share a CV on which their
    ranges do not overlap (``cvs`` marks the periodic CVs, as in :func:`in_state`).

    False means the states *can* overlap (whether samples fall in both depends on them).
    """
    for name in set(a) & set(b):
        periodic = cvs is not None and is_periodic(cvs.get(name))
        if not ranges_overlap(a[name], b[name], periodic):
            return True
    return False


_PHI = re.compile(r"phi(?P<suffix>_[A-Za-z0-9]+)?")


def _natural(text: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def ramachandran_pairs(cvs: Mapping[str, Mapping]) -> list[tuple[str, str, str]]:
    """Every backbone pair of torsion CVs ``phi<suffix>`` / ``psi<suffix>`` (suffix ``""`` or
    ``"_k"``) as ``(residue, phi_name, psi_name)``.

    ``residue`` is ``""`` for the plain pair ``phi``/``psi`` and ``"k"`` for
    ``phi_k``/``psi_k``. Both CVs must be torsions. Ordered plain pair first, then by
    residue in natural order (``"2"`` before ``"10"``).

    Example::

        ramachandran_pairs({"phi_1": T, "psi_1": T, "chi1_1": T, "phi_2": T, "psi_2": T})
        # [("1", "phi_1", "psi_1"), ("2", "phi_2", "psi_2")]
    """
    out = []
    for name in cvs:
        m = _PHI.fullmatch(str(name))
        if m is None:
            continue
        suffix = m.group("suffix") or ""
        psi = "psi" + suffix
        if psi in cvs and is_periodic(cvs[name]) and is_periodic(cvs[psi]):
            out.append((suffix[1:], str(name), psi))
    return sorted(out, key=lambda p: (p[0] != "", _natural(p[0])))
