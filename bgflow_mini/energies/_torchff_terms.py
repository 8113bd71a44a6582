"""Bonded and Coulomb/Lennard-Jones terms of
:class:`~bgflow_mini.energies.torchff.TorchForceField`.

A term is a sum over ``n_items`` items (bonds, angles, torsion quadruples, atom
pairs); item ``c`` involves the atoms ``atoms[:, c]``. Positions arrive atom-major,
``x`` of shape ``(n_atoms, 3, batch)`` nm, so the atoms of a set of items are one
``index_select`` of rows and their forces one ``index_add_`` back into the rows:
memory is O(batch x (atoms + items)), never atoms x items.

Each term has two evaluations that must agree:

* ``energy(x, items)``: energy ``(batch,)`` in kJ/mol of the items ``items`` (a
  slice), plain differentiable torch ops (energies with an autograd graph, higher
  derivatives);
* ``energy_grad(x, grad, items)``: the same energy, and its analytic gradient dE/dx
  (kJ/mol/nm) added into ``grad`` (shape of ``x``), without an autograd graph.

:meth:`Term.evaluate` runs either over all items in slices of ``chunk`` items, which
bounds the intermediates to ``chunk x batch`` values. Parameters are float64 buffers
(atom indices int64), cast to the input's dtype and device on use (a no-op after
``module.to(dtype)``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ONE_4PI_EPS0",
    "buf",
    "col",
    "cross",
    "dot",
    "sq",
    "Term",
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

_ALL = slice(None)


def buf(values: object) -> Tensor:
    """float64 tensor of ``values`` (for ``register_buffer``)."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def cross(a: Tensor, b: Tensor) -> Tensor:
    """Cross product of ``(m, 3, batch)`` vectors, shape ``(m, 3, batch)``."""
    a0, a1, a2 = a.unbind(1)  # (several times faster than torch.linalg.cross here)
    b0, b1, b2 = b.unbind(1)
    return torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], dim=1)


def sq(a: Tensor) -> Tensor:
    """Squared norm of ``(m, 3, batch)`` vectors, shape ``(m, batch)``."""
    return (a * a).sum(1)


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Dot product of ``(m, 3, batch)`` vectors, shape ``(m, batch)``."""
    return (a * b).sum(1)


def col(a: Tensor) -> Tensor:
    """``(m, batch)`` per-item factors as ``(m, 1, batch)``, to scale vectors."""
    return a.unsqueeze(1)


class Term(nn.Module):
    """Base of the terms. ``atoms``: ``(n_items, k)`` atom indices of each item.

    ``width`` is the number of ``(items, batch)`` vector columns an item needs (the
    chunk size is chosen from it).
    """

    name: str = "term"
    width: int = 1

    def __init__(self, atoms: np.ndarray, k: int) -> None:
        super().__init__()
        atoms = np.asarray(atoms, dtype=np.int64).reshape(-1, k)
        index = torch.from_numpy(np.ascontiguousarray(atoms.T))
        self.register_buffer("atoms", index, persistent=False)

    @property
    def n_items(self) -> int:
        return int(self.atoms.shape[1])

    def p(self, name: str, ref: Tensor, items: slice = _ALL) -> Tensor:
        """Buffer ``name`` (rows ``items``) in the dtype and on the device of ``ref``."""
        return getattr(self, name)[items].to(device=ref.device, dtype=ref.dtype)

    def index(self, c: int, ref: Tensor, items: slice = _ALL) -> Tensor:
        """Atom ``c`` of the items ``items`` (int64, on the device of ``ref``)."""
        return self.atoms[c, items].to(ref.device)

    def rows(self, x: Tensor, items: slice = _ALL) -> list[Tensor]:
        """Positions of each item's atoms, ``k`` tensors ``(m, 3, batch)``."""
        return [x.index_select(0, self.index(c, x, items)) for c in range(self.atoms.shape[0])]

    def add_rows(self, grad: Tensor, items: slice, gs: list[Tensor]) -> None:
        """Add ``gs[c]`` (``(m, 3, batch)``, dE/d position of atom c) into ``grad``."""
        for c, g in enumerate(gs):
            grad.index_add_(0, self.index(c, grad, items), g)

    def evaluate(self, x: Tensor, grad: Tensor | None, chunk: int) -> Tensor:
        """Graph-free energy (batch,) kJ/mol over all items, ``chunk`` items at a time;
        with ``grad`` given, dE/dx is added into it. The chunk energies are summed in
        float64 (many chunks of a float32 evaluation would otherwise lose digits)."""
        with torch.no_grad():
            total = x.new_zeros(x.shape[-1], dtype=torch.float64)
            for start in range(0, self.n_items, max(1, int(chunk))):
                items = slice(start, start + chunk)
                if grad is None:
                    total += self.energy(x, items)
                else:
                    total += self.energy_grad(x, grad, items)
            return total.to(x.dtype)

    def extra_repr(self) -> str:
        return f"items={self.n_items}"

    def forward(self, x: Tensor) -> Tensor:
        """Energy (batch,) kJ/mol of positions ``x`` ``(n_atoms, 3, batch)`` nm."""
        return self.energy(x)

    def energy(self, x: Tensor, items: slice = _ALL) -> Tensor:  # pragma: no cover
        """Energy (batch,) kJ/mol of the items ``items``, differentiable."""
        raise NotImplementedError

    def energy_grad(self, x: Tensor, grad: Tensor, items: slice) -> Tensor:  # pragma: no cover
        """Energy (batch,) kJ/mol of ``items``; adds dE/dx (kJ/mol/nm) into ``grad``."""
        raise NotImplementedError


