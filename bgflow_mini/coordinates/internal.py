"""Internal coordinates (bonds, angles, torsions) as an invertible :class:`Flow`.

Feature layout of the ``3N - 6`` internal coordinates, with Z-matrix rows in
placement order (see :mod:`bgflow_mini.coordinates.zmatrix`):

* ``[0, N-1)``: bonds of rows ``1..N-1`` (nm),
* ``[N-1, 2N-3)``: angles of rows ``2..N-1`` (radians, in (0, pi)),
* ``[2N-3, 3N-6)``: torsions of rows ``3..N-1`` (radians, in [-pi, pi), IUPAC sign
  as in ``mdtraj.compute_dihedrals``).

Forward (IC -> Cartesian ``(batch, 3N)`` nm, atoms in topology order) puts the
first atom at the origin, the second on the +x axis and the third in the xy plane
with y > 0.  The inverse reads ICs from any orientation; the 6 rigid-body degrees
of freedom are discarded.

Log-determinant convention.  Write Cartesian positions as a function of
``(t, alpha, beta, gamma, ics)``: ``t`` = position of atom 0, ``(alpha, beta)`` =
azimuth and polar angle of the direction of bond 1, ``gamma`` = rotation of the
molecule about bond 1.  Placing the atoms one after another in spherical
coordinates around their bond reference gives the triangular Jacobian

    |det d x / d(t, alpha, beta, gamma, ics)| = sin(beta) * prod_{i>=1} r_i^2
                                                * prod_{i>=2} |sin(theta_i)|,

where ``r_i`` / ``theta_i`` are the bond / angle of row ``i``.  ``sin(beta)`` is the
density of the rotation parametrisation (uniform rotations have density
``sin(beta) / (8 pi^2)`` in these angles) and is *not* included: the forward
logdet is ``sum_i 2 log r_i + sum_i log|sin theta_i|``, the inverse logdet its
negative.  Hence ``log p_x(x) = log p_ic(ics) - logdet_forward - log(8 pi^2 V)``
for a density that is uniform over translations (volume ``V``) and rotations.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..flows.base import Flow, check_batch
from .zmatrix import build_zmatrix, validate_zmatrix

__all__ = ["InternalCoordinates", "bond_lengths", "bond_angles", "dihedral_angles"]


def _norm(v: Tensor) -> Tensor:
    return torch.linalg.vector_norm(v, dim=-1)


def bond_lengths(x: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Distances ``|x_i - x_j|``; ``x`` is ``(batch, n_atoms, 3)``, returns ``(batch, k)``."""
    return _norm(x[:, i] - x[:, j])


def bond_angles(x: Tensor, i: Tensor, j: Tensor, k: Tensor) -> Tensor:
    """Angles ``i-j-k`` in radians, in [0, pi]; returns ``(batch, m)``."""
    u = x[:, i] - x[:, j]
    v = x[:, k] - x[:, j]
    return torch.atan2(_norm(torch.linalg.cross(u, v, dim=-1)), (u * v).sum(-1))


def dihedral_angles(x: Tensor, i: Tensor, j: Tensor, k: Tensor, l: Tensor) -> Tensor:
    """Dihedrals ``i-j-k-l`` (IUPAC sign, as ``mdtraj.compute_dihedrals``) in [-pi, pi)."""
    b1 = x[:, j] - x[:, i]
    b2 = x[:, k] - x[:, j]
    b3 = x[:, l] - x[:, k]
    n1 = torch.linalg.cross(b1, b2, dim=-1)
    n2 = torch.linalg.cross(b2, b3, dim=-1)
    y = _norm(b2) * (b1 * n2).sum(-1)
    phi = torch.atan2(y, (n1 * n2).sum(-1))
    return torch.where(phi >= math.pi, phi - 2 * math.pi, phi)


def _place(pd: Tensor, pc: Tensor, pb: Tensor, r: Tensor, theta: Tensor, phi: Tensor) -> Tensor:
    """NeRF: atom ``a`` with ``|a-b| = r``, ``angle(a,b,c) = theta``, ``dihedral(a,b,c,d) = phi``.

    ``pd, pc, pb`` are ``(batch, g, 3)``, ``r, theta, phi`` are ``(batch, g)``.
    """
    bc = pb - pc
    bc = bc / _norm(bc).unsqueeze(-1)
    n = torch.linalg.cross(pc - pd, bc, dim=-1)
    n = n / _norm(n).unsqueeze(-1)
    m = torch.linalg.cross(n, bc, dim=-1)
    rs = r * torch.sin(theta)
    return (
        pb
        + (-r * torch.cos(theta)).unsqueeze(-1) * bc
        + (rs * torch.cos(phi)).unsqueeze(-1) * m
        + (rs * torch.sin(phi)).unsqueeze(-1) * n
    )


