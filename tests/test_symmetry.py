"""Tests of the symmetrised generator: exact mixture density, sampling, flips, checkpoints."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from bgflow_mini import BoltzmannGenerator, StandardNormal, load_generator, save_generator
from bgflow_mini.flows import coupling_flow
from bgflow_mini.symmetry import (
    SymmetrizedGenerator,
    flip_permutations,
    group_elements,
    symmetrize,
)
from bgflow_mini.targets import as_target

DT = torch.float64


def _toy(n_atoms: int = 2, seed: int = 0) -> BoltzmannGenerator:
    """A perturbed RNVP on 3 n_atoms features: an asymmetric density on 'positions'."""
    torch.manual_seed(seed)
    flow = coupling_flow(3 * n_atoms, 2, hidden=(16,), kind="rnvp").to(DT)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return BoltzmannGenerator(StandardNormal(3 * n_atoms).to(DT), flow)


def test_group_elements_are_products_of_flips():
    flips = [[1, 0, 2, 3], [0, 1, 3, 2]]
    g = group_elements(flips, 4)
    assert g.shape == (4, 12)
    assert torch.equal(g[0], torch.arange(12))  # identity first
    x = torch.arange(12.0)[None]
    moved = {
        tuple(x[0, row].view(4, 3)[:, 0].long().div(3, rounding_mode="floor").tolist()) for row in g
    }
    assert moved == {(0, 1, 2, 3), (1, 0, 2, 3), (0, 1, 3, 2), (1, 0, 3, 2)}


def test_mixture_density_is_the_mean_over_flips_and_invariant():
    """q_G(x) = (q(x) + q(Px)) / 2 exactly and q_G(Px) = q_G(x) for 2 'atoms' swapped (a
    mean of normalised densities, each a permutation of q with |det| = 1: normalised)."""
    base = _toy()
    sym = SymmetrizedGenerator(base, [[1, 0]])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g, dtype=DT)
    px = x[:, [3, 4, 5, 0, 1, 2]]
    with torch.no_grad():
        want = torch.logaddexp(base.log_prob(x), base.log_prob(px)) - math.log(2)
        torch.testing.assert_close(sym.log_prob(x), want, atol=1e-12, rtol=0)
        torch.testing.assert_close(sym.log_prob(px), sym.log_prob(x), atol=1e-12, rtol=0)
        assert (base.log_prob(x) - base.log_prob(px)).abs().max() > 0.1  # base asymmetric


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_sample_flips_half_the_base_samples_and_returns_the_mixture_density(temperature):
    base = _toy()
    sym = SymmetrizedGenerator(base, [[1, 0]])
    n = 4000
    with torch.no_grad():
        torch.manual_seed(3)
        x0 = base.sample(n, temperature=temperature)  # the draws sym.sample flips
        torch.manual_seed(3)
        x, lq = sym.sample(n, temperature=temperature, with_log_prob=True)
        flipped = (x != x0).any(dim=1)
        assert torch.equal(x[flipped], x0[flipped][:, [3, 4, 5, 0, 1, 2]])
        assert torch.equal(x[~flipped], x0[~flipped])
        assert abs(float(flipped.double().mean()) - 0.5) < 4 * math.sqrt(0.25 / n)
        if temperature == 1.0:  # the tempered mixture's density is not log_prob's
            torch.testing.assert_close(lq, sym.log_prob(x), atol=1e-9, rtol=0)
        else:
            xt = x[:, [3, 4, 5, 0, 1, 2]]
            lq_t = torch.logaddexp(
                base.prior.log_prob(base.flow.inverse(x)[0], temperature=temperature)
                + base.flow.inverse(x)[1],
                base.prior.log_prob(base.flow.inverse(xt)[0], temperature=temperature)
                + base.flow.inverse(xt)[1],
            ) - math.log(2)
            torch.testing.assert_close(lq, lq_t, atol=1e-9, rtol=0)


def test_sample_distribution_is_the_mixture():
    """Unweighted ESS of q_G's own samples against log q_G is 1; against the base log q it
    is below 1 when the base is asymmetric (the samples are not the base's)."""
    from bgflow_mini.reweighting import effective_sample_size

    base = _toy()
    sym = SymmetrizedGenerator(base, [[1, 0]])
    torch.manual_seed(4)
    with torch.no_grad():
        x, lq = sym.sample(20_000, with_log_prob=True)
        # importance weights q_G / q_G = 1; q_G / q_base on q_G samples: the mismatch shows
        assert effective_sample_size(lq - sym.log_prob(x)) > 0.999
        assert effective_sample_size(base.log_prob(x) - lq) < 0.98


def test_gradients_reach_the_flow():
    base = _toy()
    sym = SymmetrizedGenerator(base, [[1, 0]])
    x, lq = sym.sample(32, with_log_prob=True)
    (lq.sum() + sym.log_prob(x.detach()).sum()).backward()
    grads = [p.grad for p in base.flow.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_bad_flips():
    base = _toy(n_atoms=3)
    with pytest.raises(ValueError, match="at least one"):
        SymmetrizedGenerator(base, [])
    with pytest.raises(ValueError, match="permutation"):
        SymmetrizedGenerator(base, [[0, 0, 1]])
    with pytest.raises(ValueError, match="involution"):
        SymmetrizedGenerator(base, [[1, 2, 0]])
    with pytest.raises(ValueError, match="commute"):
        SymmetrizedGenerator(base, [[1, 0, 2], [0, 2, 1]])
    sym = SymmetrizedGenerator(base, [[1, 0, 2]])
    with pytest.raises(ValueError, match="3 per atom"):
        sym.log_prob(torch.zeros(2, 6, dtype=DT))


def test_flip_permutations_of_shipped_systems():
    phe = as_target("phe_dipeptide_vacuum").system.mdtraj_topology
    (perm,) = flip_permutations(phe)
    names = {
        phe.atom(i).name: phe.atom(int(perm[i])).name
        for i in np.flatnonzero(perm != np.arange(len(perm)))
    }
    assert names == {
        "CD1": "CD2",
        "CD2": "CD1",
        "CE1": "CE2",
        "CE2": "CE1",
        "HD1": "HD2",
        "HD2": "HD1",
        "HE1": "HE2",
        "HE2": "HE1",
    }
    assert flip_permutations(as_target("aldp_vacuum").system.mdtraj_topology) == []
    assert flip_permutations(as_target("his_dipeptide_vacuum").system.mdtraj_topology) == []


def test_ring_flip_nearly_keeps_the_energy():
    """amber99sbildn treats the flipped ring atoms alike: u(Px) = u(x) up to the improper
    torsions, whose atom order OpenMM fixes by index (measured: < 0.1 kT on Phe samples)."""
    target = as_target("phe_dipeptide_vacuum")
    (perm,) = flip_permutations(target.system.mdtraj_topology)
    x = torch.as_tensor(target.system.positions, dtype=DT).reshape(1, -1)
    x = x + 0.003 * torch.randn(
        16, x.shape[1], generator=torch.Generator().manual_seed(0), dtype=DT
    )
    idx = group_elements([perm], len(perm))[1]
    from bgflow_mini.energies import TorchForceField

    ff = TorchForceField.from_openmm(target.system).double()
    with torch.no_grad():
        du = (ff(x[:, idx]) - ff(x)).abs()
    assert du.max() < 0.2


def test_symmetrized_checkpoint_round_trip(tmp_path):
    target = as_target("phe_dipeptide_vacuum")
    ref = torch.as_tensor(target.system.positions, dtype=DT).reshape(1, -1)
    data = ref + 0.002 * torch.randn(
        128, ref.shape[1], generator=torch.Generator().manual_seed(0), dtype=DT
    )
    flow = functools.partial(coupling_flow, kind="rnvp", n_blocks=1, hidden=[8], n_bins=4)
    torch.manual_seed(0)
    gen = symmetrize(target.generator(data, flow), target.system.mdtraj_topology).double()
    assert isinstance(gen, SymmetrizedGenerator) and gen.n_elements == 2
    with torch.no_grad():
        for p in gen.flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # the molecular flow (ring atoms in their Cartesian frame): sample's density = log_prob's
    with torch.no_grad():
        xs, lq = gen.sample(64, with_log_prob=True)
        torch.testing.assert_close(lq, gen.log_prob(xs), atol=1e-6, rtol=0)
    save_generator(gen, tmp_path / "model.pt")
    loaded = load_generator(tmp_path / "model.pt", target=target)
    assert isinstance(loaded, SymmetrizedGenerator)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.log_prob(data[:20]), gen.log_prob(data[:20]), atol=1e-9, rtol=0
        )


def _arg_fragment(swap_bond: bool = False):
    """The guanidinium end of an ARG residue as an mdtraj topology."""
    import mdtraj as mdt

    top = mdt.Topology()
    res = top.add_residue("ARG", top.add_chain())
    el = mdt.element
    atoms = {
        name: top.add_atom(
            name,
            el.nitrogen if name.startswith("N") else el.carbon if name == "CZ" else el.hydrogen,
            res,
        )
        for name in ("NE", "CZ", "NH1", "NH2", "HH11", "HH12", "HH21", "HH22")
    }
    pairs = [
        ("NE", "CZ"),
        ("CZ", "NH1"),
        ("CZ", "NH2"),
        ("NH1", "HH11"),
        ("NH1", "HH12"),
        ("NH2", "HH21"),
        ("NH2", "HH22"),
    ]
    if swap_bond:  # a mislabelled hydrogen: HH12 on NH2 and HH21 on NH1
        pairs[4], pairs[5] = ("NH1", "HH21"), ("NH2", "HH12")
    for a, b in pairs:
        top.add_bond(atoms[a], atoms[b])
    return top


def test_flips_must_be_graph_automorphisms():
    (perm,) = flip_permutations(_arg_fragment())
    assert sorted(np.flatnonzero(perm != np.arange(8)).tolist()) == [2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="does not map its bonds onto bonds"):
        flip_permutations(_arg_fragment(swap_bond=True))


def test_flipped_copies_outside_the_domain_count_as_zero_density(monkeypatch):
    """A flipped copy the flow cannot invert (NaN, e.g. outside a SoftBox) adds no density:
    q_G = q / |G| there, finite, instead of a NaN weight."""
    base = _toy()
    sym = SymmetrizedGenerator(base, [[1, 0]])
    x = torch.randn(8, 6, dtype=DT)
    with torch.no_grad():
        want = base.log_prob(x) - math.log(2)
        inverse = base.flow.inverse

        def broken(v):  # rows past the first 8 are the flipped copies
            z, ld = inverse(v)
            return z, torch.where(torch.arange(len(v)) >= 8, torch.nan, ld)

        monkeypatch.setattr(base.flow, "inverse", broken)
        torch.testing.assert_close(sym.log_prob(x), want, atol=1e-12, rtol=0)
        torch.manual_seed(5)
        _, lq0 = base.sample(8, with_log_prob=True)
        monkeypatch.setattr(
            base.flow, "inverse", lambda v: (v, torch.full_like(v[:, 0], torch.nan))
        )
        torch.manual_seed(5)
        _, lq = sym.sample(8, with_log_prob=True)  # sample inverts only the flipped copies
        torch.testing.assert_close(lq, lq0 - math.log(2), atol=1e-12, rtol=0)