class HarmonicBondTerm(Term):
    """``sum 0.5 k (r - r0)^2``; bonds ``(n_bonds, 2)``, r0 nm, k kJ/mol/nm^2."""

    name = "HarmonicBondForce"

    def __init__(self, bonds: np.ndarray, r0: np.ndarray, k: np.ndarray) -> None:
        super().__init__(bonds, 2)
        self.register_buffer("r0", buf(r0))
        self.register_buffer("half_k", 0.5 * buf(k))

    def energy(self, x: Tensor, items: slice = _ALL) -> Tensor:
        xi, xj = self.rows(x, items)
        d = sq(xj - xi).sqrt() - self.p("r0", x, items)[:, None]
        return self.p("half_k", x, items) @ (d * d)

    def energy_grad(self, x: Tensor, grad: Tensor, items: slice) -> Tensor:
        xi, xj = self.rows(x, items)
        v = xj.sub_(xi)
        r = sq(v).sqrt_()
        hk = self.p("half_k", x, items)[:, None]
        d = r - self.p("r0", x, items)[:, None]
        energy = (hk * d * d).sum(0)
        gv = v.mul_(col(d.mul_(hk).mul_(2.0).div_(r)))  # dE/dr v/r
        self.add_rows(grad, items, [-gv, gv])
        return energy


class HarmonicAngleTerm(Term):
    """``sum 0.5 k (theta - theta0)^2``; angles ``(n, 3)`` with the apex in the middle,
    theta0 rad, k kJ/mol/rad^2. theta = atan2(|a x b|, a.b) (accurate at all angles;
    the gradient is singular at exactly 0 or 180 degrees, as in OpenMM)."""

    name = "HarmonicAngleForce"
    width = 2

    def __init__(self, angles: np.ndarray, theta0: np.ndarray, k: np.ndarray) -> None:
        super().__init__(angles, 3)
        self.register_buffer("theta0", buf(theta0))
        self.register_buffer("half_k", 0.5 * buf(k))

    def energy(self, x: Tensor, items: slice = _ALL) -> Tensor:
        xi, xj, xk = self.rows(x, items)
        a, b = xi - xj, xk - xj
        sin = sq(cross(a, b)).clamp_min(1e-30).sqrt()  # |a||b| sin(theta)
        d = torch.atan2(sin, dot(a, b)) - self.p("theta0", x, items)[:, None]
        return self.p("half_k", x, items) @ (d * d)

    def energy_grad(self, x: Tensor, grad: Tensor, items: slice) -> Tensor:
        xi, xj, xk = self.rows(x, items)
        a, b = xi.sub_(xj), xk.sub_(xj)
        sin = sq(cross(a, b)).clamp_min_(1e-30).sqrt_()
        cos = dot(a, b)
        d = torch.atan2(sin, cos).sub_(self.p("theta0", x, items)[:, None])
        hk = self.p("half_k", x, items)
        energy = hk @ (d * d)
        w = d.mul_(2.0 * hk[:, None]).div_(sin)  # dE/dtheta / (|a||b| sin)
        wc = w * cos
        ga = a * col(wc / sq(a)) - b * col(w)  # dtheta/da = (cos a/|a|^2 - b) / (|a||b| sin)
        gb = b.mul_(col(wc.div_(sq(b)))).sub_(a.mul_(col(w)))
        self.add_rows(grad, items, [ga, -(ga + gb), gb])
        return energy


