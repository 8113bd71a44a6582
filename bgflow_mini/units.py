"""Units and conventions shared by the whole package (no imports from other modules here).

* Energies: kJ/mol for physical energies; reduced energies are in kT = R T.
  :func:`kt_kjmol` is the one conversion from a temperature (K) to kT (kJ/mol).
* Angles: radians; torsions and other periodic angles lie in [-pi, pi).
  :func:`wrap_angle` is the one wrapping function, for torch tensors, numpy arrays
  and Python floats alike.
"""

from __future__ import annotations

import math
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor

__all__ = ["AVOGADRO", "BOLTZMANN_J", "MOLAR_GAS_CONSTANT", "TWO_PI", "kt_kjmol", "wrap_angle"]

AVOGADRO = 6.02214076e23
"""Avogadro constant, 1/mol (exact, SI 2019)."""
BOLTZMANN_J = 1.380649e-23
"""Boltzmann constant, J/K (exact, SI 2019)."""
MOLAR_GAS_CONSTANT = AVOGADRO * BOLTZMANN_J * 1e-3
"""Molar gas constant R = N_A k_B in kJ/mol/K (0.00831446261815324; equal to OpenMM's)."""
TWO_PI = 2.0 * math.pi


def kt_kjmol(temperature: float) -> float:
    """kT = R T in kJ/mol at ``temperature`` in K (a float; ``ValueError`` unless > 0)."""
    t = float(temperature)
    if not t > 0 or math.isinf(t):
        raise ValueError(f"temperature must be a finite number > 0 K, got {temperature!r}")
    return MOLAR_GAS_CONSTANT * t


@overload
def wrap_angle(a: Tensor) -> Tensor: ...
@overload
def wrap_angle(a: np.ndarray) -> np.ndarray: ...
@overload
def wrap_angle(a: float) -> float: ...


def wrap_angle(a: Any) -> Any:
    """Angles (radians) wrapped into [-pi, pi), elementwise, any shape.

    Values already in [-pi, pi) are returned bit-exactly; others are reduced modulo
    2 pi, and a result that rounds to +pi becomes -pi (so the output is always
    ``< pi``, e.g. the float just below -pi maps to -pi). NaN and +-inf give NaN.

    Types: a torch tensor gives a tensor of the same device and (floating) dtype,
    differentiable with derivative 1; a numpy array (or sequence) gives a numpy array
    (float dtype kept, integers as float64); a Python / numpy scalar gives a float.
    """
    if isinstance(a, Tensor):
        if not a.is_floating_point():
            a = a.to(torch.get_default_dtype())
        if a.requires_grad and torch.is_grad_enabled() and not _compiling():
            return _WrapAngle.apply(a)
        return _wrap_tensor(a)
    is_scalar = isinstance(a, int | float | np.generic)
    v = np.asarray(a)
    if not np.issubdtype(v.dtype, np.floating):
        v = v.astype(np.float64)
    pi, two_pi = v.dtype.type(math.pi), v.dtype.type(TWO_PI)
    with np.errstate(invalid="ignore"):
        inside = (v >= -pi) & (v < pi)
        w = np.remainder(v + pi, two_pi)
        w = np.where(w >= two_pi, w - two_pi, w) - pi
    out = np.where(inside, v, w)
    return float(out) if is_scalar else out


def _compiling() -> bool:
    """Whether torch.compile is tracing (it traces the plain operations, not our Function)."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # torch >= 2.3
    return bool(check()) if check is not None else False


def _wrap_tensor(a: Tensor) -> Tensor:
    inside = (a >= -math.pi) & (a < math.pi)
    w = torch.remainder(a + math.pi, TWO_PI)
    w = torch.where(w >= TWO_PI, w - TWO_PI, w) - math.pi
    return torch.where(inside, a, w)


class _WrapAngle(torch.autograd.Function):
    """:func:`wrap_angle` with derivative 1 as one autograd node (a shift by a multiple of
    2 pi), instead of a graph of the ~10 elementwise operations that compute it."""

    @staticmethod
    def forward(a: Tensor) -> Tensor:
        return _wrap_tensor(a)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad
