"""Batched, differentiable PyTorch evaluation of an OpenMM ``System``.

:class:`TorchForceField` reads the force parameters of an ``openmm.System`` and
evaluates reduced energies u = U/kT for a batch of configurations in nm. Supported:
HarmonicBondForce, HarmonicAngleForce, PeriodicTorsionForce, NonbondedForce
(NoCutoff) and GBSAOBCForce (NoCutoff); CMMotionRemover is ignored. Anything else
raises ``ValueError`` naming the force.

Every term is a sum over items (bonds, angles, torsion quadruples, atom pairs)
given by index lists: the positions of the items' atoms are gathered with
``index_select`` and the forces scattered back with ``index_add_``, so memory is
O(batch x atoms + items), never atoms x items. The graph-free evaluations (energies
without gradient, analytic forces) run over chunks of the batch and of the items,
which bounds every intermediate (``chunk_elements``, ``max_chunk_elements``); with
NoCutoff the pair lists of NonbondedForce and GBSAOBCForce hold all n (n - 1) / 2
pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import openmm
import torch
from openmm import unit
from torch import Tensor, nn

from ..units import kt_kjmol
from ._torchff_gbsa import GBSAOBCTerm
from ._torchff_terms import (
    CoulombLJTerm,
    HarmonicAngleTerm,
    HarmonicBondTerm,
    PeriodicTorsionTerm,
    Term,
)
from .base import Energy

__all__ = ["TorchForceField", "terms_from_system"]

_NM = unit.nanometer
_KJ = unit.kilojoule_per_mole
_RAD = unit.radian
_E = unit.elementary_charge


def _v(q: Any, u: unit.Unit) -> float:
    return float(q.value_in_unit(u)) if unit.is_quantity(q) else float(q)


def _force_label(force: openmm.Force) -> str:
    label = type(force).__name__
    return label if force.getName() == label else f"{label} ('{force.getName()}')"


def _check_nonperiodic(force: openmm.Force) -> None:
    if force.usesPeriodicBoundaryConditions():
        raise ValueError(f"{_force_label(force)} uses periodic boundary conditions: unsupported")


def _bonds(force: openmm.HarmonicBondForce) -> HarmonicBondTerm:
    _check_nonperiodic(force)
    rows = [force.getBondParameters(i) for i in range(force.getNumBonds())]
    idx = np.array([[p[0], p[1]] for p in rows], dtype=np.int64).reshape(-1, 2)
    r0 = [_v(p[2], _NM) for p in rows]
    k = [_v(p[3], _KJ / _NM**2) for p in rows]
    return HarmonicBondTerm(idx, r0, k)


def _angles(force: openmm.HarmonicAngleForce) -> HarmonicAngleTerm:
    _check_nonperiodic(force)
    rows = [force.getAngleParameters(i) for i in range(force.getNumAngles())]
    idx = np.array([p[:3] for p in rows], dtype=np.int64).reshape(-1, 3)
    theta0 = [_v(p[3], _RAD) for p in rows]
    k = [_v(p[4], _KJ / _RAD**2) for p in rows]
    return HarmonicAngleTerm(idx, theta0, k)


def _torsions(force: openmm.PeriodicTorsionForce) -> PeriodicTorsionTerm:
    _check_nonperiodic(force)
    rows = [force.getTorsionParameters(i) for i in range(force.getNumTorsions())]
    idx = np.array([p[:4] for p in rows], dtype=np.int64).reshape(-1, 4)
    n = [float(p[4]) for p in rows]
    phase = [_v(p[5], _RAD) for p in rows]
    k = [_v(p[6], _KJ) for p in rows]
    return PeriodicTorsionTerm(idx, n, phase, k)


def _nonbonded(force: openmm.NonbondedForce) -> CoulombLJTerm:
    label = _force_label(force)
    if force.getNonbondedMethod() != openmm.NonbondedForce.NoCutoff:
        raise ValueError(
            f"{label}: only NoCutoff is supported, got method {force.getNonbondedMethod()}"
        )
    if force.getNumParticleParameterOffsets() or force.getNumExceptionParameterOffsets():
        raise ValueError(f"{label}: parameter offsets (global parameters) are unsupported")
    n = force.getNumParticles()
    q, sig, eps = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        qi, si, ei = force.getParticleParameters(i)
        q[i], sig[i], eps[i] = _v(qi, _E), _v(si, _NM), _v(ei, _KJ)
    ii, jj = np.triu_indices(n, k=1)  # pair p = (ii[p], jj[p]), i < j, row by row
    qq = q[ii] * q[jj]
    sigma = 0.5 * (sig[ii] + sig[jj])
    epsilon = np.sqrt(eps[ii] * eps[jj])
    for k in range(force.getNumExceptions()):
        i, j, qq_ij, s_ij, e_ij = force.getExceptionParameters(k)
        a, b = min(i, j), max(i, j)
        p = a * n - a * (a + 1) // 2 + (b - a - 1)  # position of (a, b) in the triu order
        qq[p], sigma[p], epsilon[p] = _v(qq_ij, _E**2), _v(s_ij, _NM), _v(e_ij, _KJ)
    keep = (qq != 0.0) | (epsilon != 0.0)
    pairs = np.stack([ii[keep], jj[keep]], axis=1)
    return CoulombLJTerm(pairs, qq[keep], sigma[keep], epsilon[keep])


def _gbsa(force: openmm.GBSAOBCForce) -> GBSAOBCTerm:
    if force.getNonbondedMethod() != openmm.GBSAOBCForce.NoCutoff:
        raise ValueError(
            f"{_force_label(force)}: only NoCutoff is supported, "
            f"got method {force.getNonbondedMethod()}"
        )
    rows = [force.getParticleParameters(i) for i in range(force.getNumParticles())]
    charge = [_v(p[0], _E) for p in rows]
    radius = [_v(p[1], _NM) for p in rows]
    scale = [float(p[2]) for p in rows]
    return GBSAOBCTerm(
        charge,
        radius,
        scale,
        solvent_dielectric=float(force.getSolventDielectric()),
        solute_dielectric=float(force.getSoluteDielectric()),
        surface_area_energy=_v(force.getSurfaceAreaEnergy(), _KJ / _NM**2),
    )


_BUILDERS = {
    openmm.HarmonicBondForce: _bonds,
    openmm.HarmonicAngleForce: _angles,
    openmm.PeriodicTorsionForce: _torsions,
    openmm.NonbondedForce: _nonbonded,
    openmm.GBSAOBCForce: _gbsa,
}
_IGNORED = (openmm.CMMotionRemover,)


def terms_from_system(system: openmm.System) -> list[Term]:
    """One term per supported force of ``system`` (in force order).

    Raises:
        ValueError: for virtual sites and for any unsupported force or setting.
    """
    for i in range(system.getNumParticles()):
        if system.isVirtualSite(i):
            raise ValueError(f"particle {i} is a virtual site: unsupported")
    terms: list[Term] = []
    for force in system.getForces():
        if isinstance(force, _IGNORED):
            continue
        builder = _BUILDERS.get(type(force))
        if builder is None:
            raise ValueError(f"unsupported force {_force_label(force)}")
        terms.append(builder(force))
    return terms


class _AnalyticEnergy(torch.autograd.Function):
    """u(xt) with the analytic gradient computed in the forward pass.

    First derivatives come from the saved gradient. When a graph of the gradient is
    requested (``create_graph=True``) the backward re-evaluates the plain autograd
    path, so higher derivatives are exact as well.
    """

    @staticmethod
    def forward(ctx: Any, xt: Tensor, ff: TorchForceField) -> Tensor:
        u, grad = ff._energy_grad(xt)
        ctx.save_for_backward(xt, grad)
        ctx.ff = ff
        return u

    @staticmethod
    def backward(ctx: Any, grad_u: Tensor) -> tuple[Tensor, None]:
        xt, grad = ctx.saved_tensors
        if torch.is_grad_enabled():
            with torch.enable_grad():
                u = ctx.ff._energy_autograd(xt)
                (g,) = torch.autograd.grad(u, xt, grad_u, create_graph=True)
            return g, None
        return grad * grad_u, None


class TorchForceField(Energy):
    """Reduced energy u(x) = U(x)/kT of an OpenMM System, evaluated in PyTorch.

    Arguments:
        n_atoms: number of particles.
        terms: energy terms (see :func:`terms_from_system`).
        temperature: K, sets kT.
        analytic_grad: compute forces analytically in the forward pass (fast);
            ``False`` uses plain autograd through the energy (slower, same values).
        chunk_elements: on CPU, the graph-free evaluations (energies without
            gradient, analytic forces) run each term over chunks of the batch and of
            its items of about ``chunk_elements`` values per intermediate
            (configurations x items x the term's vector columns per item), so they
            stay cache-sized; ``None``: only ``max_chunk_elements`` applies.
        max_chunk_elements: on every device, the most values per intermediate of a
            graph-free evaluation (bounds peak memory at large batch x pairs);
            ``None``: unbounded (whole batch and all items at once off the CPU).

    ``energy(x)`` takes ``x`` of shape ``(batch, 3 n_atoms)`` or ``(batch, n_atoms, 3)``
    in nm and returns u of shape ``(batch,)`` in the dtype of ``x``. Forces in
    kJ/mol/nm are ``-kT * grad u``. Parameters are float64 buffers; ``.to(dtype)``
    sets the working precision (an input of another dtype casts them per call), and
    an input on another device than the buffers copies them there per call.

    Memory: O(batch x atoms) plus O(items) for the parameters and index lists (all
    atom pairs for NonbondedForce and GBSAOBCForce), and the chunk intermediates.
    The autograd paths (``analytic_grad=False``, or a graph of the gradient with
    ``create_graph=True``) keep the whole graph, O(batch x items).
    """

    min_rows = 64  # batch rows per chunk before the items are split

    def __init__(
        self,
        n_atoms: int,
        terms: list[Term],
        temperature: float = 300.0,
        analytic_grad: bool = True,
        chunk_elements: int | None = 65536,
        max_chunk_elements: int | None = 1 << 22,
    ) -> None:
        super().__init__(3 * int(n_atoms))
        self.n_atoms = int(n_atoms)
        self.temperature = float(temperature)
        self.kT = kt_kjmol(temperature)
        self.analytic_grad = bool(analytic_grad)
        self.chunk_elements = None if chunk_elements is None else int(chunk_elements)
        self.max_chunk_elements = None if max_chunk_elements is None else int(max_chunk_elements)
        self.terms = nn.ModuleList(terms)

    @classmethod
    def from_openmm(
        cls, system: Any, temperature: float | None = None, **kwargs: Any
    ) -> TorchForceField:
        """Build from an ``openmm.System`` (or an object with ``.system`` and
        ``.temperature``, e.g. a MolecularSystem). ``temperature`` in K, default 300 K
        or the object's temperature; ``kwargs`` go to the constructor."""
        if not isinstance(system, openmm.System) and hasattr(system, "system"):
            if temperature is None:
                temperature = getattr(system, "temperature", None)
            system = system.system
        if not isinstance(system, openmm.System):
            raise TypeError(f"expected an openmm.System, got {type(system).__name__}")
        temperature = 300.0 if temperature is None else _v(temperature, unit.kelvin)
        terms = terms_from_system(system)
        return cls(system.getNumParticles(), terms, temperature, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.ndim == 3 and tuple(x.shape[1:]) == (self.n_atoms, 3):
            x = x.reshape(x.shape[0], self.dim)
        return super().forward(x)

    def _components(self, x: Tensor) -> Tensor:
        """Positions (batch, 3 n) as (n, 3, batch): one contiguous row per atom."""
        return x.reshape(x.shape[0], self.n_atoms, 3).permute(1, 2, 0).contiguous()

    def chunking(self, term: Term, batch: int, device: torch.device) -> tuple[int, int]:
        """(batch rows, items) per chunk of a graph-free evaluation of ``term``."""
        limits = [self.max_chunk_elements]
        if device.type == "cpu":
            limits.append(self.chunk_elements)
        limits = [v for v in limits if v is not None]
        if not limits:
            return max(1, batch), max(1, term.n_items)
        target = max(1, min(limits))
        width = max(1, term.n_items * term.width)
        rows = max(1, min(batch, max(self.min_rows, target // width)))
        return rows, max(1, target // (rows * term.width))

    def _evaluate(self, xt: Tensor, grad: Tensor | None, term: Term) -> Tensor:
        """Graph-free energy of ``term`` (batch,) kJ/mol, dE/dxt added into ``grad``."""
        batch = xt.shape[-1]
        rows, items = self.chunking(term, batch, xt.device)
        if rows >= batch:
            return term.evaluate(xt, grad, items)
        energy = xt.new_empty(batch)
        for start in range(0, batch, rows):
            stop = min(start + rows, batch)
            x_chunk = xt[..., start:stop].contiguous()
            g_chunk = None if grad is None else torch.zeros_like(x_chunk)
            energy[start:stop] = term.evaluate(x_chunk, g_chunk, items)
            if grad is not None:
                grad[..., start:stop] += g_chunk
        return energy

    def energy_terms(self, x: Tensor) -> dict[str, Tensor]:
        """Energy of each term in kJ/mol, shape (batch,), keyed by force class name
        (suffix ``_<k>`` for repeated forces). ``x``: (batch, 3 n_atoms) nm.
        Differentiable when ``x`` requires grad (then unchunked), graph-free otherwise."""
        xt = self._components(x)
        graph = torch.is_grad_enabled() and xt.requires_grad
        out: dict[str, Tensor] = {}
        for term in self.terms:
            key = term.name if term.name not in out else f"{term.name}_{len(out)}"
            out[key] = term(xt) if graph else self._evaluate(xt, None, term)
        return out

    def _energy_autograd(self, xt: Tensor) -> Tensor:
        total = xt.new_zeros(xt.shape[-1])
        for term in self.terms:
            total = total + term(xt)
        return total / self.kT

    def _energy_grad(self, xt: Tensor) -> tuple[Tensor, Tensor]:
        """u (batch,) and du/dxt (n, 3, batch), without an autograd graph."""
        with torch.no_grad():
            total = xt.new_zeros(xt.shape[-1])
            grad = torch.zeros_like(xt)
            for term in self.terms:
                total += self._evaluate(xt, grad, term)
            return total / self.kT, grad / self.kT

    def _energy(self, x: Tensor) -> Tensor:
        xt = self._components(x)
        if torch.is_grad_enabled() and xt.requires_grad:
            if self.analytic_grad:
                return _AnalyticEnergy.apply(xt, self)
            return self._energy_autograd(xt)
        with torch.no_grad():
            total = xt.new_zeros(xt.shape[-1])
            for term in self.terms:
                total += self._evaluate(xt, None, term)
            return total / self.kT

    def extra_repr(self) -> str:
        return f"n_atoms={self.n_atoms}, temperature={self.temperature}"
