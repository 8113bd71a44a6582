"""Bounded bonds and angles: DomainMap is exact, and a bounded IC flow never leaves the domain."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import bgflow_mini as bg
from bgflow_mini.coordinates.domain import DomainMap, SoftBox
from bgflow_mini.flows import coupling_flow
from bgflow_mini.run_evaluation import ic_domain_stats
from bgflow_mini.units import wrap_angle

BONDS = torch.tensor([True, True, False, False, False, False])
ANGLES = torch.tensor([False, False, True, True, False, False])


def _check_exact(layer, z, x, ld) -> None:
    """``layer(z) = (x, ld)`` inverts back to ``z`` and ``ld`` is autograd's log|det J|."""
    z2, ld_inv = layer.inverse(x)
    torch.testing.assert_close(z2, z)
    torch.testing.assert_close(ld_inv, -ld)
    for zi, li in zip(z, ld, strict=True):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], zi)
        assert float(torch.linalg.slogdet(jac)[1]) == pytest.approx(float(li), abs=1e-10)


def test_domain_map_round_trip_and_logdet() -> None:
    layer = DomainMap(6, BONDS, ANGLES)
    z = 2.0 * torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x, ld = layer(z)
    assert (x[:, :2] > 0).all() and (x[:, 2:4] > 0).all() and (x[:, 2:4] < math.pi).all()
    torch.testing.assert_close(x[:, 4:], z[:, 4:])  # torsions pass through
    _check_exact(layer, z, x, ld)
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


def test_soft_box_round_trip_logdet_and_bound() -> None:
    g = torch.Generator().manual_seed(0)
    layer = SoftBox(5, [0, 2, 3], torch.tensor([1.0, 6.0, 2.5], dtype=torch.float64))
    z = 3.0 * torch.randn(6, 5, dtype=torch.float64, generator=g)
    x, ld = layer(z)
    torch.testing.assert_close(x[:, [1, 4]], z[:, [1, 4]])  # other features pass through
    _check_exact(layer, z, x, ld)
    big = torch.tensor([[1e3, 0.0, -1e3, 50.0, 1e6]], dtype=torch.float64, requires_grad=True)
    out, ld_big = layer(big)
    (out.sum() + ld_big.sum()).backward()
    assert torch.isfinite(big.grad).all() and torch.isfinite(ld_big).all()
    assert out[0, 0].abs() <= 1.0 and out[0, 2].abs() <= 6.0 and out[0, 3].abs() <= 2.5
    assert out[0, 4] == 1e6
    outside = torch.tensor([[1.5, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert not torch.isfinite(layer.inverse(outside)[0]).all()
    data = torch.tensor([[0.5, 9.0, -4.0, 1.0, 0.0], [-2.0, 0.0, 1.0, 0.2, 0.0]])
    fitted = SoftBox.from_data(data, [0, 2, 3])
    torch.testing.assert_close(fitted.half_width, torch.tensor([6.0, 6.0, 6.0]))
    wide = SoftBox.from_data(10 * data, [0, 2, 3])
    torch.testing.assert_close(wide.half_width, torch.tensor([30.0, 60.0, 15.0]))
    with pytest.raises(ValueError, match="positive"):
        SoftBox(5, [0], torch.tensor([0.0]))
    with pytest.raises(ValueError, match="distinct"):
        SoftBox(5, [0, 0], torch.ones(2))


@pytest.mark.parametrize("system", ["aldp_vacuum", "phe_dipeptide_vacuum"])
def test_boxed_generator_keeps_every_sample_near_the_data(system: str, tmp_path) -> None:
    """bounded_ics="box": far-out latents give bonds (ring bonds included) within the box,
    the data round-trip exactly, and the generator saves and loads."""
    target = bg.as_target(system)
    ref = torch.as_tensor(target.system.positions).reshape(1, -1)
    g = torch.Generator().manual_seed(0)
    data = ref + 0.003 * torch.randn(300, ref.shape[1], dtype=torch.float64, generator=g)
    flow = functools.partial(coupling_flow, n_blocks=2, hidden=[16])
    gens = {b: target.generator(data, flow, bounded_ics=b).double() for b in (True, "box")}
    z = 1e3 * torch.randn(256, gens["box"].dim, dtype=torch.float64, generator=g)
    top = target.system.mdtraj_topology
    pairs = torch.tensor([[b[0].index, b[1].index] for b in top.bonds])
    xyz_data = data.reshape(len(data), -1, 3)
    ref_len = (xyz_data[:, pairs[:, 0]] - xyz_data[:, pairs[:, 1]]).norm(dim=-1)
    spread = {}
    for bounded, gen in gens.items():
        with torch.no_grad():
            zr, _ = gen.flow.inverse(data[:5])
            z2, _ = gen.flow.inverse(gen.flow(zr)[0])
            x, _ = gen.flow(z)
        diff = torch.where(gen.prior.circular, wrap_angle(z2 - zr), z2 - zr).abs().max()
        assert float(diff) < 1e-9
        xyz = x.reshape(len(x), -1, 3)
        length = (xyz[:, pairs[:, 0]] - xyz[:, pairs[:, 1]]).norm(dim=-1)
        spread[bounded] = float(((length - ref_len.mean(0)).abs() / ref_len.std(0)).max())
    # every bond of every far-out sample within the box (1.5 x the data's largest
    # standardised value, at least 6 standard deviations; a ring bond mixes several
    # whitened features, each at the box's edge for such latents, so it reaches ~20);
    # without the box, bonds overflow
    assert spread["box"] < 25.0 and not spread[True] < 25.0, spread
    path = bg.save_generator(gens["box"], tmp_path / "model.pt")
    again = bg.load_generator(path)
    assert again.spec["bounded_ics"] == "box"
    with torch.no_grad():
        assert torch.equal(again.log_prob(data[:5]), gens["box"].log_prob(data[:5]))
    with pytest.raises(ValueError, match="bounded must be"):
        target.generator(data, flow, bounded_ics="yes")
