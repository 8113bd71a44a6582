"""Normalisation of internal coordinates and the full IC transform.

All layers follow the package convention: ``forward`` maps latent -> data,
``inverse`` maps data -> latent, logdets are exact and of shape ``(batch,)``.

* :class:`Standardize`: affine ``x = z * std + mean`` on selected features.
* :class:`CircularShift`: ``x = wrap(z + shift)`` on selected angles, chosen so
  that each angle's least-populated region sits at the +-pi cut of the latent.
* :class:`ICTransform` / :func:`ic_transform`: ``Sequential(Standardize,
  CircularShift, InternalCoordinates)`` fitted to training positions, i.e.
  ``flow(latent_ics) -> (cartesian, logdet)`` and
  ``flow.inverse(cartesian) -> (latent_ics, logdet)``.

Torsions come in two kinds. Broad or multimodal ones (backbone phi/psi, methyl
rotors) stay angles in the latent space (``circular``) and are modelled by circular
couplings on a uniform prior. Narrow ones (the torsions that place a hydrogen, an
oxygen or a side chain relative to a sibling atom, :func:`sibling_torsions`) are
unrolled on the interval of width 2 pi centred on their data and then
standardised like bonds and angles, so they start from a Gaussian fitted to the data
instead of a uniform angle (:func:`narrow_torsions`). For those, the density of an
angle is that of its one preimage in the interval; the model's mass outside the
interval (more than pi from the data) is not counted, which is exact to many digits
when the data span less than half of the circle (the default criterion).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..flows.base import Flow, Sequential, check_batch
from ..units import wrap_angle
from .internal import InternalCoordinates

__all__ = [
    "least_populated_angle",
    "narrow_torsions",
    "sibling_torsions",
    "Standardize",
    "CircularShift",
    "ICTransform",
    "ic_transform",
]


def least_populated_angle(angles: Tensor, n_bins: int = 36) -> Tensor:
    """Centre (radians) of the widest circular run of least-populated histogram bins.

    Arguments:
        angles: ``(n_samples, k)`` angles in radians (any range; wrapped first).
        n_bins: histogram bins over [-pi, pi).

    Returns:
        ``(k,)`` angles in [-pi, pi), same dtype/device as ``angles``.
    """
    check_batch(angles, None, "angles")
    if n_bins < 2:
        raise ValueError(f"n_bins must be >= 2, got {n_bins}")
    a = wrap_angle(angles.detach()).cpu().double().numpy()
    width = 2 * math.pi / n_bins
    idx = np.clip(np.floor((a + math.pi) / width).astype(np.int64), 0, n_bins - 1)
    out = np.empty(a.shape[1])
    for j in range(a.shape[1]):
        counts = np.bincount(idx[:, j], minlength=n_bins)
        is_min = np.concatenate([counts, counts]) == counts.min()
        best_len, best_start, run = 0, 0, 0
        for i in range(2 * n_bins):  # runs on the doubled array handle wrap-around
            run = run + 1 if is_min[i] else 0
            if min(run, n_bins) > best_len:
                best_len, best_start = min(run, n_bins), i - min(run, n_bins) + 1
        centre_bin = best_start + best_len / 2.0  # in bin units, may exceed n_bins
        out[j] = -math.pi + centre_bin * width
    return wrap_angle(torch.as_tensor(out, dtype=angles.dtype, device=angles.device))


def narrow_torsions(angles: Tensor, max_gap: float = math.pi) -> Tensor:
    """Which angle columns leave a gap wider than ``max_gap`` (radians) on the circle.

    Arguments:
        angles: ``(n_samples, k)`` angles in radians.
        max_gap: a column whose largest empty arc between consecutive samples
            (wrap-around included) exceeds this is narrow.

    Returns:
        bool ``(k,)``: True = narrow (the data cover less than ``2 pi - max_gap``).
    """
    check_batch(angles, None, "angles")
    if not 0 < max_gap < 2 * math.pi:
        raise ValueError(f"max_gap must be in (0, 2 pi), got {max_gap}")
    a = torch.sort(torch.remainder(angles.detach().double(), 2 * math.pi), dim=0).values
    gaps = torch.cat([a[1:] - a[:-1], a[:1] + 2 * math.pi - a[-1:]], dim=0)
    return (gaps.max(dim=0).values > max_gap).to(angles.device)


def sibling_torsions(zmatrix: Any, cartesian: Any = None, bonds: Any = None) -> Tensor:
    """Which torsion rows of a Z-matrix place an atom relative to a sibling.

    Row ``(i, j, k, l)`` is a sibling torsion when ``l`` is bonded to ``j`` (like ``i``),
    e.g. the second hydrogen of a methyl group relative to the first, or a carbonyl
    oxygen relative to the next nitrogen. Local geometry fixes such a torsion near one
    value, whereas a proper torsion (``l`` bonded to ``k``) rotates about the ``j-k``
    bond (backbone phi/psi, methyl rotors). Bonds are those of the Z-matrix (its
    ``(i, j)`` pairs) unless ``bonds`` (``(n_bonds, 2)``, the molecule's) are given.
    Cartesian rows (bool ``cartesian`` ``(N,)`` by row) have no torsion and are left out
    of the result; their ``(i, j)`` pairs are not bonds, so give ``bonds`` to see the
    bonds to ring atoms placed that way.

    Returns:
        bool ``(n_torsions,)`` in the order of the torsion rows (rows with ``l >= 0``
        that are not Cartesian).
    """
    z = np.asarray(zmatrix, dtype=np.int64)
    if cartesian is not None:
        z = z[~np.asarray(cartesian, dtype=bool)]
    if bonds is None:
        pairs = {frozenset((int(r[0]), int(r[1]))) for r in z if r[1] >= 0}
    else:
        pairs = {frozenset((int(i), int(j))) for i, j in np.asarray(bonds).reshape(-1, 2)}
    rows = [r for r in z if r[3] >= 0]
    return torch.tensor(
        [frozenset((int(r[3]), int(r[1]))) in pairs for r in rows], dtype=torch.bool
    )


def _full(values: Any, mask: Tensor, fill: float, name: str) -> Tensor:
    """Expand ``values`` of shape ``(dim,)`` or ``(mask.sum(),)`` to a ``(dim,)`` tensor."""
    v = torch.as_tensor(values).detach()
    if not v.is_floating_point():
        v = v.double()
    v = v.to(mask.device)
    out = torch.full(mask.shape, fill, dtype=v.dtype, device=mask.device)
    if v.shape == mask.shape:
        out[mask] = v[mask]
    elif v.shape == (int(mask.sum()),):
        out[mask] = v
    else:
        raise ValueError(
            f"{name} must have shape ({mask.numel()},) or ({int(mask.sum())},), got "
            f"{tuple(v.shape)}"
        )
    return out


def _as_mask(mask: Any) -> Tensor:
    m = torch.as_tensor(mask)
    if m.dtype != torch.bool or m.ndim != 1:
        raise ValueError(f"mask must be a 1-d bool tensor, got {m.dtype} {tuple(m.shape)}")
    return m.clone()


class Standardize(Flow):
    """Affine normalisation of the features selected by ``mask``.

    ``forward(z) = z * std + mean`` (latent -> data, logdet ``sum log std``);
    ``inverse(x) = (x - mean) / std`` (logdet ``-sum log std``); unselected features
    pass through.  ``mean`` and ``std`` have shape ``(dim,)`` or ``(mask.sum(),)``.
    """

    def __init__(self, mean: Any, std: Any, mask: Any) -> None:
        super().__init__()
        mask = _as_mask(mask)
        self.dim = mask.numel()
        shift = _full(mean, mask, 0.0, "mean")
        scale = _full(std, mask, 1.0, "std").to(shift.dtype)
        if not torch.all(scale[mask] > 0):
            raise ValueError("std must be positive for all selected features")
        self.register_buffer("mask", mask)
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    @classmethod
    def from_data(cls, data: Tensor, mask: Any, min_std: float = 1e-6) -> Standardize:
        """Mean and std (clamped at ``min_std``) of ``data`` ``(n_samples, dim)``."""
        mask = _as_mask(mask)
        check_batch(data, mask.numel(), "data")
        if data.shape[0] < 2:
            raise ValueError("need at least 2 samples to estimate a standard deviation")
        d = data.detach()
        return cls(d.mean(0), d.std(0).clamp_min(min_std), mask)

    def _logdet(self, x: Tensor) -> Tensor:
        return torch.log(self.scale.to(x)).sum().expand(x.shape[0])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(z, self.dim, "latent")
        return torch.addcmul(self.shift.to(z), z, self.scale.to(z)), self._logdet(z)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(x, self.dim, "data")
        return (x - self.shift.to(x)) / self.scale.to(x), -self._logdet(x)


class CircularShift(Flow):
    """Rotate the angles selected by ``mask``: ``x = wrap(z + shift)``, ``z = wrap(x - shift)``.

    Selected outputs are wrapped into [-pi, pi); unselected features pass through.
    The map is a bijection of the circle, logdet 0.  With ``shift = a + pi`` the data
    angle ``a`` lands on the latent cut ``-pi``: :meth:`from_data` uses ``a`` =
    :func:`least_populated_angle`.
    """

    def __init__(self, shift: Any, mask: Any) -> None:
        super().__init__()
        mask = _as_mask(mask)
        self.dim = mask.numel()
        self.register_buffer("mask", mask)
        self.register_buffer("shift", _full(shift, mask, 0.0, "shift"))

    @classmethod
    def from_data(cls, angles: Tensor, mask: Any, n_bins: int = 36) -> CircularShift:
        """Shift each selected column of ``angles`` ``(n, dim)`` so that its least
        populated bin sits at the +-pi cut."""
        mask = _as_mask(mask)
        check_batch(angles, mask.numel(), "angles")
        cut = least_populated_angle(angles[:, mask], n_bins)
        return cls(wrap_angle(cut + math.pi), mask)

    def _rotate(self, v: Tensor, sign: float) -> Tensor:
        out = wrap_angle(v + sign * self.shift.to(v))
        return torch.where(self.mask, out, v)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(z, self.dim, "latent")
        return self._rotate(z, 1.0), z.new_zeros(z.shape[0])

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(x, self.dim, "data")
        return self._rotate(x, -1.0), x.new_zeros(x.shape[0])


def _positions_tensor(positions: Any, n_atoms: int) -> Tensor:
    """Training positions as ``(n_frames, 3 * n_atoms)`` tensor (nm); validates shape."""
    if hasattr(positions, "xyz") and not isinstance(positions, Tensor):  # mdtraj.Trajectory
        positions = positions.xyz
    x = torch.as_tensor(np.asarray(positions) if not isinstance(positions, Tensor) else positions)
    if not x.is_floating_point():
        raise ValueError(f"train_positions must be floating point, got {x.dtype}")
    if x.ndim == 3 and x.shape[1:] == (n_atoms, 3):
        x = x.reshape(x.shape[0], 3 * n_atoms)
    if x.ndim != 2 or x.shape[1] != 3 * n_atoms:
        raise ValueError(
            f"train_positions must have shape (n_frames, {3 * n_atoms}) or "
            f"(n_frames, {n_atoms}, 3), got {tuple(x.shape)}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 training frames, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError("train_positions contain non-finite values")
    return x.detach()


class ICTransform(Sequential):
    """``Sequential([SoftBox,] [Whiten,] Standardize, CircularShift, [DomainMap,]
    InternalCoordinates)``.

    ``forward(z)`` maps normalised ICs ``(batch, 3N-6)`` -> Cartesian ``(batch, 3N)``
    nm; ``inverse(x)`` maps back.  Latent layout equals the IC layout of
    :class:`InternalCoordinates`: standardised bonds, angles and narrow torsions;
    the other torsions stay angles in [-pi, pi). ``circular`` (bool ``(3N-6,)``) marks
    those latent angles: the torsions that ``standardize`` leaves alone. With a
    :class:`~bgflow_mini.coordinates.domain.DomainMap` the standardised quantities are
    ``log r`` and ``logit(theta / pi)``, so no latent value maps outside the domain.
    Ring atoms placed as Cartesian rows are standardised and then decorrelated per ring
    system by a :class:`~bgflow_mini.coordinates.whitening.Whiten` layer (``whiten``);
    a :class:`~bgflow_mini.coordinates.domain.SoftBox` (``box``) keeps the latent
    features that are not angles inside a box around the data.
    """

    def __init__(
        self,
        standardize: Standardize,
        shift: CircularShift,
        internal: InternalCoordinates,
        domain: Flow | None = None,
        whiten: Flow | None = None,
        box: Flow | None = None,
    ) -> None:
        if not (standardize.dim == shift.dim == internal.dim):
            raise ValueError("standardize, shift and internal must have the same dim")
        if not (standardize.mask | internal.circular).all():
            raise ValueError("every bond and angle must be standardised")
        if bool(internal.cartesian.any()) != (whiten is not None):
            raise ValueError("a Whiten layer is needed exactly when there are Cartesian rows")
        layers = ((box,) if box is not None else ()) + ((whiten,) if whiten is not None else ())
        layers += (standardize, shift)
        layers += ((domain,) if domain is not None else ()) + (internal,)
        super().__init__(*layers)
        self.dim = internal.dim
        self.register_buffer("circular", internal.circular & ~standardize.mask)

    @property
    def internal(self) -> InternalCoordinates:
        return self.flows[-1]


def ic_transform(
    zmatrix: Any,
    train_positions: Any,
    *,
    cartesian: Any = None,
    bonds: Any = None,
    circular: str | Any = "auto",
    max_gap: float = math.pi,
    n_bins: int = 36,
    min_std: float = 1e-6,
    bounded: bool | str = False,
) -> tuple[ICTransform, Tensor]:
    """Fit the IC normalisation to training data.

    Arguments:
        zmatrix: ``(N, 4)`` Z-matrix (see :func:`build_zmatrix`).
        cartesian: optional bool ``(N,)`` by row: Cartesian rows (ring atoms, see
            :func:`~bgflow_mini.coordinates.rings.ring_zmatrix`), standardised and then
            whitened per ring system.
        bonds: optional ``(n_bonds, 2)`` bonds of the molecule, for
            :func:`sibling_torsions` (needed with Cartesian rows, whose Z-matrix pairs
            are not bonds).
        train_positions: ``(n_frames, 3N)`` or ``(n_frames, N, 3)`` nm (tensor, array
            or mdtraj.Trajectory).
        circular: which torsions stay latent angles: ``"auto"`` (all but the sibling
            torsions, :func:`sibling_torsions`, whose training data are narrow by
            :func:`narrow_torsions` with ``max_gap``), ``"all"``, or a bool
            mask ``(3N-6,)`` that may only select torsions (e.g. a trained model's
            ``prior.circular``, to rebuild it without its data).
        max_gap: see :func:`narrow_torsions`.
        n_bins: histogram bins for the torsion cut.
        min_std: lower bound of the standard deviations.
        bounded: standardise ``log r`` and ``logit(theta / pi)`` instead of bonds and
            angles (a :class:`~bgflow_mini.coordinates.domain.DomainMap`), so that samples
            can never have a bond <= 0 or an angle outside (0, pi). ``"box"``: that,
            and every latent feature that is not an angle (standardised bonds, angles,
            narrow torsions, whitened ring coordinates) kept inside a box around the
            data by a :class:`~bgflow_mini.coordinates.domain.SoftBox` (half-widths 1.5
            times the training data's largest value, at least 6 standard deviations),
            so the model's entropy is bounded (reverse KL from the energy alone).

    Returns:
        ``(flow, circular)``: the :class:`ICTransform` (buffers in the training data's
        dtype; inputs of other dtypes work too) and its bool mask ``(3N-6,)`` of
        latent angle features.
    """
    internal = InternalCoordinates(zmatrix, cartesian)
    x = _positions_tensor(train_positions, internal.n_atoms)
    ics, _ = internal.inverse(x)
    torsions = internal.circular
    if isinstance(circular, str):
        if circular == "all":
            latent = torsions.clone()
        elif circular == "auto":
            latent = torsions.clone()
            narrow = narrow_torsions(ics[:, torsions], max_gap).cpu()
            siblings = sibling_torsions(
                internal.zmatrix, internal.cartesian_rows.cpu(), bonds=bonds
            )
            latent[torsions] = ~(narrow & siblings)
        else:
            raise ValueError(f"circular must be 'auto', 'all' or a bool mask, got {circular!r}")
    else:
        latent = torch.as_tensor(circular).detach().cpu()
        if latent.dtype != torch.bool or latent.shape != torsions.shape:
            raise ValueError(
                f"circular mask must be bool of shape {tuple(torsions.shape)}, got "
                f"{latent.dtype} {tuple(latent.shape)}"
            )
        if (latent & ~torsions).any():
            raise ValueError("circular mask selects features that are not torsions")
    domain = None
    if bounded not in (False, True, "box"):
        raise ValueError(f"bounded must be False, True or 'box', got {bounded!r}")
    if bounded:
        from .domain import DomainMap

        domain = DomainMap(internal.dim, bond_mask(internal), angle_mask(internal))
        ics, _ = domain.inverse(ics)
    shift = CircularShift.from_data(ics, torsions, n_bins=n_bins)
    shifted, _ = shift.inverse(ics)
    standardize = Standardize.from_data(shifted, ~latent.to(ics.device), min_std=min_std)
    z, _ = standardize.inverse(shifted)  # the training frames' latent, up to whitening
    whiten = None
    if internal.cartesian.any():
        from .whitening import Whiten, cartesian_blocks

        whiten = Whiten.from_data(z, cartesian_blocks(internal))
    box = None
    if bounded == "box":
        from .domain import SoftBox

        if whiten is not None:
            z, _ = whiten.inverse(z)
        box = SoftBox.from_data(z, (~latent).nonzero().squeeze(1))  # all but the angles
    flow = ICTransform(standardize, shift, internal, domain, whiten, box)
    return flow, flow.circular


def bond_mask(internal: InternalCoordinates) -> Tensor:
    """Bool ``(3N-6,)``: the bond features of ``internal``."""
    m = torch.zeros(internal.dim, dtype=torch.bool)
    m[internal.bond_idx.cpu()] = True
    return m & ~internal.cartesian.cpu()


def angle_mask(internal: InternalCoordinates) -> Tensor:
    """Bool ``(3N-6,)``: the angle features of ``internal``."""
    m = torch.zeros(internal.dim, dtype=torch.bool)
    m[internal.angle_idx.cpu()] = True
    return m & ~internal.cartesian.cpu()
