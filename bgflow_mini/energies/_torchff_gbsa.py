"""GBSAOBCForce term of :class:`~bgflow_mini.energies.torchff.TorchForceField`.

OBC type II generalized Born with the ACE surface-area term and NoCutoff, following
OpenMM's Reference platform (``ReferenceObc.cpp``, ``ObcParameters.cpp``)::

    offset_i = radius_i - 0.009 nm,     scaled_j = offset_j * scale_j
    I_i      = 0.5 offset_i sum_{j != i} HCT(r_ij, offset_i, scaled_j)
    B_i      = 1 / (1/offset_i - tanh(a I - b I^2 + g I^3) / radius_i),  (a, b, g) = (1, 0.8, 4.85)
    E        = pre sum_{i<j} q_i q_j / f_ij + 0.5 pre sum_i q_i^2 / B_i
               + 4 pi sigma_SA sum_i (radius_i + 0.14 nm)^2 (radius_i / B_i)^6
    f_ij     = sqrt(r^2 + B_i B_j exp(-r^2 / (4 B_i B_j))),
    pre      = -ONE_4PI_EPS0 (1/eps_solute - 1/eps_solvent)

Items are all atom pairs i < j. The graph-free evaluation (:meth:`GBSAOBCTerm.evaluate`)
runs three passes over the pairs in chunks: the HCT sums (Born radii), then the pair
energies with their direct forces and dE/dB per atom, then the forces through the
Born radii; only per-atom sums (atoms x batch) live between passes. See
:mod:`._torchff_terms` for the term interface.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ._torchff_terms import _ALL, ONE_4PI_EPS0, Term, buf, col, sq

__all__ = [
    "OBC_ALPHA",
    "OBC_BETA",
    "OBC_GAMMA",
    "OBC_DIELECTRIC_OFFSET",
    "OBC_PROBE_RADIUS",
    "GBSAOBCTerm",
]

# OBC type II constants of OpenMM's ObcParameters (nm where dimensioned).
OBC_ALPHA = 1.0
OBC_BETA = 0.8
OBC_GAMMA = 4.85
OBC_DIELECTRIC_OFFSET = 0.009
OBC_PROBE_RADIUS = 0.14

# Distant ordered pairs (r - s_j >= offset_i and s_j <= _FAR_T r) below float64: the
# closed form is a difference of O(1/r) terms for a result of O(s_j^3 / r^4) and loses
# up to 1e-3 of the Born sums of a 1,000-atom molecule in float32. There, t = s_j / r,
#   HCT     = s_j / (r^2 - s_j^2) - atanh(t) / r = (1/r) sum_k 2k/(2k+1) t^(2k+1)
#   dHCT/dr = -(1/r^2) sum_k 4k(k+1)/(2k+1) t^(2k+1),   k = 1.._FAR_TERMS
# (truncation below 3e-9 relative at t = 1/4).
_FAR_T = 0.25
_FAR_TERMS = 8
_FAR_HCT = [2.0 * k / (2 * k + 1) for k in range(1, _FAR_TERMS + 1)]
_FAR_DHCT = [4.0 * k * (k + 1) / (2 * k + 1) for k in range(1, _FAR_TERMS + 1)]


def _far_series(t: Tensor, coeffs: list[float]) -> Tensor:
    """``sum_k coeffs[k-1] t^(2k+1)`` (Horner in t^2; in place without grad mode)."""
    t2 = t * t
    acc = torch.full_like(t, coeffs[-1])
    inplace = not torch.is_grad_enabled()
    for c in reversed(coeffs[:-1]):
        acc = acc.mul_(t2).add_(c) if inplace else acc * t2 + c
    return acc * t2 * t


class GBSAOBCTerm(Term):
    """GBSAOBCForce with NoCutoff (OBC II + ACE), all atom pairs.

    Arguments:
        charge: (n,) e. radius: (n,) nm. scale: (n,) OBC radius scale factors.
        solvent_dielectric, solute_dielectric: dielectric constants.
        surface_area_energy: kJ/mol/nm^2 (ACE term weight).
    """

    name = "GBSAOBCForce"
    width = 2  # intermediates hold both orders of every pair

    def __init__(
        self,
        charge: np.ndarray,
        radius: np.ndarray,
        scale: np.ndarray,
        solvent_dielectric: float,
        solute_dielectric: float,
        surface_area_energy: float,
    ) -> None:
        charge = np.asarray(charge, dtype=np.float64)
        radius = np.asarray(radius, dtype=np.float64)
        scale = np.asarray(scale, dtype=np.float64)
        n = len(charge)
        super().__init__(np.stack(np.triu_indices(n, k=1), axis=1), 2)
        if solute_dielectric != 0.0 and solvent_dielectric != 0.0:
            pre = -ONE_4PI_EPS0 * (1.0 / solute_dielectric - 1.0 / solvent_dielectric)
        else:
            pre = 0.0
        offset = radius - OBC_DIELECTRIC_OFFSET
        scaled = offset * scale
        i, j = self.atoms.numpy()
        # per ordered pair (I, J), (2, n_pairs): first (i, j), then (j, i); HCT_IJ uses
        # offset_I and scaled_J
        first, second = np.stack([i, j]), np.stack([j, i])
        self.register_buffer("offset_i", buf(offset[first]))
        self.register_buffer("inv_offset_i", buf(1.0 / offset[first]))
        self.register_buffer("scaled_j", buf(scaled[second]))
        self.register_buffer("quarter_scaled_j2", buf(0.25 * scaled[second] ** 2))
        self.register_buffer("pre_qq", buf(pre * charge[i] * charge[j]))
        # per atom
        self.register_buffer("half_offset", buf(0.5 * offset))
        self.register_buffer("inv_offset", buf(1.0 / offset))
        self.register_buffer("inv_radius", buf(1.0 / radius))
        self.register_buffer("pre_self", buf(0.5 * pre * charge**2))
        ace = 4.0 * math.pi * surface_area_energy * (radius + OBC_PROBE_RADIUS) ** 2
        self.register_buffer("ace_r6", buf(ace * radius**6))

    @property
    def n_atoms(self) -> int:
        return int(self.half_offset.shape[0])

    def _ordered(self, ref: Tensor, items: slice) -> tuple[Tensor, ...]:
        """offset_I, 1/offset_I, scaled_J, scaled_J^2/4 of the ordered pairs of
        ``items``, each (2, m, 1)."""
        names = ("offset_i", "inv_offset_i", "scaled_j", "quarter_scaled_j2")
        return tuple(
            getattr(self, name)[:, items].to(device=ref.device, dtype=ref.dtype).unsqueeze(-1)
            for name in names
        )

    def _hct(self, r: Tensor, items: slice) -> Tensor:
        """HCT integrals of the ordered pairs (2, m, batch) from r (m, batch).

        OpenMM's branches are folded into clamps (no masks): with
        u = 1/max(r + s_j, offset_i) and l = 1/max(|r - s_j|, offset_i) an inactive
        pair (r + s_j <= offset_i) gives u = l and a zero term, and the
        "I inside J" correction 2 (1/offset_i - 1/max(s_j - r, offset_i)) vanishes
        unless offset_i < s_j - r. The derivative reduces to
        0.25 (1 + s_j^2/r^2)(u^2 - l^2) - 0.5 log(u/l) / r^2 in every regime (the
        l- and u-dependences cancel), as in OpenMM's Reference code. Below float64,
        distant pairs use the series above (``_FAR_T``).
        """
        off_i, inv_off_i, s_j, s_j2 = self._ordered(r, items)
        rr = r.unsqueeze(0)
        diff = rr - s_j
        upper = torch.maximum(rr + s_j, off_i)
        lo = torch.maximum(diff.abs(), off_i)
        u = upper.reciprocal()
        l = lo.reciprocal()
        inv_r = rr.reciprocal()
        dul = u * u - l * l
        a = (0.25 * rr) * dul
        b = (s_j2 * inv_r) * dul  # 0.25 s_j^2 / r (u^2 - l^2)
        c = (0.5 * inv_r) * torch.log(lo / upper)
        l_inside = torch.maximum(-diff, off_i).reciprocal()
        hct = l - u + a - b + c + 2.0 * (inv_off_i - l_inside)
        if r.dtype == torch.float64:
            return hct
        far = (diff >= off_i) & (s_j <= _FAR_T * rr)
        t = (s_j * inv_r).clamp(max=_FAR_T)
        return torch.where(far, _far_series(t, _FAR_HCT) * inv_r, hct)

    def _hct_inplace(
        self, r: Tensor, items: slice, term: bool = True, grad: bool = False
    ) -> tuple[Tensor | None, Tensor | None]:
        """:meth:`_hct` and/or its d/dr, graph-free and mostly in place.

        Returns the terms (or None unless ``term``) and d/dr (or None unless ``grad``),
        both (2, m, batch).
        """
        off_i, inv_off_i, s_j, s_j2 = self._ordered(r, items)
        r3 = r.unsqueeze(0)  # (1, m, batch), broadcast over both orders
        inv_r = r3.reciprocal()
        upper = torch.maximum(r3 + s_j, off_i)
        diff = r3 - s_j
        far = t = None
        if r.dtype != torch.float64:  # distant pairs: the series (see _FAR_T)
            far = (diff >= off_i).logical_and_(s_j <= _FAR_T * r3)
            t = torch.mul(s_j, inv_r).clamp_(max=_FAR_T)
        lo = torch.maximum(diff.abs(), off_i)
        c = torch.div(lo, upper).log_().mul_(0.5 * inv_r)
        u = upper.reciprocal_()
        l = lo.reciprocal_()
        dul = torch.mul(u, u).addcmul_(l, l, value=-1.0)
        a = dul * (0.25 * r3)
        b = dul.mul_(s_j2 * inv_r)
        hct = dhct = None
        if term:
            l_inside = torch.maximum(diff.neg_(), off_i).reciprocal_()
            hct = torch.sub(l, u).add_(c).add_(l_inside, alpha=-2.0)
            hct.add_(2.0 * inv_off_i).add_(a).sub_(b)
            if far is not None:
                hct = torch.where(far, _far_series(t, _FAR_HCT).mul_(inv_r), hct)
        if grad:
            dhct = a.add_(b).sub_(c).mul_(inv_r)
            if far is not None:
                series = _far_series(t, _FAR_DHCT).mul_(inv_r).mul_(inv_r).neg_()
                dhct = torch.where(far, series, dhct)
        return hct, dhct

    def _born(self, s_sum: Tensor) -> tuple[Tensor, Tensor]:
        """Born radii (n, batch) and dB/d(sum of HCT terms)."""
        half_offset = self.p("half_offset", s_sum)[:, None]
        inv_radius = self.p("inv_radius", s_sum)[:, None]
        s = s_sum * half_offset
        t = torch.tanh(s * (OBC_ALPHA + s * (-OBC_BETA + s * OBC_GAMMA)))
        born = (self.p("inv_offset", s_sum)[:, None] - t * inv_radius).reciprocal()
        dpsi = OBC_ALPHA + s * (-2.0 * OBC_BETA + s * (3.0 * OBC_GAMMA))
        dborn = born * born * inv_radius * (1.0 - t * t) * dpsi * half_offset
        return born, dborn

    def _atom_energy(self, born: Tensor) -> tuple[Tensor, Tensor]:
        """Self and ACE energies per atom (n, batch) from the Born radii."""
        inv_b = born.reciprocal()
        inv_b3 = inv_b * inv_b * inv_b
        return self.p("pre_self", born)[:, None] * inv_b, self.p("ace_r6", born)[:, None] * (
            inv_b3 * inv_b3
        )

    def energy(self, x: Tensor, items: slice = _ALL) -> Tensor:
        """Energy of all pairs (the Born radii couple them: ``items`` must be all)."""
        if items != _ALL:
            raise ValueError("GBSAOBCTerm.energy evaluates all pairs at once")
        xi, xj = self.rows(x)
        r2 = sq(xj - xi)
        term = self._hct(r2.sqrt(), _ALL)
        i, j = self.index(0, x), self.index(1, x)
        s_sum = x.new_zeros(self.n_atoms, x.shape[-1])
        s_sum = s_sum.index_add(0, i, term[0]).index_add(0, j, term[1])
        born = self._born(s_sum)[0]
        bb = born.index_select(0, i) * born.index_select(0, j)  # B_i B_j per pair
        f2 = r2 + bb * torch.exp(-0.25 * r2 / bb)
        self_e, ace_e = self._atom_energy(born)
        return (self.p("pre_qq", x)[:, None] * f2.rsqrt()).sum(0) + (self_e + ace_e).sum(0)

    def evaluate(self, x: Tensor, grad: Tensor | None, chunk: int) -> Tensor:
        """Graph-free energy (and dE/dx into ``grad``), ``chunk`` pairs at a time.

        When all pairs fit in one chunk, the pair geometry, the HCT derivatives and the
        direct pair forces are kept from pass to pass (one gather and one scatter);
        otherwise each pass recomputes them chunk by chunk.
        """
        chunk = max(1, int(chunk))
        slices = [slice(s, s + chunk) for s in range(0, self.n_items, chunk)]
        keep = len(slices) == 1
        with_grad = grad is not None
        with torch.no_grad():
            s_sum = x.new_zeros(self.n_atoms, x.shape[-1])
            for items in slices:  # pass 1: HCT sums
                v, r2 = self._vectors(x, items)
                r = r2.sqrt()
                term, dterm = self._hct_inplace(r, items, grad=keep and with_grad)
                self._add_pairs(s_sum, items, term[0], term[1])
            born, dborn = self._born(s_sum)
            self_e, ace_e = self._atom_energy(born)
            energy = (self_e + ace_e).sum(0, dtype=torch.float64)  # chunk sums in float64
            de_dlogb = torch.zeros_like(born) if with_grad else None
            for items in slices:  # pass 2: pair energies, direct forces, dE/dB
                if not keep:
                    v, r2 = self._vectors(x, items)
                i, j = self.index(0, x, items), self.index(1, x, items)
                bb = born.index_select(0, i).mul_(born.index_select(0, j))
                quarter_r2 = r2 * 0.25
                e = torch.div(quarter_r2, bb).neg_().exp_()
                inv_f = (bb * e).add_(r2).rsqrt_()
                g_pair = inv_f * self.p("pre_qq", x, items)[:, None]
                energy += g_pair.sum(0)
                if de_dlogb is None:
                    continue
                de_df2 = g_pair.mul_(inv_f).mul_(inv_f).mul_(-0.5)
                de_dr2_x2 = torch.mul(e, -0.5).add_(2.0).mul_(de_df2)  # 2 (1 - e/4) dE/df2
                de_dlogbb = de_df2.mul_(e).mul_(bb.add_(quarter_r2))  # bb dE/dbb
                self._add_pairs(de_dlogb, items, de_dlogbb, de_dlogbb)
                if not keep:
                    self._add_pair_forces(grad, items, v, de_dr2_x2)
            if grad is None:
                return energy.to(x.dtype)
            # dE/d(HCT sum) per atom: dE/dB dB/dsum, dE/dB = (sum bb dE/dbb - E_self - 6 E_ace)/B
            de_dsum = de_dlogb.sub_(self_e).sub_(ace_e, alpha=6.0).div_(born).mul_(dborn)
            for items in slices:  # pass 3: forces through the Born radii
                if not keep:
                    v, r2 = self._vectors(x, items)
                    r = r2.sqrt_()
                    dterm = self._hct_inplace(r, items, term=False, grad=True)[1]
                i, j = self.index(0, x, items), self.index(1, x, items)
                de_dr = dterm[0].mul_(de_dsum.index_select(0, i))
                de_dr.addcmul_(dterm[1], de_dsum.index_select(0, j)).div_(r)
                self._add_pair_forces(grad, items, v, de_dr.add_(de_dr2_x2) if keep else de_dr)
            return energy.to(x.dtype)

    def _vectors(self, x: Tensor, items: slice) -> tuple[Tensor, Tensor]:
        """x_j - x_i (m, 3, batch) and its squared norm (m, batch) of the pairs."""
        xi, xj = self.rows(x, items)
        v = xj.sub_(xi)
        return v, sq(v)

    def _add_pair_forces(self, grad: Tensor, items: slice, v: Tensor, w: Tensor) -> None:
        """Add dE/dx of pair terms with dE/dv = w v (w: (m, batch)) into ``grad``;
        overwrites ``v``."""
        gv = v.mul_(col(w))
        self.add_rows(grad, items, [-gv, gv])

    def _add_pairs(self, out: Tensor, items: slice, at_i: Tensor, at_j: Tensor) -> None:
        """Add per-pair values (m, batch) into per-atom sums ``out`` (n, batch)."""
        out.index_add_(0, self.index(0, out, items), at_i)
        out.index_add_(0, self.index(1, out, items), at_j)
