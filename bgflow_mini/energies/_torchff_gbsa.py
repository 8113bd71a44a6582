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

See :mod:`._torchff_terms` for the term interface.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ._torchff_terms import ONE_4PI_EPS0, VectorTerm, buf, sq

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


class GBSAOBCTerm(VectorTerm):
    """GBSAOBCForce with NoCutoff (OBC II + ACE), all atom pairs.

    Arguments:
        charge: (n,) e. radius: (n,) nm. scale: (n,) OBC radius scale factors.
        solvent_dielectric, solute_dielectric: dielectric constants.
        surface_area_energy: kJ/mol/nm^2 (ACE term weight).
    """

    name = "GBSAOBCForce"

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
        ii, jj = np.triu_indices(n, k=1)
        super().__init__([list(zip(ii.tolist(), jj.tolist(), strict=True))])
        n_pairs = len(ii)
        if solute_dielectric != 0.0 and solvent_dielectric != 0.0:
            pre = -ONE_4PI_EPS0 * (1.0 / solute_dielectric - 1.0 / solvent_dielectric)
        else:
            pre = 0.0
        offset = radius - OBC_DIELECTRIC_OFFSET
        scaled = offset * scale
        # ordered pairs (I, J): first (i, j), then (j, i); HCT_IJ uses offset_I, scaled_J
        first = np.concatenate([ii, jj])
        second = np.concatenate([jj, ii])
        gather = np.zeros((2 * n_pairs, n))
        gather[np.arange(2 * n_pairs), first] = 1.0
        pair_sum = np.zeros((n, n_pairs))
        pair_sum[ii, np.arange(n_pairs)] = 1.0
        pair_sum[jj, np.arange(n_pairs)] = 1.0
        self.register_buffer("offset_i", buf(offset[first]))
        self.register_buffer("inv_offset_i", buf(1.0 / offset[first]))
        self.register_buffer("scaled_j", buf(scaled[second]))
        self.register_buffer("scaled_j2", buf(0.25 * scaled[second] ** 2))
        self.register_buffer("gather", buf(gather))
        self.register_buffer("pair_sum", buf(pair_sum))
        self.register_buffer("half_offset", buf(0.5 * offset))
        self.register_buffer("inv_offset", buf(1.0 / offset))
        self.register_buffer("inv_radius", buf(1.0 / radius))
        self.register_buffer("pre_qq", buf(pre * charge[ii] * charge[jj]))
        self.register_buffer("pre_self", buf(0.5 * pre * charge**2))
        ace = 4.0 * math.pi * surface_area_energy * (radius + OBC_PROBE_RADIUS) ** 2
        self.register_buffer("ace_r6", buf(ace * radius**6))

    @property
    def width(self) -> int:
        """Intermediates hold both orders of every pair."""
        return 2 * len(self.groups[0])

    def _hct(self, r: Tensor) -> Tensor:
        """HCT integrals of the ordered pairs (batch, 2 n_pairs) from r (batch, n_pairs).

        OpenMM's branches are folded into clamps (no masks): with
        u = 1/max(r + s_j, offset_i) and l = 1/max(|r - s_j|, offset_i) an inactive
        pair (r + s_j <= offset_i) gives u = l and a zero term, and the
        "I inside J" correction 2 (1/offset_i - 1/max(s_j - r, offset_i)) vanishes
        unless offset_i < s_j - r. The derivative reduces to
        0.25 (1 + s_j^2/r^2)(u^2 - l^2) - 0.5 log(u/l) / r^2 in every regime (the
        l- and u-dependences cancel), as in OpenMM's Reference code.
        """
        rr = torch.cat([r, r], dim=-1)
        s_j, off_i = self.p("scaled_j", r), self.p("offset_i", r)
        diff = rr - s_j
        upper = torch.maximum(rr + s_j, off_i)
        lo = torch.maximum(diff.abs(), off_i)
        u = upper.reciprocal()
        l = lo.reciprocal()
        inv_r = rr.reciprocal()
        dul = u * u - l * l
        a = (0.25 * rr) * dul
        b = (self.p("scaled_j2", r) * inv_r) * dul  # 0.25 s_j^2 / r (u^2 - l^2)
        c = (0.5 * inv_r) * torch.log(lo / upper)
        l_inside = torch.maximum(-diff, off_i).reciprocal()
        return l - u + a - b + c + 2.0 * (self.p("inv_offset_i", r) - l_inside)

    def _hct_inplace(self, r: Tensor, with_grad: bool) -> tuple[Tensor, Tensor | None]:
        """:meth:`_hct` (optionally with d/dr), graph-free and mostly in place.

        Returns the terms and d/dr (or None), both (batch, 2, n_pairs).
        """
        n_pairs = r.shape[-1]
        r3 = r.unsqueeze(1)  # (batch, 1, n_pairs), broadcast over both orders
        s_j = self.p("scaled_j", r).view(2, n_pairs)
        off_i = self.p("offset_i", r).view(2, n_pairs)
        inv_r = r3.reciprocal()
        upper = torch.maximum(r3 + s_j, off_i)
        diff = r3 - s_j
        lo = torch.maximum(diff.abs(), off_i)
        c = torch.div(lo, upper).log_().mul_(0.5 * inv_r)
        l_inside = torch.maximum(diff.neg_(), off_i).reciprocal_()
        u = upper.reciprocal_()
        l = lo.reciprocal_()
        dul = torch.mul(u, u).addcmul_(l, l, value=-1.0)
        term = torch.sub(l, u).add_(c).add_(l_inside, alpha=-2.0)
        term += 2.0 * self.p("inv_offset_i", r).view(2, n_pairs)
        a = dul * (0.25 * r3)
        b = dul.mul_(self.p("scaled_j2", r).view(2, n_pairs) * inv_r)
        term += a
        term -= b
        if not with_grad:
            return term, None
        return term, a.add_(b).sub_(c).mul_(inv_r)

    def _born(self, s_sum: Tensor) -> tuple[Tensor, Tensor]:
        """Born radii (batch, n) and dB/d(sum of HCT terms)."""
        s = s_sum * self.p("half_offset", s_sum)
        t = torch.tanh(s * (OBC_ALPHA + s * (-OBC_BETA + s * OBC_GAMMA)))
        inv_radius = self.p("inv_radius", s_sum)
        born = (self.p("inv_offset", s_sum) - t * inv_radius).reciprocal()
        dpsi = OBC_ALPHA + s * (-2.0 * OBC_BETA + s * (3.0 * OBC_GAMMA))
        dborn = born * born * inv_radius * (1.0 - t * t) * dpsi * self.p("half_offset", s_sum)
        return born, dborn

    def forward(self, v: Tensor) -> Tensor:
        r2 = sq(v[0])
        if torch.is_grad_enabled():
            term = self._hct(r2.sqrt())
        else:
            term = self._hct_inplace(r2.sqrt(), with_grad=False)[0].flatten(1)
        s = term @ self.p("gather", v) * self.p("half_offset", v)
        t = torch.tanh(s * (OBC_ALPHA + s * (-OBC_BETA + s * OBC_GAMMA)))
        born = (self.p("inv_offset", v) - t * self.p("inv_radius", v)).reciprocal()
        bb = torch.exp(torch.log(born) @ self.p("pair_sum", v))  # B_i B_j per pair
        f2 = r2 + bb * torch.exp(-0.25 * r2 / bb)
        inv_b = born.reciprocal()
        inv_b3 = inv_b * inv_b * inv_b
        return (
            f2.rsqrt() @ self.p("pre_qq", v)
            + inv_b @ self.p("pre_self", v)
            + (inv_b3 * inv_b3) @ self.p("ace_r6", v)
        )

    def energy_grad(self, v: Tensor) -> tuple[Tensor, Tensor]:
        r2 = sq(v[0])
        r = r2.sqrt()
        term, dterm = self._hct_inplace(r, with_grad=True)
        gather = self.p("gather", v)
        born, dborn = self._born(term.flatten(1) @ gather)
        pair_sum = self.p("pair_sum", v)
        bb = torch.exp(torch.log(born) @ pair_sum)
        quarter_r2 = 0.25 * r2
        e = torch.exp(-quarter_r2 / bb)
        f2 = r2 + bb * e
        inv_f = f2.rsqrt()
        g_pair = self.p("pre_qq", v) * inv_f
        inv_b = born.reciprocal()
        inv_b3 = inv_b * inv_b * inv_b
        self_e = self.p("pre_self", v) * inv_b
        ace_e = self.p("ace_r6", v) * inv_b3 * inv_b3
        energy = g_pair.sum(-1) + (self_e + ace_e).sum(-1)
        de_df2 = -0.5 * g_pair * inv_f * inv_f
        de_dr2 = de_df2 * (1.0 - 0.25 * e)
        de_dlogbb = de_df2 * e * (bb + quarter_r2)  # bb * dE/dbb
        de_dborn = (de_dlogbb @ pair_sum.T - self_e - 6.0 * ace_e) * inv_b
        de_dterm = (de_dborn * dborn) @ gather.T  # (batch, 2 n_pairs)
        de_dr = dterm.mul_(de_dterm.view(dterm.shape)).sum(1)
        return energy, v * (2.0 * de_dr2 + de_dr / r)
