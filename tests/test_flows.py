"""Tests of the flow layers: invertibility, exact log-dets, identity at init, circular features."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bgflow_mini.flows import (
    MLP,
    AdditiveCoupling,
    AffineCoupling,
    Flow,
    Inverse,
    Permutation,
    Scaling,
    Sequential,
    SplineCoupling,
    circular_spline,
    coupling_flow,
    n_circular_spline_params,
)
from bgflow_mini.units import wrap_angle

DIM = 6
CIRC = [1, 2, 4]  # circular features: 1, 2 are conditioning and 4 transformed for the half mask
HALF = torch.arange(DIM) >= DIM // 2  # transform features 3, 4, 5
HIDDEN = (16, 16)

FACTORIES = {
    "affine": lambda: AffineCoupling(DIM, HALF, hidden=HIDDEN),
    "affine_circ": lambda: AffineCoupling(DIM, HALF, hidden=HIDDEN, circular=CIRC, n_bins=5),
    "additive": lambda: AdditiveCoupling(DIM, HALF, hidden=HIDDEN),
    "additive_circ": lambda: AdditiveCoupling(DIM, HALF, hidden=HIDDEN, circular=CIRC),
    "permutation": lambda: Permutation.random(DIM, seed=3),
    "inverse_affine_circ": lambda: Inverse(
        AffineCoupling(DIM, ~HALF, hidden=HIDDEN, circular=CIRC)
    ),
    "rnvp_stack": lambda: coupling_flow(DIM, 2, hidden=HIDDEN, kind="rnvp", circular=CIRC),
    "nice_stack": lambda: coupling_flow(DIM, 2, hidden=HIDDEN, kind="nice", circular=CIRC),
    "rnvp_stack_plain": lambda: coupling_flow(DIM, 2, hidden=HIDDEN, kind="rnvp"),
    "scaling_circ": lambda: Scaling(DIM, circular=CIRC),
    "spline": lambda: SplineCoupling(DIM, HALF, hidden=HIDDEN, n_bins=4, tail_bound=2.0),
    "spline_circ": lambda: SplineCoupling(DIM, HALF, hidden=HIDDEN, circular=CIRC, n_bins=3),
    "spline_stack": lambda: coupling_flow(DIM, 2, hidden=HIDDEN, kind="spline", circular=CIRC),
    "nice_stack_unscaled": lambda: coupling_flow(
        DIM, 2, hidden=HIDDEN, kind="nice", circular=CIRC, scale=False
    ),
    # mask_seed 1: masks unlike the alternating ones and, under make()'s perturbation, as
    # well conditioned as the other stacks (some seeds contract to log-dets of -25, where
    # float32 round trips lose 1e-3: conditioning, as in make()'s docstring)
    "rnvp_stack_random_masks": lambda: coupling_flow(
        DIM, 2, hidden=HIDDEN, kind="rnvp", circular=CIRC, masks="random", mask_seed=1
    ),
}
NAMES = list(FACTORIES)
HAS_CIRC = {
    n: n.endswith("circ")
    or n in ("rnvp_stack", "nice_stack", "nice_stack_unscaled", "spline_stack")
    or n.endswith("random_masks")
    for n in NAMES
}


def make(name: str, dtype: torch.dtype = torch.float64, perturb: float = 0.25) -> Flow:
    """Build a flow and (if perturb > 0) randomise all its parameters, incl. zero last layers.

    The default 0.25 gives log-dets of order 1-5 per layer. Much larger values make
    deep circular stacks so contracting (log-dets below -40) that round-trip errors
    of 1e-16 get amplified past 1e-6: ill-conditioning, not a bug (each layer still
    round-trips to ~1e-10, see test_circular_spline_derivative_and_inverse).
    """
    torch.manual_seed(0)
    flow = FACTORIES[name]().to(dtype)
    if perturb > 0:
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(perturb * torch.randn_like(p))
    return flow


def sample(n: int, circ: bool, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    """Inputs: Gaussian (std 1.5) features, uniform [-pi, pi) on the circular ones if circ."""
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(n, DIM, generator=g, dtype=dtype)
    if circ:
        x[:, CIRC] = (torch.rand(n, len(CIRC), generator=g, dtype=dtype) * 2 - 1) * math.pi
    return x


def jacobian_logdets(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| per sample via autograd, shape (batch,)."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: fn(v[None])[0][0], xi)
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def circ_diff(a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
    """Elementwise difference, measured on the circle for circular features."""
    d = a - b
    if HAS_CIRC[name]:
        d[:, CIRC] = wrap_angle(d[:, CIRC])
    return d.abs()


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_float64(name):
    flow = make(name)
    z = sample(64, HAS_CIRC[name])
    x, ld = flow(z)
    assert x.shape == z.shape and ld.shape == (64,)
    assert (x - z).abs().max() > 1e-2  # the perturbed flow is not the identity
    z2, ld_inv = flow.inverse(x)
    assert circ_diff(z2, z, name).max() < 1e-10
    assert (ld + ld_inv).abs().max() < 1e-10
    xd = sample(64, HAS_CIRC[name], seed=2)
    zd, ld_d = flow.inverse(xd)
    x2, ld_f = flow(zd)
    assert circ_diff(x2, xd, name).max() < 1e-10
    assert (ld_d + ld_f).abs().max() < 1e-10


@pytest.mark.parametrize("name", NAMES)
def test_logdet_matches_jacobian(name):
    flow = make(name)
    z = sample(3, HAS_CIRC[name], seed=4)
    _, ld = flow(z)
    torch.testing.assert_close(ld, jacobian_logdets(flow, z), atol=1e-10, rtol=0)
    x = sample(3, HAS_CIRC[name], seed=5)
    _, ld_inv = flow.inverse(x)
    torch.testing.assert_close(ld_inv, jacobian_logdets(flow.inverse, x), atol=1e-10, rtol=0)
    if name != "permutation":
        assert ld.abs().max() > 1e-3 or name.startswith(("additive", "nice"))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "permutation"])
def test_fresh_flow_is_identity(name):
    flow = make(name, perturb=0.0)
    z = sample(32, HAS_CIRC[name])
    x, ld = flow(z)
    z2, ld_inv = flow.inverse(z)
    if "spline" in name or (HAS_CIRC[name] and ("affine" in name or "rnvp" in name)):
        # splines with uniform bins/unit slopes: identity up to rounding
        tol = 1e-14
    else:
        tol = 0.0  # bit-exact
    assert (x - z).abs().max() <= tol and (z2 - z).abs().max() <= tol
    assert ld.abs().max() <= tol and ld_inv.abs().max() <= tol


@pytest.mark.parametrize("name", NAMES)
def test_float32_matches_float64(name):
    """float32 tolerance: 3e-4 absolute on outputs, log-dets and round trips.

    float32 eps (1.2e-7) times |values| ~ 1-10, amplified by the conditioning of the
    perturbed maps (inverse spline where f' is small): measured max over 512 samples
    7e-5 (log-det of Inverse(circular affine)), 6.5e-5 (round trip of rnvp stack).
    """
    f64 = make(name)
    f32 = make(name).float()
    z = sample(64, HAS_CIRC[name])
    x64, ld64 = f64(z)
    x32, ld32 = f32(z.float())
    assert x32.dtype == torch.float32 and ld32.dtype == torch.float32
    assert circ_diff(x32.double(), x64, name).max() < 3e-4
    assert (ld32.double() - ld64).abs().max() < 3e-4
    z2, ld_inv = f32.inverse(x32)
    assert circ_diff(z2.double(), z, name).max() < 3e-4
    assert (ld32 + ld_inv).abs().max() < 3e-4


@pytest.mark.parametrize("name", [n for n in NAMES if HAS_CIRC[n]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_circular_outputs_in_range(name, dtype):
    flow = make(name, dtype=dtype, perturb=1.0)
    z = sample(256, True, dtype=dtype, seed=7)
    below_pi = torch.nextafter(torch.tensor(math.pi, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    edges = torch.tensor([-math.pi, below_pi, -math.pi + 1e-7, math.pi - 1e-7], dtype=dtype)
    z[: edges.numel(), CIRC] = edges[:, None]  # at and next to the cut
    with torch.no_grad():
        x, _ = flow(z)
        zz, _ = flow.inverse(z)
    for out in (x, zz):
        ang = out[:, CIRC]
        assert torch.isfinite(out).all()
        assert (ang >= -math.pi).all() and (ang < math.pi).all()


@pytest.mark.parametrize("name", ["affine_circ", "additive_circ"])
def test_transformed_angles_are_wrapped(name):
    """Out-of-range transformed angles (e.g. exactly +pi) are taken modulo 2 pi."""
    flow = make(name)
    z = sample(8, True)
    z[:4, 4] = math.pi
    z[4:, 4] = z[4:, 4] + 6 * math.pi
    x, ld = flow(z)
    zw = z.clone()
    zw[:, 4] = wrap_angle(z[:, 4])
    xw, ldw = flow(zw)
    assert (x[:, 4] >= -math.pi).all() and (x[:, 4] < math.pi).all()
    torch.testing.assert_close(x, xw, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld, ldw, atol=1e-12, rtol=0)


def test_wrap_angle():
    x = torch.tensor(
        [-math.pi, 0.3, math.pi, 3 * math.pi + 0.1, -7.0, -1e-300], dtype=torch.float64
    )
    y = wrap_angle(x)
    assert (y >= -math.pi).all() and (y < math.pi).all()
    assert y[0] == -math.pi and y[1] == 0.3 and y[2] == -math.pi and y[5] == -1e-300
    torch.testing.assert_close(torch.cos(y), torch.cos(x))
    torch.testing.assert_close(torch.sin(y), torch.sin(x))


def _spline_params(n: int, k: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, n_circular_spline_params(k), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_circular_spline_derivative_and_inverse(k):
    p = _spline_params(200, k, 1.5, seed=k)
    x = (torch.rand(200, dtype=torch.float64) * 2 - 1) * math.pi
    x.requires_grad_(True)
    y, ld = circular_spline(x, p)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(ld, torch.log(grad), atol=1e-10, rtol=0)
    x2, ld_inv = circular_spline(y.detach(), p, inverse=True)
    assert wrap_angle(x2 - x.detach()).abs().max() < 1e-10
    assert (ld + ld_inv).abs().max() < 1e-10
    # the map is a circle diffeomorphism: monotone increasing winding by exactly 2 pi
    grid = torch.linspace(-math.pi, math.pi, 2001, dtype=torch.float64)[:-1]
    q = p[:1].expand(grid.numel(), -1)
    yg, _ = circular_spline(grid, q)
    steps = wrap_angle(torch.diff(torch.cat([yg, yg[:1]])))
    assert (steps > 0).all()
    torch.testing.assert_close(steps.sum(), torch.tensor(2 * math.pi, dtype=torch.float64))


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_circular_spline_parameter_gradients(k, inverse):
    """The spline's analytic backward (knots, derivatives) against finite differences, for
    values in every bin, the first and last (next to the cut) included."""
    n = 24
    p = _spline_params(n, k, 1.0, seed=10 + k).requires_grad_(True)
    g = torch.Generator().manual_seed(k)
    x = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    x[:4] = torch.tensor([-math.pi + 1e-3, math.pi - 1e-3, -3.0, 3.0], dtype=torch.float64)
    x.requires_grad_(True)

    def f(x, p):
        y, ld = circular_spline(x, p, inverse=inverse)
        return torch.sin(y), ld  # sin: smooth across the wrap of the output

    assert torch.autograd.gradcheck(f, (x, p), eps=1e-7, atol=1e-6, rtol=1e-5)


def _cut_gap(fn, eps: float) -> torch.Tensor:
    """|log f'(-pi + eps) - log f'(pi - eps)| per sample, f = fn(angles) -> (y, logdet)."""
    lo, hi = fn(-math.pi + eps), fn(math.pi - eps)
    return (lo[1] - hi[1]).abs()


def test_circular_spline_continuous_across_cut():
    """log f' just above -pi and just below +pi agree, with a gap that shrinks ~ eps.

    A jump in the density would leave a gap independent of eps. With a continuous
    derivative the gap is ~ 2 eps |f''/f'|; narrow bins (2 pi 2**-10 wide) can make
    |f''/f'| ~ 1e4, hence the convergence check instead of a fixed eps.
    """
    p = _spline_params(50, 6, 2.0, seed=11)

    def fwd(a: float, inverse: bool = False):
        return circular_spline(torch.full((50,), a, dtype=torch.float64), p, inverse=inverse)

    for inverse in (False, True):
        g8 = _cut_gap(lambda a, inv=inverse: fwd(a, inv), 1e-8)
        g10 = _cut_gap(lambda a, inv=inverse: fwd(a, inv), 1e-10)
        assert g10.max() < 1e-4
        assert (g10 <= 0.02 * g8 + 1e-11).all()  # linear convergence: ratio ~ 0.01
    ld = fwd(-math.pi + 1e-10)[1]
    assert ld.abs().max() > 0.1  # non-trivial derivatives at the cut
    # values: the two points 2 eps apart straddling the cut stay ~2 eps f' apart
    eps = 1e-9
    gap = wrap_angle(fwd(-math.pi + eps)[0] - fwd(math.pi - eps)[0])
    assert (gap > 0).all() and (gap < 2 * eps * ld.exp() * 1.01).all()


def test_coupling_density_continuous_across_cut():
    """The full layer's logdet as a transformed angle crosses +-pi (same criterion)."""
    flow = make("affine_circ", perturb=1.0)
    z = sample(20, True, seed=3)

    def fn(a: float):
        zz = z.clone()
        zz[:, 4] = a
        return flow(zz)

    with torch.no_grad():
        g8, g10 = _cut_gap(fn, 1e-8), _cut_gap(fn, 1e-10)
    assert g10.max() < 1e-4
    assert (g10 <= 0.02 * g8 + 1e-11).all()


@pytest.mark.parametrize("cls", [AffineCoupling, AdditiveCoupling, SplineCoupling])
def test_conditioner_periodic_in_circular_inputs(cls):
    flow = cls(DIM, HALF, hidden=HIDDEN, circular=CIRC).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    z = sample(16, True)
    shifted = z.clone()
    shifted[:, 1] += 2 * math.pi
    shifted[:, 2] -= 4 * math.pi
    x, ld = flow(z)
    xs, lds = flow(shifted)
    torch.testing.assert_close(xs[:, HALF], x[:, HALF], atol=1e-12, rtol=0)
    torch.testing.assert_close(lds, ld, atol=1e-12, rtol=0)
    torch.testing.assert_close(flow.conditioner_input(shifted), flow.conditioner_input(z))
    # the conditioner sees (cos, sin): 1 linear + 2 angles * 2 inputs
    assert flow.conditioner.in_features == 5


def test_mlp():
    net = MLP(3, 4, hidden=(8,), activation=nn.Tanh).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(net(x), torch.zeros(5, 4, dtype=torch.float64))
    assert net.last.weight.abs().sum() == 0 and net.last.bias.abs().sum() == 0
    assert isinstance(net.net[1], nn.Tanh)
    with pytest.raises(ValueError, match="in_features"):
        MLP(0, 4)
    with pytest.raises(ValueError, match="hidden"):
        MLP(3, 4, hidden=(8, 0))
    with pytest.raises(ValueError, match="activation"):
        MLP(3, 4, activation="no_such_activation")
    with pytest.raises(ValueError, match="activation"):
        MLP(3, 4, activation=3)
    assert isinstance(MLP(3, 4, hidden=(8,), activation="ReLU").net[1], nn.ReLU)
    with pytest.raises(ValueError, match=r"\(batch, 3\)"):
        net(torch.randn(5, 2, dtype=torch.float64))


def test_coupling_flow_structure_and_seed():
    flow = coupling_flow(5, 3, hidden=(8,), kind="nice", seed=1)
    assert isinstance(flow, Sequential) and len(flow) == 7  # 6 couplings + the scaling
    for i in range(0, 6, 2):  # each block transforms every feature exactly once
        assert torch.equal(flow[i].mask ^ flow[i + 1].mask, torch.ones(5, dtype=torch.bool))
    assert not torch.equal(flow[0].mask, flow[2].mask)  # alternating patterns
    state = torch.get_rng_state()
    again = coupling_flow(5, 3, hidden=(8,), kind="nice", seed=1)
    assert isinstance(again[6], Scaling)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    for a, b in zip(flow.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    rnvp = coupling_flow(4, 1, kind="rnvp", circular=[True, False, False, True])
    assert all(isinstance(f, AffineCoupling) for f in rnvp.flows)
    assert all(f.circular.tolist() == [True, False, False, True] for f in rnvp.flows)


def test_random_masks_split_more_pairs_and_rebuild_from_the_seed():
    """``masks="random"``: a fixed function of ``mask_seed`` (global RNG untouched), every
    block transforms each feature once, and (unlike the alternating masks, where features 1
    and 3 of 8 are never on opposite sides) pairs of features meet across a coupling."""
    dim, blocks = 8, 6
    alt = coupling_flow(dim, blocks, hidden=(8,))
    split = lambda flow, i, j: [bool(f.mask[i] != f.mask[j]) for f in flow.flows]  # noqa: E731
    assert not any(split(alt, 1, 3))  # same half, same parity: never split
    state = torch.get_rng_state()
    a = coupling_flow(dim, blocks, hidden=(8,), masks="random", mask_seed=3, seed=0)
    b = coupling_flow(dim, blocks, hidden=(8,), masks="random", mask_seed=3, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    c = coupling_flow(dim, blocks, hidden=(8,), masks="random", mask_seed=4, seed=0)
    masks = lambda flow: torch.stack([f.mask for f in flow.flows])  # noqa: E731
    assert torch.equal(masks(a), masks(b)) and not torch.equal(masks(a), masks(c))
    m = masks(a)
    assert (m.sum(dim=1) == dim // 2).all()  # balanced halves
    assert torch.equal(m[0::2] ^ m[1::2], torch.ones(blocks, dim, dtype=torch.bool))
    assert any(split(a, 1, 3))
    pairs = [(i, j) for i in range(dim) for j in range(i + 1, dim)]
    n_split = lambda flow: sum(any(split(flow, i, j)) for i, j in pairs)  # noqa: E731
    assert n_split(alt) == 24 and n_split(a) > 24  # alternate: 4 of the 28 pairs never meet
    with pytest.raises(ValueError, match=r"masks must be one of \['alternate', 'random'\]"):
        coupling_flow(4, 2, masks="checkerboard")
    with pytest.raises(ValueError, match="mask_seed must be an int"):
        coupling_flow(4, 2, masks="random", mask_seed=1.5)


def test_permutation_constructors():
    z = torch.arange(5.0, dtype=torch.float64)[None].repeat(2, 1)
    assert Permutation.swap(5)(z)[0][0].tolist() == [2, 3, 4, 0, 1]
    assert Permutation.reverse(5)(z)[0][0].tolist() == [4, 3, 2, 1, 0]
    a, b = Permutation.random(5, seed=2), Permutation.random(5, seed=2)
    assert torch.equal(a.indices, b.indices)
    assert sorted(a.indices.tolist()) == list(range(5))
    x, ld = Permutation([1, 0, 2, 4, 3])(z)
    assert x[0].tolist() == [1, 0, 2, 4, 3] and torch.equal(ld, torch.zeros(2, dtype=z.dtype))


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim >= 2"):
        AffineCoupling(1, [True])
    with pytest.raises(ValueError, match="dim >= 2"):
        coupling_flow(1, 2)
    with pytest.raises(ValueError, match=r"\['rnvp', 'nice', 'spline'\]"):
        coupling_flow(4, 2, kind="glow")
    with pytest.raises(ValueError, match="n_bins"):
        coupling_flow(4, 2, kind="spline", n_bins=0)
    for bound in (0.0, float("inf"), True):
        with pytest.raises(ValueError, match="tail_bound"):
            SplineCoupling(4, [0, 1], tail_bound=bound)
    with pytest.raises(ValueError, match="one bin is the identity"):
        SplineCoupling(4, [0, 1], n_bins=1)
    with pytest.raises(ValueError, match="for kind='spline' only"):
        coupling_flow(4, 2, kind="rnvp", tail_bound=3.0)
    with pytest.raises(ValueError, match="n_blocks"):
        coupling_flow(4, 0)
    with pytest.raises(ValueError, match="some but not all"):
        AdditiveCoupling(3, [True, True, True])
    with pytest.raises(ValueError, match="length 2, expected dim=3"):
        AffineCoupling(3, [True, False])
    with pytest.raises(ValueError, match="circular indices"):
        AffineCoupling(3, [0], circular=[5])
    with pytest.raises(ValueError, match="n_bins"):
        AffineCoupling(3, [0], circular=[1], n_bins=0)
    with pytest.raises(ValueError, match="permutation of 0..2"):
        Permutation([0, 0, 1])


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name):
    flow = make(name)
    x, ld = flow(torch.zeros(0, DIM, dtype=torch.float64))
    z, ld_inv = flow.inverse(x)
    assert x.shape == z.shape == (0, DIM) and ld.shape == ld_inv.shape == (0,)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs(name):
    flow = make(name, perturb=0.0)
    with pytest.raises(ValueError, match="shape"):
        flow(torch.zeros(DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"expected dim={DIM}"):
        flow(torch.zeros(4, DIM + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"expected dim={DIM}"):
        flow.inverse(torch.zeros(4, DIM - 1, dtype=torch.float64))


def test_nice_ends_with_a_scaling_layer_that_frees_the_volume():
    nice = coupling_flow(DIM, 2, hidden=HIDDEN, kind="nice", circular=CIRC)
    assert isinstance(nice.flows[-1], Scaling) and len(nice.flows) == 5
    assert not isinstance(coupling_flow(DIM, 2, hidden=HIDDEN).flows[-1], Scaling)  # RNVP
    assert len(coupling_flow(DIM, 2, hidden=HIDDEN, kind="nice", scale=False).flows) == 4
    with torch.no_grad():
        nice.flows[-1].log_scale.fill_(0.5)
    z = sample(7, circ=True)
    x, logdet = nice.double()(z)
    # constant log-det: 0.5 per non-circular feature (3 of 6), none for the angles
    torch.testing.assert_close(logdet, torch.full((7,), 1.5, dtype=torch.float64))
    assert torch.all(x[:, CIRC].abs() <= math.pi)  # angles stay on the circle
