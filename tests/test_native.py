"""The fused C spline kernels (flows/native.py) against the PyTorch implementation."""

from __future__ import annotations

import math

import pytest
import torch

from bgflow_mini.flows import circular_spline, coupling_flow, kernel_library, native
from bgflow_mini.flows.spline import bounded_spline

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")

BOUND = 2.5


@pytest.fixture(autouse=True)
def _native_on():
    native.use_native(True)
    yield
    native.use_native(None)


def _spline(kind: str):
    if kind == "circular":
        return circular_spline, lambda k: 3 * k + 1
    return (lambda x, p, inverse: bounded_spline(x, p, BOUND, inverse)), lambda k: 3 * k - 1


def _inputs(kind: str, k: int, dtype=torch.float64, n: int = 48, f: int = 5, scale: float = 1.0):
    """x with points outside [-pi, pi) (circular) or beyond the bound (tails), as a strided
    column slice like the coupling layers hand over; params (n, f, P)."""
    g = torch.Generator().manual_seed(k)
    _, n_params = _spline(kind)
    wide = torch.rand(n, 2 * f, generator=g, dtype=dtype) * 9 - 4.5
    x = wide[:, ::2]  # non-contiguous
    p = scale * torch.randn(n, f, n_params(k), generator=g, dtype=dtype)
    return x, p


def _run(kind, x, p, inverse, flag, weights):
    native.use_native(flag)
    fn, _ = _spline(kind)
    x, p = x.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    y, ld = fn(x, p, inverse)
    gx, gp = torch.autograd.grad((y * weights[0]).sum() + (ld * weights[1]).sum(), (x, p))
    return y.detach(), ld.detach(), gx, gp


@pytest.mark.parametrize("kind", ["circular", "bounded"])
@pytest.mark.parametrize("k", [1, 2, 5, 16])
@pytest.mark.parametrize("inverse", [False, True])
def test_values_and_gradients_equal_pytorch(kind, k, inverse):
    x, p = _inputs(kind, k)
    g = torch.Generator().manual_seed(99)
    weights = (torch.randn(x.shape, generator=g, dtype=x.dtype),) * 2
    weights = (weights[0], torch.randn(x.shape, generator=g, dtype=x.dtype))
    ref = _run(kind, x, p, inverse, False, weights)
    out = _run(kind, x, p, inverse, True, weights)
    dy = out[0] - ref[0]
    if kind == "circular":  # the same angle (a value at the cut may come out as -pi or ~pi)
        dy = torch.remainder(dy + math.pi, 2 * math.pi) - math.pi
    assert dy.abs().max() < 1e-12
    assert (out[1] - ref[1]).abs().max() < 1e-11
    for a, b in zip(out[2:], ref[2:]):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, float(b.abs().max()))
    if kind == "bounded":  # the tails: identity, zero log-det, no parameter gradient
        tail = x.abs() > BOUND
        assert tail.any() and torch.equal(out[0][tail], x[tail])
        assert (out[1][tail] == 0).all() and (out[3][tail] == 0).all()


@pytest.mark.parametrize("kind", ["circular", "bounded"])
@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck(kind, inverse):
    x, p = _inputs(kind, 4, n=6, f=3, scale=0.7)
    x = x.clamp(-3.0, 3.0)  # away from the cut at +-pi, where the angle jumps by 2 pi
    fn, _ = _spline(kind)
    x, p = x.contiguous().requires_grad_(), p.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, inverse), (x, p), atol=1e-6)


@pytest.mark.parametrize("kind", ["circular", "bounded"])
@pytest.mark.parametrize("inverse", [False, True])
def test_float32_at_least_as_accurate_as_pytorch(kind, inverse):
    """The kernels compute in double inside, so float32 values and gradients are no further
    from the float64 answer than PyTorch's own float32 path."""
    x, p = _inputs(kind, 16, n=256, scale=1.5)
    weights = (torch.ones_like(x), torch.ones_like(x))
    exact = _run(kind, x, p, inverse, False, weights)
    w32 = tuple(w.float() for w in weights)
    for name, flag in (("torch", False), ("native", True)):
        got = _run(kind, x.float(), p.float(), inverse, flag, w32)
        err = [float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(got, exact)]
        if name == "torch":
            torch_err = err
        else:
            assert all(e <= max(2 * t, 1e-6) for e, t in zip(err, torch_err)), (err, torch_err)