class PeriodicTorsionTerm(Term):
    """``sum k (1 + cos(n phi - phi0))`` over torsion terms (several per quadruple);
    phase rad, k kJ/mol. Items are the unique quadruples: the dihedral of each is
    computed once and gathered for its terms (kept sorted by quadruple, with
    ``first[q]:first[q + 1]`` the terms of quadruple q). OpenMM's (IUPAC) sign
    convention."""

    name = "PeriodicTorsionForce"
    width = 3

    def __init__(
        self, torsions: np.ndarray, periodicity: np.ndarray, phase: np.ndarray, k: np.ndarray
    ) -> None:
        torsions = np.asarray(torsions, dtype=np.int64).reshape(-1, 4)
        quads, quad_of = np.unique(torsions, axis=0, return_inverse=True)
        quad_of = quad_of.reshape(-1)
        order = np.argsort(quad_of, kind="stable")
        super().__init__(quads, 4)
        first = np.searchsorted(quad_of[order], np.arange(len(quads) + 1))
        self.register_buffer("quad", torch.from_numpy(quad_of[order]), persistent=False)
        self.first = first.tolist()
        self.register_buffer("periodicity", buf(periodicity)[order])
        self.register_buffer("phase", buf(phase)[order])
        self.register_buffer("k", buf(k)[order])

    def _terms(self, items: slice) -> tuple[slice, int]:
        """The torsion terms of the quadruples ``items`` and the first quadruple."""
        q0, q1, _ = items.indices(self.n_items)
        return slice(self.first[q0], self.first[q1]), q0

    def _phi(self, x: Tensor, items: slice) -> tuple[Tensor, ...]:
        xi, xj, xk, xl = self.rows(x, items)
        b1, b2, b3 = xj - xi, xk - xj, xl - xk
        n1, n2 = cross(b1, b2), cross(b2, b3)
        b2_len = sq(b2).sqrt()
        phi = torch.atan2(b2_len * dot(b1, n2), dot(n1, n2))
        return phi, b1, b2, b3, n1, n2, b2_len

    def energy(self, x: Tensor, items: slice = _ALL) -> Tensor:
        terms, q0 = self._terms(items)
        phi = self._phi(x, items)[0].index_select(0, self.quad[terms].to(x.device) - q0)
        n, phase, k = (self.p(name, x, terms) for name in ("periodicity", "phase", "k"))
        return k @ torch.cos(phi * n[:, None] - phase[:, None]) + k.sum()

    def energy_grad(self, x: Tensor, grad: Tensor, items: slice) -> Tensor:
        terms, q0 = self._terms(items)
        local = self.quad[terms].to(x.device) - q0
        phi_q, b1, b2, b3, n1, n2, b2_len = self._phi(x, items)
        n, phase, k = (self.p(name, x, terms) for name in ("periodicity", "phase", "k"))
        arg = phi_q.index_select(0, local).mul_(n[:, None]).sub_(phase[:, None])
        energy = k @ torch.cos(arg) + k.sum()
        de_dphi_t = arg.sin_().mul_((-k * n)[:, None])
        de_dphi = torch.zeros_like(phi_q).index_add_(0, local, de_dphi_t)
        scale = de_dphi.mul_(b2_len)
        g1 = n1.mul_(col(scale / sq(n1)))
        g3 = n2.mul_(col(scale.div_(sq(n2))))
        inv_b2 = b2_len.mul_(b2_len).reciprocal_()
        g2 = g1 * col(dot(b1, b2).mul_(inv_b2)) + g3 * col(dot(b3, b2).mul_(inv_b2))
        # b1 = xj - xi, b2 = xk - xj, b3 = xl - xk; g2 holds -dE/db2
        self.add_rows(grad, items, [-g1, g1 + g2, -(g2 + g3), g3])
        return energy


class CoulombLJTerm(Term):
    """NonbondedForce with NoCutoff: ``sum kqq / r + A / r^12 - C / r^6`` over pairs.

    ``kqq = ONE_4PI_EPS0 * chargeProd``, ``A = 4 eps sigma^12``, ``C = 4 eps sigma^6``
    per interacting pair (exclusions dropped, 1-4 exceptions folded in).
    """

    name = "NonbondedForce"

    def __init__(
        self, pairs: np.ndarray, charge_prod: np.ndarray, sigma: np.ndarray, epsilon: np.ndarray
    ) -> None:
        super().__init__(pairs, 2)
        sigma = np.asarray(sigma, dtype=np.float64)
        eps4 = 4.0 * np.asarray(epsilon, dtype=np.float64)
        self.register_buffer("kqq", buf(ONE_4PI_EPS0 * np.asarray(charge_prod, np.float64)))
        self.register_buffer("lj_a", buf(eps4 * sigma**12))
        self.register_buffer("lj_c", buf(eps4 * sigma**6))

    def energy(self, x: Tensor, items: slice = _ALL) -> Tensor:
        xi, xj = self.rows(x, items)
        inv_r2 = sq(xj - xi).reciprocal()
        inv_r6 = inv_r2 * inv_r2 * inv_r2
        return (
            self.p("lj_a", x, items) @ (inv_r6 * inv_r6)
            - self.p("lj_c", x, items) @ inv_r6
            + self.p("kqq", x, items) @ inv_r2.sqrt()
        )

    def energy_grad(self, x: Tensor, grad: Tensor, items: slice) -> Tensor:
        xi, xj = self.rows(x, items)
        v = xj.sub_(xi)
        inv_r2 = sq(v).reciprocal_()
        inv_r6 = inv_r2 * inv_r2 * inv_r2
        a_r12 = inv_r6 * inv_r6 * self.p("lj_a", x, items)[:, None]
        c_r6 = inv_r6.mul_(self.p("lj_c", x, items)[:, None])
        coul = inv_r2.sqrt().mul_(self.p("kqq", x, items)[:, None])
        energy = (a_r12 - c_r6 + coul).sum(0)
        # dE/dv = 2 v dE/d(r^2), r^2 dE/d(r^2) = -6 A/r^12 + 3 C/r^6 - kqq/(2 r)
        de_dr2_x2 = a_r12.mul_(-12.0).add_(c_r6, alpha=6.0).sub_(coul).mul_(inv_r2)
        gv = v.mul_(col(de_dr2_x2))
        self.add_rows(grad, items, [-gv, gv])
        return energy
