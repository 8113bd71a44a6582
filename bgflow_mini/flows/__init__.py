"""Invertible flows: ``flow(z) -> (x, logdet)``, ``flow.inverse(x) -> (z, logdet)``.

On the CPU the splines and affine couplings run as fused C kernels (:mod:`.native`).
"""

from . import native
from .base import Flow, Inverse, Sequential, check_batch
from .circular import circular_spline, n_circular_spline_params
from .compiled import compile_flow, compile_generator, is_compiled
from .coupling import AdditiveCoupling, AffineCoupling, SplineCoupling, as_mask, coupling_flow
from .nets import MLP
from .permutation import Permutation
from .scaling import Scaling
from .spline import bounded_spline, n_bounded_spline_params

__all__ = [
    "Flow",
    "Sequential",
    "Inverse",
    "check_batch",
    "MLP",
    "AffineCoupling",
    "AdditiveCoupling",
    "SplineCoupling",
    "Permutation",
    "Scaling",
    "coupling_flow",
    "compile_flow",
    "compile_generator",
    "is_compiled",
    "as_mask",
    "circular_spline",
    "n_circular_spline_params",
    "bounded_spline",
    "n_bounded_spline_params",
    "native",
]