def test_coupling_stack_log_prob_and_training_gradients_equal_pytorch():
    """A whole RNVP stack with circular features: log-dets both ways and parameter
    gradients of a loss equal with and without the kernels (float64)."""
    torch.manual_seed(0)
    dim, circ = 8, [1, 3, 4, 6]
    flow = coupling_flow(dim, 3, hidden=(16, 16), kind="rnvp", circular=circ, n_bins=6).double()
    with torch.no_grad():
        for q in flow.parameters():
            q.add_(0.15 * torch.randn_like(q))
    z = torch.randn(64, dim, dtype=torch.float64)
    z[:, circ] = (torch.rand(64, len(circ), dtype=torch.float64) * 2 - 1) * math.pi
    results = []
    for flag in (False, True):
        native.use_native(flag)
        flow.zero_grad()
        x, ld = flow(z)
        z2, ld_inv = flow.inverse(x.detach())
        (x.square().sum() + ld.sum() + ld_inv.sum()).backward()
        grads = torch.cat([q.grad.flatten() for q in flow.parameters()])
        dz = torch.remainder(z2 - z + math.pi, 2 * math.pi) - math.pi  # round trip
        results.append((x.detach(), ld.detach(), ld_inv.detach(), grads, dz.abs().max()))
    for name, a, b in zip(("x", "logdet", "logdet_inv", "grads"), *results):
        err = float((a - b).abs().max() / max(1.0, float(b.abs().max())))
        assert err < 1e-9, name
    assert results[1][-1] <= max(10 * results[0][-1], 1e-12)


def test_inference_path_and_empty_batch():
    """Without autograd the kernels run without saving anything; an empty batch works."""
    x, p = _inputs("circular", 3)
    with torch.no_grad():
        y, ld = circular_spline(x, p)
        assert y.shape == x.shape and ld.shape == x.shape and not y.requires_grad
        y0, ld0 = circular_spline(x[:0], p[:0])
    assert y0.shape == (0, x.shape[1]) and ld0.shape == (0, x.shape[1])
    assert ((y >= -math.pi) & (y < math.pi)).all()


@pytest.mark.parametrize("kind", ["circular", "bounded"])
def test_second_derivatives_equal_pytorch(kind):
    """With create_graph=True the backward goes through the PyTorch formulas, so higher
    derivatives (a Hessian-vector product here) are those of the PyTorch path."""
    x, p = _inputs(kind, 3, n=4, f=2)
    x = x.clamp(-3.0, 3.0).contiguous()
    fn, _ = _spline(kind)
    out = []
    for flag in (False, True):
        native.use_native(flag)
        xs, ps = x.clone().requires_grad_(), p.clone().requires_grad_()
        y, ld = fn(xs, ps, False)
        gx, gp = torch.autograd.grad((y.sin() + ld).sum(), (xs, ps), create_graph=True)
        hx, hp = torch.autograd.grad(gx.square().sum() + gp.sum(), (xs, ps))
        out.append((gx.detach(), gp.detach(), hx, hp))
    for a, b in zip(*out):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, float(b.abs().max()))


def test_switch_and_fallback_without_compiler(monkeypatch, tmp_path, caplog):
    """use_native(False) and a machine without a working C compiler both take the PyTorch
    path, with the same results; the failed build is said once, not raised."""
    x, p = _inputs("circular", 4)
    native.use_native(True)
    y_native, _ = circular_spline(x, p)
    native.use_native(False)
    assert native.status().startswith("off") and not native.supports(x, p)
    y_off, _ = circular_spline(x, p)
    native.use_native(None)
    monkeypatch.setattr(
        kernel_library, "_STATE", dict(kernel_library._STATE, lib=None, tried=False)
    )
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("BGFLOW_KERNEL_CACHE", str(tmp_path / "cache"))
    with caplog.at_level("WARNING"):
        assert not native.available()
    assert native.status().startswith("unavailable")
    assert "PyTorch implementation" in caplog.text
    y_fallback, _ = circular_spline(x, p)
    assert torch.equal(y_fallback, y_off)
    dy = torch.remainder(y_native - y_off + math.pi, 2 * math.pi) - math.pi
    assert dy.abs().max() < 1e-12


