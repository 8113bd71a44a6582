"""Bonded and Coulomb/Lennard-Jones terms of
:class:`~bgflow_mini.energies.torchff.TorchForceField`.

Every term declares the interatomic vectors it needs as ``k`` groups of ``m`` atom
pairs ``(a, b)`` meaning ``x[a] - x[b]``. The force field obtains them with one
product of the positions with the term's ``(k, n_atoms, m)`` incidence matrix and
hands the term ``v`` of shape ``(k, 3, batch, m)`` (nm; the x, y, z components are
contiguous ``(batch, m)`` blocks).

Each term has two evaluations that must agree:

* ``forward(v)``: energy ``(batch,)`` in kJ/mol, plain differentiable torch ops
  (used for energies without gradients and for higher-order derivatives);
* ``energy_grad(v)``: the energy and its analytic gradient ``dE/dv`` (same shape as
  ``v``, kJ/mol/nm), evaluated without building an autograd graph (fast forces).

Parameters are float64 buffers, cast to the input's dtype and device on use (a
no-op after ``module.to(dtype)``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ONE_4PI_EPS0",
    "buf",
    "cross",
    "dot",
    "sq",
    "VectorTerm",
    "HarmonicBondTerm",
    "HarmonicAngleTerm",
    "PeriodicTorsionTerm",
    "CoulombLJTerm",
]

# OpenMM's SimTKOpenMMRealType.h: ONE_4PI_EPS0 = 1 / (4 pi EPSILON0) from CODATA 2018
# constants, in kJ mol^-1 nm e^-2 (= 138.935457644...).
_E_CHARGE = 1.602176634e-19
_AVOGADRO = 6.02214076e23
_EPSILON0 = 1e-6 * 8.8541878128e-12 / (_E_CHARGE * _E_CHARGE * _AVOGADRO)
ONE_4PI_EPS0 = 1.0 / (4.0 * math.pi * _EPSILON0)


def buf(values: object) -> Tensor:
    """float64 tensor of ``values`` (for ``register_buffer``)."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def cross(a: Tensor, b: Tensor) -> Tensor:
    """Cross product of ``(3, batch, m)`` vectors, shape ``(3, batch, m)``."""
    a0, a1, a2 = a.unbind(0)
    b0, b1, b2 = b.unbind(0)
    return torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0])