class InternalCoordinates(Flow):
    """Internal coordinates ``(batch, 3N-6)`` <-> Cartesian ``(batch, 3N)`` nm.

    ``forward(ics) -> (x, logdet)`` builds Cartesian positions in the canonical frame
    (atom ``zmatrix[0,0]`` at the origin, ``zmatrix[1,0]`` on +x, ``zmatrix[2,0]`` in
    the xy plane with y > 0); ``inverse(x) -> (ics, -logdet)``.  See the module
    docstring for the feature layout and the log-det convention.

    Attributes:
        zmatrix: ``(N, 4)`` long buffer.
        bond_idx, angle_idx, torsion_idx: long buffers of feature indices.
        circular: bool buffer ``(3N-6,)``, True for torsions.
        bond_atoms, angle_atoms, torsion_atoms: numpy arrays ``(N-1, 2)``, ``(N-2, 3)``,
            ``(N-3, 4)`` of the atoms defining each feature.
        n_forward: rows passed through :meth:`forward` since the last
            :meth:`reset_domain_stats` (int).
        n_out_of_domain: of those, rows with any bond ``<= 0`` or any angle outside
            ``(0, pi)`` (NaN counts as outside); their outputs and log-dets are computed
            as for any other input but are not meaningful. See :attr:`domain_stats`.
    """

    def __init__(self, zmatrix: Any) -> None:
        super().__init__()
        z = validate_zmatrix(zmatrix)
        n = len(z)
        self.n_atoms = n
        self.dim = 3 * n - 6
        self.bond_atoms = z[1:, :2].copy()
        self.angle_atoms = z[2:, :3].copy()
        self.torsion_atoms = z[3:, :4].copy()
        self.register_buffer("zmatrix", torch.as_tensor(z, dtype=torch.long))
        self.register_buffer("bond_idx", torch.arange(0, n - 1))
        self.register_buffer("angle_idx", torch.arange(n - 1, 2 * n - 3))
        self.register_buffer("torsion_idx", torch.arange(2 * n - 3, 3 * n - 6))
        circular = torch.zeros(self.dim, dtype=torch.bool)
        circular[2 * n - 3 :] = True
        self.register_buffer("circular", circular)
        for name, arr in (
            ("_b_atoms", self.bond_atoms),
            ("_a_atoms", self.angle_atoms),
            ("_t_atoms", self.torsion_atoms),
        ):
            self.register_buffer(name, torch.as_tensor(arr.T.copy(), dtype=torch.long))

        # generations: rows >= 3 whose references are all placed in earlier generations
        gen = np.zeros(n, dtype=np.int64)  # by row
        row_of = {int(a): i for i, a in enumerate(z[:, 0])}
        for i in range(3, n):
            gen[i] = 1 + max(gen[row_of[int(r)]] for r in z[i, 1:])
        rows = np.concatenate([[0, 1, 2], 3 + np.argsort(gen[3:], kind="stable")])
        slot = np.empty(n, dtype=np.int64)  # slot[row] = position in the build buffer
        slot[rows] = np.arange(n)
        later = rows[3:]
        ref_slots = slot[[[row_of[int(r)] for r in z[i, 1:]] for i in later]].reshape(-1, 3)
        self._gen_bounds = [3 + int(v) for v in np.cumsum(np.bincount(gen[later])[1:])]
        self._gen_bounds = [3] + self._gen_bounds
        cols = np.stack([later - 1, n - 1 + later - 2, 2 * n - 3 + later - 3], axis=0)
        self.register_buffer("_gen_cols", torch.as_tensor(cols, dtype=torch.long))
        self.register_buffer("_gen_refs", torch.as_tensor(ref_slots.T.copy(), dtype=torch.long))
        atom_slot = np.empty(n, dtype=np.int64)
        atom_slot[z[:, 0]] = slot
        self.register_buffer("_atom_slot", torch.as_tensor(atom_slot, dtype=torch.long))
        self._third_on_second = bool(z[2, 1] == z[1, 0])
        self.reset_domain_stats()

    def reset_domain_stats(self) -> None:
        """Set the out-of-domain counters of :meth:`forward` to zero."""
        self.n_forward = 0
        # plain attribute (not a buffer: checkpoints stay unchanged); a 0-d long tensor
        # updated on the input's device so that counting needs no host sync per call
        old = self.__dict__.get("_n_out_of_domain")
        device = old.device if old is not None else None
        self._n_out_of_domain = torch.zeros((), dtype=torch.long, device=device)

    @property
    def n_out_of_domain(self) -> int:
        """Rows of :meth:`forward` inputs outside the domain (reads the counter back)."""
        return int(self._n_out_of_domain)

    @property
    def domain_stats(self) -> dict[str, int]:
        """``{"evaluated": rows seen by forward, "out_of_domain": rows outside the domain}``."""
        return {"evaluated": self.n_forward, "out_of_domain": self.n_out_of_domain}

    def _count_out_of_domain(self, ics: Tensor) -> None:
        n = self.n_atoms
        q = ics.detach()
        bonds_ok = (q[:, : n - 1] > 0).all(-1)
        theta = q[:, n - 1 : 2 * n - 3]
        angles_ok = ((theta > 0) & (theta < math.pi)).all(-1)
        bad = (~(bonds_ok & angles_ok)).sum()
        if self._n_out_of_domain.device != bad.device:  # first call on a new device
            self._n_out_of_domain = self._n_out_of_domain.to(bad.device)
        self._n_out_of_domain = self._n_out_of_domain + bad
        self.n_forward += int(ics.shape[0])

    @classmethod
    def from_topology(cls, topology: Any, positions: Any = None) -> InternalCoordinates:
        """Build with :func:`build_zmatrix` from an mdtraj / OpenMM topology."""
        return cls(build_zmatrix(topology, positions=positions))

    @property
    def n_generations(self) -> int:
        """Number of vectorised placement steps after the first three atoms."""
        return len(self._gen_bounds) - 1

    def logdet_forward(self, ics: Tensor) -> Tensor:
        """log|det| of IC -> Cartesian (rigid-body part excluded), shape ``(batch,)``."""
        r = ics[:, : self.n_atoms - 1]
        theta = ics[:, self.n_atoms - 1 : 2 * self.n_atoms - 3]
        return 2 * torch.log(r).sum(-1) + torch.log(torch.sin(theta).abs()).sum(-1)

    def forward(self, ics: Tensor) -> tuple[Tensor, Tensor]:
        """ICs ``(batch, 3N-6)`` -> Cartesian ``(batch, 3N)`` nm and log|det J| ``(batch,)``.

        Rows with a bond ``<= 0`` or an angle outside ``(0, pi)`` are counted in
        :attr:`domain_stats`; their values are returned unchanged.
        """
        check_batch(ics, self.dim, "internal coordinates")
        self._count_out_of_domain(ics)
        n = self.n_atoms
        batch = ics.shape[0]
        zero = ics.new_zeros(batch)
        r1, r2, t2 = ics[:, 0], ics[:, 1], ics[:, n - 1]
        p0 = ics.new_zeros(batch, 3)
        p1 = torch.stack([r1, zero, zero], dim=-1)
        dx = r2 * torch.cos(t2)
        p2 = torch.stack([r1 - dx if self._third_on_second else dx, r2 * torch.sin(t2), zero], -1)
        xs = torch.stack([p0, p1, p2], dim=1)
        for lo, hi in zip(self._gen_bounds[:-1], self._gen_bounds[1:], strict=True):
            cols = self._gen_cols[:, lo - 3 : hi - 3]
            refs = self._gen_refs[:, lo - 3 : hi - 3]
            new = _place(
                xs[:, refs[2]],
                xs[:, refs[1]],
                xs[:, refs[0]],
                ics[:, cols[0]],
                ics[:, cols[1]],
                ics[:, cols[2]],
            )
            xs = torch.cat([xs, new], dim=1)
        x = xs[:, self._atom_slot].reshape(batch, 3 * n)
        return x, self.logdet_forward(ics)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian ``(batch, 3N)`` nm -> ICs ``(batch, 3N-6)`` and log|det J| ``(batch,)``."""
        check_batch(x, 3 * self.n_atoms, "positions")
        xyz = x.reshape(x.shape[0], self.n_atoms, 3)
        ics = torch.cat(
            [
                bond_lengths(xyz, *self._b_atoms),
                bond_angles(xyz, *self._a_atoms),
                dihedral_angles(xyz, *self._t_atoms),
            ],
            dim=-1,
        )
        return ics, -self.logdet_forward(ics)