def test_environment_switch(monkeypatch):
    native.use_native(None)
    monkeypatch.setenv("BGFLOW_NATIVE_KERNELS", "0")
    assert not native.available() and native.status().startswith("off")
    monkeypatch.setenv("BGFLOW_NATIVE_KERNELS", "1")
    assert native.available()


def _layer(dim, mask, circular, n_bins, seed, perturb=0.3):
    """An AffineCoupling (float64, hidden (8,)) with every parameter perturbed."""
    from bgflow_mini.flows import AffineCoupling

    torch.manual_seed(seed)
    layer = AffineCoupling(dim, mask, hidden=(8,), circular=circular, n_bins=n_bins).double()
    with torch.no_grad():
        for q in layer.parameters():
            q.add_(perturb * torch.randn_like(q))
    return layer


@pytest.mark.parametrize("circular", [None, [0, 2, 3, 5]], ids=["affine", "affine_circ"])
@pytest.mark.parametrize("inverse", [False, True])
def test_affine_coupling_layer_equals_pytorch(circular, inverse):
    """One AffineCoupling layer (fused transform) against the PyTorch path: outputs,
    log-dets and the gradients of every parameter (conditioner, scale bounds) and of z."""
    mask = torch.tensor([True, False, True, False, True, True, False])
    layer = _layer(7, mask, circular, 5, seed=3, perturb=0.4)
    z0 = 1.3 * torch.randn(32, 7, dtype=torch.float64)
    if circular:
        z0[:, circular] = (torch.rand(32, len(circular), dtype=torch.float64) * 2 - 1) * 3.0
    weights = torch.randn(32, 7, dtype=torch.float64)
    out = []
    for flag in (False, True):
        native.use_native(flag)
        layer.zero_grad()
        z = z0.clone().requires_grad_()
        if flag:  # the kernel itself (a layer without circular features takes PyTorch's path)
            params = layer.conditioner(layer.conditioner_input(z))
            args = (layer.scale_bound, layer.idx_linear, layer.idx_circular, layer.n_bins)
            x, ld = native.native_affine_coupling(z, params, *args, inverse, None)
        else:
            x, ld = (layer.inverse if inverse else layer)(z)
        ((x.sin() * weights).sum() + ld.square().sum()).backward()
        grads = [q.grad.clone() for q in layer.parameters()]
        out.append((x.detach(), ld.detach(), z.grad, *grads))
    for a, b in zip(*out):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("inverse", [False, True])
