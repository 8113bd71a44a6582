"""Tests of BoltzmannGenerator and the losses: densities, weights, shapes, errors."""

from __future__ import annotations

import math

import pytest
import torch

from bgflow_mini import BoltzmannGenerator, StandardNormal
from bgflow_mini.flows import coupling_flow
from bgflow_mini.losses import nll, reverse_kl
from bgflow_mini.reweighting import effective_sample_size


def gaussian_energy(sigma: float):
    def energy(x):
        return 0.5 * (x**2).sum(-1) / sigma**2

    return energy


def randomise(flow, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


@pytest.fixture(params=["rnvp", "nice"])
def bg(request):
    torch.manual_seed(0)
    flow = randomise(coupling_flow(3, 2, hidden=(16,), kind=request.param)).double()
    return BoltzmannGenerator(StandardNormal(3).double(), flow, gaussian_energy(1.5))


def test_sample_log_prob_consistent(bg):
    x, log_q = bg.sample(64, with_log_prob=True)
    assert x.shape == (64, 3) and log_q.shape == (64,)
    assert torch.allclose(bg.log_prob(x), log_q, atol=1e-10)


@pytest.mark.parametrize("kind", ["rnvp", "nice"])
def test_density_integrates_to_one(kind):
    # quadrature of q(x) = exp(log_prob(x)) on a fine 2-D grid
    torch.manual_seed(0)
    flow = randomise(coupling_flow(2, 2, hidden=(16,), kind=kind), scale=0.2).double()
    bg = BoltzmannGenerator(StandardNormal(2).double(), flow)
    g = torch.linspace(-12, 12, 1201, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    with torch.no_grad():
        q = bg.log_prob(torch.stack([xx.flatten(), yy.flatten()], -1)).exp()
    total = float(q.sum()) * float(g[1] - g[0]) ** 2
    assert total == pytest.approx(1.0, abs=2e-3)


def test_identity_flow_gives_exact_density_and_weights():
    bg = BoltzmannGenerator(
        StandardNormal(4).double(), coupling_flow(4, 1).double(), gaussian_energy(1.0)
    )
    x, log_q = bg.sample(100, with_log_prob=True)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    assert torch.allclose(log_q, ref, atol=1e-12)
    log_w = bg.log_weights(x, log_q)
    # target is exactly the model: log w = log Z = (d/2) log(2 pi), constant
    assert torch.allclose(log_w, torch.full_like(log_w, 2 * math.log(2 * math.pi)), atol=1e-10)
    assert effective_sample_size(log_w) == pytest.approx(1.0, abs=1e-12)


def test_losses_match_definitions(bg):
    torch.manual_seed(3)
    vals = reverse_kl(bg, 32, reduction="none")
    torch.manual_seed(3)
    x, log_q = bg.sample(32, with_log_prob=True)
    expected = 0.5 * (x**2).sum(-1) / 1.5**2 + log_q
    assert torch.allclose(vals, expected, atol=1e-10)
    torch.manual_seed(3)
    kl = float(reverse_kl(bg, 32).detach())
    assert kl == pytest.approx(float(expected.detach().mean()), abs=1e-10)
    assert torch.allclose(nll(bg, x, reduction="none"), -log_q, atol=1e-10)
    total = float(nll(bg, x, reduction="sum").detach())
    assert total == pytest.approx(float(-log_q.detach().sum()), abs=1e-8)
    with pytest.raises(ValueError, match="reduction"):
        nll(bg, x, reduction="avg")


def test_reverse_kl_gradient_reaches_flow(bg):
    loss = reverse_kl(bg, 16)
    loss.backward()
    grads = [p.grad for p in bg.flow.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_wrong_energy_shape_is_a_clear_error():
    bg = BoltzmannGenerator(StandardNormal(2), coupling_flow(2, 1), lambda x: x.sum())
    x = bg.sample(8)
    with pytest.raises(ValueError, match=r"expected reduced energies of shape \(8,\)"):
        bg.log_weights(x)


def test_bad_inputs():
    bg = BoltzmannGenerator(StandardNormal(2), coupling_flow(2, 1), gaussian_energy(1.0))
    with pytest.raises(ValueError):
        bg.log_prob(torch.zeros(5))
    with pytest.raises(ValueError):
        bg.log_prob(torch.zeros(5, 3))
    with pytest.raises(ValueError):
        bg.sample(0)
    with pytest.raises(TypeError):
        BoltzmannGenerator(StandardNormal(2), torch.nn.Identity())
    with pytest.raises(RuntimeError, match="no energy"):
        BoltzmannGenerator(StandardNormal(2), coupling_flow(2, 1)).log_weights(torch.zeros(3, 2))


def test_energy_is_not_part_of_the_model_state_but_follows_dtype():
    from bgflow_mini.energies import DoubleWell, LinLogCut

    class Buffered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k", torch.ones(1))

        def forward(self, x):
            return self.k * (x**2).sum(-1)

    energy = Buffered()
    bg = BoltzmannGenerator(StandardNormal(2), coupling_flow(2, 1), energy)
    assert not any(k.startswith("energy") for k in bg.state_dict())
    bg.double()
    assert energy.k.dtype == torch.float64  # .double() reached the energy
    x = bg.sample(5)
    assert bg.log_weights(x).dtype == torch.float64
    # a checkpoint made with one energy loads into a generator with another
    other = BoltzmannGenerator(StandardNormal(2), coupling_flow(2, 1), LinLogCut(DoubleWell()))
    other.double().load_state_dict(bg.state_dict())
    with pytest.raises(TypeError, match="callable"):
        bg.energy = 3.0


def test_log_prob_of_tempered_samples_is_the_tempered_density():
    bg = BoltzmannGenerator(StandardNormal(3).double(), coupling_flow(3, 1).double())
    x, log_q = bg.sample(50, temperature=2.0, with_log_prob=True)
    ref = torch.distributions.Normal(0.0, math.sqrt(2.0)).log_prob(x).sum(-1)
    assert torch.allclose(log_q, ref, atol=1e-12)
