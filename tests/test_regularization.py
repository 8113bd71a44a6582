"""linlogcut / LinLogCut: identity below the threshold, bounded and finite above."""

from __future__ import annotations

import math

import pytest
import torch

from bgflow_mini.energies import DoubleWell, Energy, LinLogCut, linlogcut

HIGH, MAX = 100.0, 1e6
CAP = HIGH + math.log1p(MAX - HIGH)


def test_identity_below_and_log_above():
    u = torch.tensor([-1e4, -3.0, 0.0, 50.0, 99.999, 100.0], dtype=torch.float64)
    assert torch.equal(linlogcut(u, HIGH, MAX), u)
    v = torch.tensor([101.0, 200.0, 1e5], dtype=torch.float64)
    expected = HIGH + torch.log(1 + v - HIGH)
    torch.testing.assert_close(linlogcut(v, HIGH, MAX), expected, rtol=1e-15, atol=0)


def test_continuous_and_monotone_at_threshold():
    eps = 1e-7
    u = torch.tensor([HIGH - eps, HIGH, HIGH + eps], dtype=torch.float64)
    out = linlogcut(u, HIGH, MAX)
    assert (out[1:] - out[:-1] >= 0).all()
    assert abs(out[2].item() - out[0].item()) < 3 * eps
    grid = torch.linspace(HIGH - 50, 2 * MAX, 100_001, dtype=torch.float64)
    assert (linlogcut(grid, HIGH, MAX).diff() >= 0).all()
    # slope 1 on both sides of the threshold (C1)
    g = torch.tensor([HIGH - 1e-9, HIGH + 1e-9], dtype=torch.float64, requires_grad=True)
    (dg,) = torch.autograd.grad(linlogcut(g, HIGH, MAX).sum(), g)
    torch.testing.assert_close(dg, torch.ones_like(dg), rtol=1e-8, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nonfinite_and_huge_inputs_are_capped_with_finite_gradients(dtype):
    u = torch.tensor(
        [1e30, float("inf"), float("nan"), float("-inf"), MAX, 2 * MAX, 10.0, 150.0],
        dtype=dtype,
        requires_grad=True,
    )
    out = linlogcut(u, HIGH, MAX)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out[:6], torch.full((6,), CAP, dtype=dtype))
    (g,) = torch.autograd.grad(out.sum(), u)
    assert torch.isfinite(g).all()
    expected = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1 / 51], dtype=dtype)
    torch.testing.assert_close(g, expected)


def test_bad_thresholds():
    with pytest.raises(ValueError):
        linlogcut(torch.zeros(3), high=10.0, max=5.0)
    with pytest.raises(ValueError):
        LinLogCut(DoubleWell(), high=10.0, max=10.0)


class _Singular(Energy):
    """u = 1/|x1| + x2^2: +inf at x1 = 0, NaN for a NaN input."""

    def __init__(self) -> None:
        super().__init__(2)

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 / x[:, 0].abs() + x[:, 1] ** 2


