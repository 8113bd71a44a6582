"""Bounded bonds and angles: DomainMap is exact, and a bounded IC flow never leaves the domain."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import bgflow_mini as bg
from bgflow_mini.coordinates.domain import DomainMap
from bgflow_mini.flows import coupling_flow
from bgflow_mini.pipeline import ic_domain_stats
from bgflow_mini.units import wrap_angle

BONDS = torch.tensor([True, True, False, False, False, False])
ANGLES = torch.tensor([False, False, True, True, False, False])


def test_domain_map_round_trip_and_logdet() -> None:
    layer = DomainMap(6, BONDS, ANGLES)
    z = 2.0 * torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x, ld = layer(z)
    assert (x[:, :2] > 0).all() and (x[:, 2:4] > 0).all() and (x[:, 2:4] < math.pi).all()
    torch.testing.assert_close(x[:, 4:], z[:, 4:])  # torsions pass through
    z2, ld_inv = layer.inverse(x)
    torch.testing.assert_close(z2, z)
    torch.testing.assert_close(ld_inv, -ld)
    for zi, li in zip(z, ld, strict=True):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], zi)
        assert float(torch.linalg.slogdet(jac)[1]) == pytest.approx(float(li), abs=1e-10)
    # far-out latents stay inside the domain, with finite gradients (float64)
    big = torch.tensor([[40.0, -40.0, 30.0, -30.0, 1.0, 2.0]], dtype=torch.float64)
    big.requires_grad_(True)
    out, ld_big = layer(big)
    (out.sum() + ld_big.sum()).backward()
    assert torch.isfinite(big.grad).all() and (out[0, :2] > 0).all()
    assert 0 < out[0, 3] < out[0, 2] < math.pi
    with pytest.raises(ValueError, match="both a bond and an angle"):
        DomainMap(6, BONDS, BONDS)


def test_bounded_molecular_generator_stays_in_the_domain(tmp_path) -> None:
    target = bg.as_target("aldp_vacuum")
    ref = torch.as_tensor(target.system.positions).reshape(1, -1)
    g = torch.Generator().manual_seed(0)
    data = ref + 0.003 * torch.randn(300, ref.shape[1], dtype=torch.float64, generator=g)
    flow = functools.partial(coupling_flow, n_blocks=2, hidden=[16])
    gens = {b: target.generator(data, flow, bounded_ics=b).double() for b in (False, True)}
    z = 30.0 * torch.randn(256, gens[True].dim, dtype=torch.float64, generator=g)
    for bounded, gen in gens.items():
        with torch.no_grad():  # exact round trip in latent space
            zr, _ = gen.flow.inverse(data[:5])
            z2, _ = gen.flow.inverse(gen.flow(zr)[0])
        diff = torch.where(gen.prior.circular, wrap_angle(z2 - zr), z2 - zr).abs().max()
        assert float(diff) < 1e-10
        ic_domain_stats(gen, reset=True)
        with torch.no_grad():
            gen.flow(z)  # far-out latents: only the bounded transform keeps the domain
        stats = ic_domain_stats(gen)
        assert (stats["out_of_domain"] == 0) == bounded and stats["evaluated"] == 256
    path = bg.save_generator(gens[True], tmp_path / "model.pt")
    again = bg.load_generator(path)
    assert again.spec["bounded_ics"] is True
    with torch.no_grad():
        assert torch.equal(again.log_prob(data[:5]), gens[True].log_prob(data[:5]))
