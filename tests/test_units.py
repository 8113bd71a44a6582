"""Tests of the shared unit conventions: kT from a temperature and angle wrapping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from openmm import unit

from bgflow_mini import cv, free_energy
from bgflow_mini.coordinates import normalization
from bgflow_mini.flows import circular
from bgflow_mini.units import MOLAR_GAS_CONSTANT, kt_kjmol, wrap_angle

PI = math.pi


# ---- kT ---------------------------------------------------------------------------------
def test_kt_kjmol_is_r_times_t():
    r_exact = 6.02214076e23 * 1.380649e-23 / 1000.0  # N_A k_B (exact SI), kJ/mol/K
    assert kt_kjmol(300) == pytest.approx(r_exact * 300.0, rel=1e-15)
    assert isinstance(kt_kjmol(300), float)
    # R = 0.0083144626 kJ/mol/K as quoted to 8 significant digits (truncation ~2e-9)
    assert kt_kjmol(300.0) == pytest.approx(0.0083144626 * 300.0, rel=3e-9)
    assert kt_kjmol(300.0) == pytest.approx(2.494338785445972, rel=1e-12)
    r_openmm = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
    assert MOLAR_GAS_CONSTANT == pytest.approx(r_openmm, rel=1e-12)
    assert kt_kjmol(np.float32(350.0)) == pytest.approx(r_openmm * 350.0, rel=1e-12)
    for bad in (0.0, -5.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            kt_kjmol(bad)


# ---- wrap_angle ---------------------------------------------------------------------------
def _values() -> np.ndarray:
    rng = np.random.default_rng(0)
    odd = (2 * np.arange(-50, 50) + 1) * PI  # odd multiples of pi and their neighbours
    edges = [PI, -PI, 3 * PI, -3 * PI, 0.0, -1e-300, 2 * PI, -2 * PI, 1e6, -1e6]
    edges += [np.nextafter(PI, 0.0), np.nextafter(-PI, -4.0), np.nextafter(PI, 4.0)]
    return np.concatenate(
        [
            rng.uniform(-40.0, 40.0, 5000),
            odd,
            np.nextafter(odd, np.inf),
            np.nextafter(odd, -np.inf),
            edges,
        ]
    )


def test_wrap_angle_numpy_torch_float_agree():
    x = _values()
    w_np = wrap_angle(x)
    w_t = wrap_angle(torch.from_numpy(x))
    w_f = np.array([wrap_angle(float(v)) for v in x])
    assert isinstance(w_np, np.ndarray) and w_np.dtype == np.float64
    assert isinstance(w_t, torch.Tensor) and w_t.dtype == torch.float64
    np.testing.assert_array_equal(w_np, w_t.numpy())
    np.testing.assert_array_equal(w_np, w_f)
    assert w_np.min() >= -PI and w_np.max() < PI
    # the same angle: a multiple of 2 pi apart
    k = (x - w_np) / (2 * PI)
    np.testing.assert_allclose(k, np.round(k), atol=1e-9)
    np.testing.assert_allclose(np.cos(w_np), np.cos(x), atol=1e-9)
    np.testing.assert_allclose(np.sin(w_np), np.sin(x), atol=1e-9)


def test_wrap_angle_edges():
    below = np.nextafter(-PI, -4.0)
    assert wrap_angle(below) == -PI  # remainder alone would give +pi here
    assert wrap_angle(torch.tensor(below, dtype=torch.float64)).item() == -PI
    assert wrap_angle(np.array([below]))[0] == -PI
    for v in (PI, 3 * PI, -PI, -3 * PI):
        assert wrap_angle(v) == -PI
        assert wrap_angle(torch.tensor([v], dtype=torch.float64)).item() == -PI
    inside = np.array([-PI, np.nextafter(PI, 0.0), 0.3, -1e-300, 0.0])
    assert np.array_equal(wrap_angle(inside), inside)  # returned bit-exactly
    assert torch.equal(wrap_angle(torch.from_numpy(inside)), torch.from_numpy(inside))
    assert wrap_angle(7.0) == pytest.approx(7.0 - 2 * PI, abs=1e-15)
    assert wrap_angle(-7.0) == pytest.approx(-7.0 + 2 * PI, abs=1e-15)
    assert math.isnan(wrap_angle(math.nan)) and math.isnan(wrap_angle(math.inf))


def test_wrap_angle_types_dtypes_and_gradient():
    x = _values()
    x32 = x.astype(np.float32)
    a, b = wrap_angle(x32), wrap_angle(torch.from_numpy(x32))
    assert a.dtype == np.float32 and b.dtype == torch.float32
    np.testing.assert_array_equal(a, b.numpy())
    assert a.min() >= -np.float32(PI) and a.max() < np.float32(PI)
    assert isinstance(wrap_angle(np.float64(4.0)), float) and isinstance(wrap_angle(4), float)
    assert wrap_angle([1, 7]).dtype == np.float64
    np.testing.assert_allclose(wrap_angle([1, 7]), [1.0, 7.0 - 2 * PI], rtol=1e-15)
    assert wrap_angle(torch.tensor([1, 7])).is_floating_point()
    t = torch.tensor([-10.0, 0.5, 4.0, PI], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(wrap_angle(t).sum(), t)
    torch.testing.assert_close(g, torch.ones_like(t))
    if torch.cuda.is_available():
        tc = torch.from_numpy(x).cuda()
        out = wrap_angle(tc)
        assert out.device == tc.device
        np.testing.assert_array_equal(out.cpu().numpy(), wrap_angle(x))


def test_one_wrap_angle_everywhere():
    assert not hasattr(circular, "wrap")  # the old alias is gone
    assert normalization.wrap_angle is wrap_angle
    assert cv.wrap_angle is wrap_angle and free_energy.wrap_angle is wrap_angle