def test_wrapper_values_gradients_and_stats():
    e = LinLogCut(_Singular(), high=HIGH, max=MAX)
    assert e.dim == 2
    x = torch.tensor(
        [[1.0, 2.0], [0.0, 1.0], [float("nan"), 0.0], [1e-3, 0.5], [0.5, -1.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    u = e(x)
    assert torch.isfinite(u).all()
    torch.testing.assert_close(u[[0, 4]], torch.tensor([5.0, 3.0], dtype=torch.float64))
    assert u[1].item() == pytest.approx(CAP) and u[2].item() == pytest.approx(CAP)
    assert u[3].item() == pytest.approx(HIGH + math.log(1 + 1000.25 - HIGH))
    (g,) = torch.autograd.grad(u.sum(), x)
    assert torch.isfinite(g).all()
    # good rows: exact gradient of the cut energy; bad rows: zero
    torch.testing.assert_close(g[0], torch.tensor([-1.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(g[4], torch.tensor([-4.0, -2.0], dtype=torch.float64))
    slope = 1.0 / (1.0 + 1000.25 - HIGH)
    torch.testing.assert_close(g[3], torch.tensor([-1e6 * slope, 1.0 * slope], dtype=torch.float64))
    assert (g[1:3] == 0).all()
    assert e.stats == {"evaluated": 5, "nonfinite": 2, "capped": 1}
    assert e.n_above_high == 1
    with torch.no_grad():
        e(x)
    assert e.stats == {"evaluated": 10, "nonfinite": 4, "capped": 2}
    assert e.last_stats == {"evaluated": 5, "nonfinite": 2, "capped": 1}
    e.reset_stats()
    assert e.stats == {"evaluated": 0, "nonfinite": 0, "capped": 0}
    # a batch where every energy is non-finite still gives zero, finite gradients
    x_bad = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    (g_bad,) = torch.autograd.grad(e(x_bad).sum(), x_bad)
    assert torch.equal(g_bad, torch.zeros_like(g_bad))


def test_wrapper_is_transparent_in_normal_range():
    dw = DoubleWell(dim=3)
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(LinLogCut(dw)(x), dw(x))
    assert LinLogCut(dw)(x.float()).dtype == torch.float32


class _Counting(Energy):
    """u = |x|^2 / 2, +inf where x[:, 0] > 5 (gradient inf there); counts calls and closes."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__(dim)
        self.calls = 0
        self.closed = 0

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        hot = x[:, 0] > 5.0
        x0 = torch.where(hot, x[:, 0], 0.0)  # "safe where": no gradient leaks to other rows
        return 0.5 * (x**2).sum(-1) + torch.where(hot, x0 * math.inf, 0.0)

    def close(self) -> None:
        self.closed += 1


def test_single_evaluation_and_gradients_of_bad_rows():
    inner = _Counting()
    e = LinLogCut(inner, high=HIGH, max=MAX)
    good = torch.tensor([[1.0, 2.0, -1.0], [0.5, -3.0, 4.0], [-2.0, 0.0, 1.5]], dtype=torch.float64)
    bad = torch.tensor([[6.0, 1.0, 1.0], [5.5, 0.0, -2.0]], dtype=torch.float64)
    # the inner energy really is infinite there, and a zero upstream gradient gives NaN
    xb = bad.clone().requires_grad_(True)
    ub = inner(xb)
    assert torch.isinf(ub).all()
    assert torch.isnan(torch.autograd.grad(ub, xb, torch.zeros_like(ub))[0]).any()
    inner.calls = 0

    x = torch.cat([good[:1], bad[:1], good[1:], bad[1:]]).requires_grad_(True)
    is_bad = torch.tensor([False, True, False, False, True])
    u = e(x)
    assert inner.calls == 1
    (g,) = torch.autograd.grad(u.sum(), x)
    assert torch.isfinite(g).all()
    assert (g[is_bad] == 0).all()

    x_ref = good.clone().requires_grad_(True)
    u_ref = e(x_ref)
    assert inner.calls == 2
    (g_ref,) = torch.autograd.grad(u_ref.sum(), x_ref)
    torch.testing.assert_close(g[~is_bad], g_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_ref, good, rtol=0, atol=1e-12)  # grad of |x|^2/2
    torch.testing.assert_close(u[~is_bad], u_ref, rtol=0, atol=1e-12)
    assert torch.all(u[is_bad] == CAP)

    # the hook is tied to this call's graph: later uses of the same leaf are unaffected
    x2 = bad.clone().requires_grad_(True)
    e(x2)  # graph with a hook that is never backpropagated
    (g2,) = torch.autograd.grad((x2**2).sum(), x2)
    torch.testing.assert_close(g2, 2 * bad)
    # other uses of x keep their gradient on bad rows (only the energy's part is zeroed)
    x3 = torch.cat([good, bad]).requires_grad_(True)
    (g3,) = torch.autograd.grad(e(x3).sum() + x3.sum(), x3)
    torch.testing.assert_close(g3[3:], torch.ones_like(bad))
    torch.testing.assert_close(g3[:3], good + 1.0, rtol=0, atol=1e-12)


def test_stats_counters_and_last_stats():
    inner = _Counting(dim=1)
    e = LinLogCut(inner, high=HIGH, max=MAX)
    # u = x^2/2: 0.5, 50 (= HIGH/2), 200 (> HIGH), 2e6 (> MAX, finite), inf, nan
    x = torch.tensor([[1.0], [10.0], [20.0], [2000.0], [math.inf], [math.nan]]).double()
    u = e(-x)  # negative: rows with x0 > 5 would be infinite by construction
    assert inner.calls == 1
    assert e.last_stats == {"evaluated": 6, "nonfinite": 2, "capped": 2}
    assert e.stats == e.last_stats
    torch.testing.assert_close(u[:2], torch.tensor([0.5, 50.0], dtype=torch.float64))
    assert u[2].item() == pytest.approx(HIGH + math.log1p(100.0))
    assert torch.all(u[3:] == CAP)
    e(-x[:2])
    assert e.last_stats == {"evaluated": 2, "nonfinite": 0, "capped": 0}
    assert e.stats == {"evaluated": 8, "nonfinite": 2, "capped": 2}
    assert e.n_evaluated == 8 and e.n_nonfinite == 2 and e.n_capped == e.n_above_high == 2
    e.reset_stats()
    assert e.stats == e.last_stats == {"evaluated": 0, "nonfinite": 0, "capped": 0}
    # no counting when disabled
    quiet = LinLogCut(inner, high=HIGH, max=MAX, track_stats=False)
    quiet(-x)
    assert quiet.stats == {"evaluated": 0, "nonfinite": 0, "capped": 0}


def test_close_and_context_manager_forward_to_wrapped_energy():
    inner = _Counting()
    with LinLogCut(inner) as e:
        assert isinstance(e, LinLogCut) and e.base is inner
        assert inner.closed == 0
    assert inner.closed == 1
    nested = LinLogCut(LinLogCut(inner))
    assert nested.base is inner
    nested.close()
    assert inner.closed == 2
    # base class: close is a no-op, the context manager returns the energy itself
    dw = DoubleWell()
    with dw as d:
        assert d is dw
    dw.close()
    with pytest.raises(RuntimeError):  # exceptions are not swallowed, close still runs
        with LinLogCut(inner):
            raise RuntimeError("boom")
    assert inner.closed == 3


class _OverflowingForce(torch.autograd.Function):
    """u = |x|^2 / 2 with a gradient that is inf in the first coordinate when x0 > 5."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * (x**2).sum(-1)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = g[:, None] * x
        first = torch.zeros_like(x, dtype=torch.bool)
        first[:, 0] = True
        return torch.where(first & (x[:, :1] > 5.0), grad * math.inf, grad)


class _Overflowing(Energy):
    def _energy(self, x):
        return _OverflowingForce.apply(x)


def test_nonfinite_gradient_of_a_finite_energy_is_dropped():
    e = LinLogCut(_Overflowing(3), high=HIGH, max=MAX)
    x = torch.tensor([[1.0, 2.0, -1.0], [6.0, 1.0, 1.0], [0.5, -3.0, 4.0]], dtype=torch.float64)
    x.requires_grad_(True)
    u = e(x)
    assert torch.isfinite(u).all() and e.last_stats["nonfinite"] == 0  # the energy is fine
    (g,) = torch.autograd.grad(u.sum(), x)
    assert torch.isfinite(g).all()
    assert (g[1, 0] == 0).all()  # only the overflowing entry is dropped
    torch.testing.assert_close(g[[0, 2]], x.detach()[[0, 2]], rtol=0, atol=1e-12)
    torch.testing.assert_close(g[1, 1:], x.detach()[1, 1:], rtol=0, atol=1e-12)
    # without the wrapper the same backward poisons the gradient
    (g_raw,) = torch.autograd.grad(_Overflowing(3)(x).sum(), x)
    assert not torch.isfinite(g_raw).all()
