"""Tests of the base distributions against torch.distributions references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, Uniform

from bgflow_mini.distributions import DiagonalNormal, NormalUniform, StandardNormal

F64 = torch.float64
CIRC = [0, 3]


def _z(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.rand(n, dim, generator=g, dtype=F64) * math.pi - math.pi


@pytest.mark.parametrize("temperature", [1.0, 0.3, 2.5])
def test_standard_normal_log_prob(temperature):
    dist = StandardNormal(4).double()
    z = 1.7 * _z(10, 4)
    ref = Normal(torch.zeros((), dtype=F64), math.sqrt(temperature)).log_prob(z).sum(1)
    torch.testing.assert_close(dist.log_prob(z, temperature=temperature), ref, atol=1e-12, rtol=0)
    if temperature == 1.0:
        torch.testing.assert_close(dist.log_prob(z), ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(dist(z), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("learnable", [False, True])
def test_diagonal_normal_log_prob(temperature, learnable):
    loc = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    scale = torch.tensor([0.3, 1.0, 2.5], dtype=F64)
    dist = DiagonalNormal(3, loc=loc, scale=scale, learnable=learnable).double()
    z = _z(12, 3, seed=1)
    ref = Normal(loc, scale * math.sqrt(temperature)).log_prob(z).sum(1)
    torch.testing.assert_close(dist.log_prob(z, temperature), ref, atol=1e-12, rtol=0)
    assert (len(list(dist.parameters())) == 2) is learnable
    if learnable:
        dist.log_prob(z).sum().backward()
        assert dist.loc.grad is not None and dist.log_scale.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_normal_uniform_log_prob(temperature):
    dist = NormalUniform(5, CIRC).double()
    z = _z(20, 5, seed=2)
    lin = [1, 2, 4]
    ref = Normal(torch.zeros((), dtype=F64), math.sqrt(temperature)).log_prob(z[:, lin]).sum(1)
    unif = Uniform(torch.tensor(-math.pi, dtype=F64), torch.tensor(math.pi, dtype=F64))
    ref = ref + unif.log_prob(z[:, CIRC]).sum(1)
    torch.testing.assert_close(dist.log_prob(z, temperature), ref, atol=1e-12, rtol=0)
    # outside [-pi, pi] on a circular feature: zero density; a non-circular one is fine
    z_out = z[:2].clone()
    z_out[0, 3] = 4.0
    z_out[1, 1] = 4.0
    lp = dist.log_prob(z_out)
    assert lp[0] == -math.inf and torch.isfinite(lp[1])


def test_normal_uniform_bool_mask_equals_indices():
    a = NormalUniform(5, CIRC)
    b = NormalUniform(5, [True, False, False, True, False])
    assert torch.equal(a.circular, b.circular)


@pytest.mark.parametrize(
    "make",
    [
        lambda: StandardNormal(5),
        lambda: DiagonalNormal(5, 1.0, 2.0),
        lambda: NormalUniform(5, CIRC),
    ],
)
def test_sample_shape_dtype_device(make):
    dist = make()
    x = dist.sample(7)
    assert x.shape == (7, 5) and x.dtype == torch.get_default_dtype() and dist.dim == 5
    assert dist.log_prob(x).shape == (7,)
    x64 = dist.double().sample(3)
    assert x64.dtype == F64 and dist.log_prob(x64).dtype == F64
    assert dist.sample(0).shape == (0, 5)
    meta = dist.to("meta")  # follows the buffers' device without needing a GPU
    xm = meta.sample(4)
    assert xm.device.type == "meta" and xm.shape == (4, 5) and xm.dtype == F64
    if torch.cuda.is_available():
        xc = make().cuda().sample(2)
        assert xc.device.type == "cuda"


def test_sampling_uses_global_rng():
    dist = NormalUniform(4, [1])
    torch.manual_seed(123)
    a = dist.sample(5)
    torch.manual_seed(123)
    b = dist.sample(5)
    assert torch.equal(a, b)
    assert not torch.equal(a, dist.sample(5))


@pytest.mark.parametrize("temperature", [0.25, 1.0, 4.0])
def test_temperature_scales_std(temperature):
    """Empirical std over N = 1e5 draws: relative standard error 1/sqrt(2N) ~ 2.2e-3,
    so a 1.5 % tolerance is ~7 standard errors (the seed is fixed anyway)."""
    torch.manual_seed(0)
    n = 20000
    sd = math.sqrt(temperature)
    x = StandardNormal(5).double().sample(n, temperature=temperature)
    assert abs(x.std().item() / sd - 1) < 0.015
    assert abs(x.mean().item()) < 5 * sd / math.sqrt(5 * n)
    dn = DiagonalNormal(2, loc=[3.0, -1.0], scale=[0.5, 2.0]).double()
    y = dn.sample(50000, temperature=temperature)
    torch.testing.assert_close(
        y.std(0), torch.tensor([0.5, 2.0], dtype=F64) * sd, rtol=0.015, atol=0
    )
    torch.testing.assert_close(
        y.mean(0),
        torch.tensor([3.0, -1.0], dtype=F64),
        rtol=0,
        atol=5 * 2.0 * sd / math.sqrt(50000),
    )
    # NormalUniform: Gaussian part scales, uniform part (std pi / sqrt 3) does not
    nu = NormalUniform(5, CIRC).double().sample(n, temperature=temperature)
    assert abs(nu[:, [1, 2, 4]].std().item() / sd - 1) < 0.015
    assert abs(nu[:, CIRC].std().item() / (math.pi / math.sqrt(3)) - 1) < 0.015


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_normal_uniform_circular_samples_in_range(dtype):
    torch.manual_seed(1)
    x = NormalUniform(3, [0, 2]).to(dtype).sample(100000)
    ang = x[:, [0, 2]]
    assert (ang >= -math.pi).all() and (ang < math.pi).all()
    assert ang.min() < -math.pi + 1e-3 and ang.max() > math.pi - 1e-3  # covers the range
    assert (x[:, 1].abs() > math.pi).any()  # the Gaussian feature is not wrapped


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim"):
        StandardNormal(0)
    with pytest.raises(ValueError, match="scale must be positive"):
        DiagonalNormal(2, scale=[1.0, 0.0])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        DiagonalNormal(3, loc=[1.0, 2.0])
    with pytest.raises(ValueError, match="circular indices"):
        NormalUniform(3, [3])
    dist = NormalUniform(3, [1])
    with pytest.raises(ValueError, match="temperature"):
        dist.sample(2, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        dist.log_prob(torch.zeros(2, 3), temperature=-1.0)
    with pytest.raises(ValueError, match="number of samples"):
        dist.sample(-1)
    with pytest.raises(ValueError, match="expected dim=3"):
        dist.log_prob(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="shape"):
        StandardNormal(3).log_prob(torch.zeros(3))