def sq(a: Tensor) -> Tensor:
    """Squared norm of ``(3, batch, m)`` vectors, shape ``(batch, m)``."""
    return (a * a).sum(0)


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Dot product of ``(3, batch, m)`` vectors, shape ``(batch, m)``."""
    return (a * b).sum(0)


class VectorTerm(nn.Module):
    """Base of the terms: ``groups`` are k equally long lists of ``(a, b)`` pairs."""

    name: str = "term"

    def __init__(self, groups: list[list[tuple[int, int]]]) -> None:
        super().__init__()
        self.groups = [[(int(a), int(b)) for a, b in g] for g in groups]
        if len({len(g) for g in self.groups}) > 1:
            raise ValueError("all vector groups of a term must have the same length")

    @property
    def width(self) -> int:
        """Vector columns per configuration (k m): the size of the intermediates."""
        return sum(len(g) for g in self.groups)

    def build_incidence(self, n_atoms: int) -> None:
        """Register the ``(k, n_atoms, m)`` incidence matrices (+1 at a, -1 at b)."""
        m = len(self.groups[0]) if self.groups else 0
        incidence = np.zeros((len(self.groups), int(n_atoms), m))
        for g, group in enumerate(self.groups):
            for c, (a, b) in enumerate(group):
                incidence[g, a, c] += 1.0
                incidence[g, b, c] -= 1.0
        self.register_buffer("incidence", buf(incidence))

    def vectors(self, xt: Tensor) -> Tensor:
        """``(k, 3, batch, m)`` vectors from positions ``xt`` of shape (3, batch, n)."""
        inc = self.p("incidence", xt)
        k, n, m = inc.shape
        flat = xt.reshape(-1, n)
        if k == 1:
            return (flat @ inc[0]).reshape(1, 3, xt.shape[1], m)
        return torch.matmul(flat, inc).reshape(k, 3, xt.shape[1], m)

    def position_grad(self, gv: Tensor) -> Tensor:
        """Pull ``dE/dv`` ``(k, 3, batch, m)`` back to ``dE/dxt`` ``(3, batch, n)``."""
        inc = self.p("incidence", gv)
        k, _, batch, m = gv.shape
        g = torch.matmul(gv.reshape(k, 3 * batch, m), inc.transpose(1, 2))
        return g.sum(0).reshape(3, batch, inc.shape[1])

    def extra_repr(self) -> str:
        return f"groups={len(self.groups)}, vectors_per_group={len(self.groups[0])}"

    def p(self, name: str, ref: Tensor) -> Tensor:
        """Buffer ``name`` in the dtype and on the device of ``ref``."""
        return getattr(self, name).to(device=ref.device, dtype=ref.dtype)

    def forward(self, v: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Energy ``(batch,)`` kJ/mol from vectors ``v`` ``(k, 3, batch, m)`` nm."""
        raise NotImplementedError

    def energy_grad(self, v: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """Energy ``(batch,)`` kJ/mol and ``dE/dv`` (shape of ``v``) kJ/mol/nm."""
        raise NotImplementedError


class HarmonicBondTerm(VectorTerm):
    """``sum 0.5 k (r - r0)^2``; bonds ``(n_bonds, 2)``, r0 nm, k kJ/mol/nm^2."""

    name = "HarmonicBondForce"

    def __init__(self, bonds: np.ndarray, r0: np.ndarray, k: np.ndarray) -> None:
        bonds = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
        super().__init__([[(j, i) for i, j in bonds]])
        self.register_buffer("r0", buf(r0))
        self.register_buffer("half_k", 0.5 * buf(k))

    def forward(self, v: Tensor) -> Tensor:
        d = sq(v[0]).sqrt() - self.p("r0", v)
        return (d * d) @ self.p("half_k", v)

    def energy_grad(self, v: Tensor) -> tuple[Tensor, Tensor]:
        r = sq(v[0]).sqrt()
        d = r - self.p("r0", v)
        hk = self.p("half_k", v)
        energy = (d * d) @ hk
        return energy, v * (2.0 * hk * d / r)


class HarmonicAngleTerm(VectorTerm):
    """``sum 0.5 k (theta - theta0)^2``; angles ``(n, 3)`` with the apex in the middle,
    theta0 rad, k kJ/mol/rad^2. theta = atan2(|a x b|, a.b) (accurate at all angles;
    the gradient is singular at exactly 0 or 180 degrees, as in OpenMM)."""

    name = "HarmonicAngleForce"

    def __init__(self, angles: np.ndarray, theta0: np.ndarray, k: np.ndarray) -> None:
        angles = np.asarray(angles, dtype=np.int64).reshape(-1, 3)
        super().__init__([[(i, j) for i, j, _ in angles], [(k_, j) for _, j, k_ in angles]])
        self.register_buffer("theta0", buf(theta0))
        self.register_buffer("half_k", 0.5 * buf(k))

    def forward(self, v: Tensor) -> Tensor:
        a, b = v[0], v[1]
        sin = sq(cross(a, b)).clamp_min(1e-30).sqrt()  # |a||b| sin(theta)
        d = torch.atan2(sin, dot(a, b)) - self.p("theta0", v)
        return (d * d) @ self.p("half_k", v)

    def energy_grad(self, v: Tensor) -> tuple[Tensor, Tensor]:
        a, b = v[0], v[1]
        sin = sq(cross(a, b)).clamp_min(1e-30).sqrt()
        cos = dot(a, b)
        d = torch.atan2(sin, cos) - self.p("theta0", v)
        hk = self.p("half_k", v)
        energy = (d * d) @ hk
        w = 2.0 * hk * d / sin  # dE/dtheta / (|a||b| sin)
        wc = w * cos
        ga = a * (wc / sq(a)) - b * w  # dtheta/da = (cos a/|a|^2 - b) / (|a||b| sin)
        gb = b * (wc / sq(b)) - a * w
        return energy, torch.stack([ga, gb])


class PeriodicTorsionTerm(VectorTerm):
    """``sum k (1 + cos(n phi - phi0))`` over torsion terms (several per quadruple);
    phase rad, k kJ/mol. The dihedral of each unique quadruple is computed once and
    expanded to its terms with a 0/1 matrix. OpenMM's (IUPAC) sign convention."""

    name = "PeriodicTorsionForce"

    def __init__(
        self, torsions: np.ndarray, periodicity: np.ndarray, phase: np.ndarray, k: np.ndarray
    ) -> None:
        torsions = np.asarray(torsions, dtype=np.int64).reshape(-1, 4)
        quads, inverse = np.unique(torsions, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        super().__init__(
            [
                [(j, i) for i, j, _, _ in quads],
                [(k_, j) for _, j, k_, _ in quads],
                [(l_, k_) for _, _, k_, l_ in quads],
            ]
        )
        expand = np.zeros((len(quads), len(torsions)))
        expand[inverse, np.arange(len(torsions))] = 1.0
        self.register_buffer("expand", buf(expand))
        self.register_buffer("periodicity", buf(periodicity))
        self.register_buffer("phase", buf(phase))
        self.register_buffer("k", buf(k))

    def _phi(self, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b1, b2, b3 = v[0], v[1], v[2]
        n1 = cross(b1, b2)
        n2 = cross(b2, b3)
        b2_len = sq(b2).sqrt()
        phi = torch.atan2(b2_len * dot(b1, n2), dot(n1, n2))
        return phi, n1, n2, b2_len

    def forward(self, v: Tensor) -> Tensor:
        phi = self._phi(v)[0] @ self.p("expand", v)
        k = self.p("k", v)
        return torch.cos(phi * self.p("periodicity", v) - self.p("phase", v)) @ k + k.sum()

    def energy_grad(self, v: Tensor) -> tuple[Tensor, Tensor]:
        phi_q, n1, n2, b2_len = self._phi(v)
        expand = self.p("expand", v)
        n, k = self.p("periodicity", v), self.p("k", v)
        arg = (phi_q @ expand) * n - self.p("phase", v)
        energy = torch.cos(arg) @ k + k.sum()
        de_dphi = (torch.sin(arg) * (-k * n)) @ expand.T  # (batch, n_quads)
        b1, b2, b3 = v[0], v[1], v[2]
        g1 = n1 * (de_dphi * b2_len / sq(n1))
        g3 = n2 * (de_dphi * b2_len / sq(n2))
        inv_b2 = (b2_len * b2_len).reciprocal()
        g2 = -(g1 * (dot(b1, b2) * inv_b2) + g3 * (dot(b3, b2) * inv_b2))
        return energy, torch.stack([g1, g2, g3])


class CoulombLJTerm(VectorTerm):
    """NonbondedForce with NoCutoff: ``sum kqq / r + A / r^12 - C / r^6`` over pairs.

    ``kqq = ONE_4PI_EPS0 * chargeProd``, ``A = 4 eps sigma^12``, ``C = 4 eps sigma^6``
    per interacting pair (exclusions dropped, 1-4 exceptions folded in).
    """

    name = "NonbondedForce"

    def __init__(
        self, pairs: np.ndarray, charge_prod: np.ndarray, sigma: np.ndarray, epsilon: np.ndarray
    ) -> None:
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        super().__init__([[(i, j) for i, j in pairs]])
        sigma = np.asarray(sigma, dtype=np.float64)
        eps4 = 4.0 * np.asarray(epsilon, dtype=np.float64)
        self.register_buffer("kqq", buf(ONE_4PI_EPS0 * np.asarray(charge_prod, np.float64)))
        self.register_buffer("lj_a", buf(eps4 * sigma**12))
        self.register_buffer("lj_c", buf(eps4 * sigma**6))

    def forward(self, v: Tensor) -> Tensor:
        inv_r2 = sq(v[0]).reciprocal()
        inv_r6 = inv_r2 * inv_r2 * inv_r2
        return (
            (inv_r6 * inv_r6) @ self.p("lj_a", v)
            - inv_r6 @ self.p("lj_c", v)
            + inv_r2.sqrt() @ self.p("kqq", v)
        )

    def energy_grad(self, v: Tensor) -> tuple[Tensor, Tensor]:
        inv_r2 = sq(v[0]).reciprocal()
        inv_r6 = inv_r2 * inv_r2 * inv_r2
        inv_r = inv_r2.sqrt()
        a, c, kqq = self.p("lj_a", v), self.p("lj_c", v), self.p("kqq", v)
        a_r12 = a * inv_r6 * inv_r6
        c_r6 = c * inv_r6
        coul = kqq * inv_r
        energy = (a_r12 - c_r6 + coul).sum(-1)
        # dE/dv = 2 v dE/d(r^2), r^2 dE/d(r^2) = -6 A/r^12 + 3 C/r^6 - kqq/(2 r)
        de_dr2_x2 = (-12.0 * a_r12 + 6.0 * c_r6 - coul) * inv_r2
        return energy, v * de_dr2_x2