def test_affine_kernel_extreme_scales_and_many_features(inverse):
    """The kernel's vectorised tanh / exp (chunks of 64 features) against the affine formula
    in PyTorch: more features than a chunk, raw log-scales from 1e-12 to saturation (tanh
    = +-1 to double precision), bounds up to 30 (e^30), and NaN stays NaN."""
    n_b, dim = 9, 150
    idx = torch.arange(3, 143, dtype=torch.int64)  # 140 affine features, 10 passed through
    g = torch.Generator().manual_seed(11)
    z0 = torch.randn(n_b, dim, generator=g, dtype=torch.float64)
    raw = torch.randn(n_b, idx.numel(), generator=g, dtype=torch.float64)
    raw[0] = torch.logspace(-12, 3, idx.numel(), dtype=torch.float64)
    raw[1] = -raw[0]
    raw[2, :8] = torch.tensor([0.0, -0.0, 19.0, -19.0, 40.0, -40.0, 800.0, -800.0])
    shift = torch.randn(n_b, idx.numel(), generator=g, dtype=torch.float64)
    params0 = torch.stack([raw, shift], -1).reshape(n_b, -1)
    bound0 = torch.rand(idx.numel(), generator=g, dtype=torch.float64) * 3
    bound0[:4] = torch.tensor([30.0, 0.0, 1e-9, 12.0])
    weights = torch.randn(n_b, dim, generator=g, dtype=torch.float64)
    empty = torch.zeros(0, dtype=torch.int64)  # no circular features
    out = []
    for fused in (False, True):
        z, params, bound = (t.clone().requires_grad_() for t in (z0, params0, bound0))
        if fused:
            x, ld = native.native_affine_coupling(z, params, bound, idx, empty, 4, inverse, None)
        else:
            p = params.reshape(n_b, -1, 2)
            s = bound * torch.tanh(p[..., 0])
            zi = z[:, idx]
            y = (zi - p[..., 1]) * torch.exp(-s) if inverse else zi * torch.exp(s) + p[..., 1]
            x = z.index_copy(1, idx, y)
            ld = (-s if inverse else s).sum(-1)
        ((x * weights).sum() + ld.square().sum()).backward()
        out.append((x.detach(), ld.detach(), z.grad, params.grad, bound.grad))
    for a, b in zip(*out):
        # per row, relative to its largest entry (rows reach e^30); where tanh rounds to 1
        # PyTorch's 1 - tanh^2 is 0, the kernel's 4 q / (1 + q)^2 the true ~1e-16
        scale = b.abs().reshape(b.shape[0], -1).amax(-1).clamp_min(1.0)
        err = (a - b).abs().reshape(b.shape[0], -1).amax(-1) / scale
        assert (err <= 1e-13).all(), err
    z = z0.clone()
    z[4, 5] = math.nan
    params = params0.clone()
    params[5, 2 * 7] = math.nan  # a raw log-scale
    x, ld = native.native_affine_coupling(z, params, bound0, idx, empty, 4, inverse, None)
    assert torch.isnan(x[4, 5]) and torch.isnan(x[5, 3 + 7]) and torch.isnan(ld[5])
    assert torch.isfinite(x[[0, 1, 2, 3, 6, 7, 8]]).all() and torch.isfinite(ld[:5]).all()


def test_affine_coupling_second_derivatives_equal_pytorch():
    layer = _layer(5, [1, 3, 4], [2, 4], 3, seed=4)
    z0 = torch.rand(6, 5, dtype=torch.float64) * 4 - 2
    out = []
    for flag in (False, True):
        native.use_native(flag)
        z = z0.clone().requires_grad_()
        x, ld = layer(z)
        (g,) = torch.autograd.grad((x.sin()).sum() + ld.sum(), z, create_graph=True)
        (h,) = torch.autograd.grad(g.square().sum(), z)
        out.append((g.detach(), h))
    for a, b in zip(*out):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, float(b.abs().max()))


def test_threads_give_the_same_results():
    """Rows split over threads (torch.get_num_threads() > 1): the same values and gradients
    as one thread (the scale-bound gradient sums per thread: equal to rounding)."""
    layer = _layer(6, [0, 2, 3], [1, 3], 4, seed=5)
    z0 = torch.rand(3000, 6, dtype=torch.float64) * 5 - 2.5
    x, p = _inputs("bounded", 4, n=1500, f=4)
    before = torch.get_num_threads()
    out = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            assert native._threads(3000, 3000 * 3) == min(n, 3000 * 3 // 512)
            layer.zero_grad()
            z = z0.clone().requires_grad_()
            y, ld = layer.inverse(z)
            (y.sin().sum() + ld.sum()).backward()
            got = [y.detach(), ld.detach(), z.grad] + [q.grad.clone() for q in layer.parameters()]
            xs, ps = x.clone().requires_grad_(), p.clone().requires_grad_()
            yb, ldb = bounded_spline(xs, ps, BOUND, True)
            got += [yb.detach(), ldb.detach(), *torch.autograd.grad((yb + ldb).sum(), (xs, ps))]
            out.append(got)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*out):
        assert (a - b).abs().max() <= 1e-12 * max(1.0, float(b.abs().max()))
