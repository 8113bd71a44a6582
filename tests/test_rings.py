"""Ring-safe internal coordinates: ring detection, Cartesian ring rows, whitening (float64)."""

from __future__ import annotations

from pathlib import Path

import mdtraj as md
import numpy as np
import pytest
import torch
from test_internal import _cart, _full_map_logdet, _md_frames

from bgflow_mini.coordinates import InternalCoordinates, build_zmatrix, ic_transform
from bgflow_mini.coordinates.normalization import angle_mask, bond_mask
from bgflow_mini.coordinates.rings import ring_systems, ring_zmatrix
from bgflow_mini.coordinates.whitening import Whiten, cartesian_blocks

PDB = Path(__file__).resolve().parent / "data" / "ace_phe_pro_nme.pdb"  # ACE-PHE-PRO-NME
DT = torch.float64


@pytest.fixture(scope="module")
def traj() -> md.Trajectory:
    return _md_frames(PDB, n_frames=300, stride=20)


def _names(top, atoms) -> set[str]:
    return {top.atom(i).name for i in atoms}


def _ring_bonds(top) -> list[tuple[int, int]]:
    rings = [set(g) for g in ring_systems(top)]
    return [
        (b[0].index, b[1].index)
        for b in top.bonds
        if any(b[0].index in g and b[1].index in g for g in rings)
    ]


def test_ring_systems_of_phe_and_pro() -> None:
    top = md.load(PDB).topology
    systems = ring_systems(top)
    assert [_names(top, g) for g in systems] == [
        {"CG", "CD1", "CD2", "CE1", "CE2", "CZ"},
        {"N", "CA", "CB", "CG", "CD"},
    ]
    assert ring_systems(np.array([[0, 1], [1, 2], [2, 3]])) == []
    # fused rings (naphthalene-like) form one system; a spiro link merges too
    fused = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 0], [3, 6], [6, 7], [7, 4]])
    assert ring_systems(fused) == [list(range(8))]
    # 1,000-atom chain with a ring every 10 atoms
    bonds = [[i, i + 1] for i in range(999)] + [[i, i + 4] for i in range(0, 996, 10)]
    assert len(ring_systems(np.array(bonds))) == 100


def test_macrocycles_are_not_rings() -> None:
    # a 20-membered loop (e.g. closed by a disulfide) with a 5-ring fused onto it
    loop = [[i, (i + 1) % 20] for i in range(20)]
    five = [[3, 20], [20, 21], [21, 22], [22, 4]]
    assert ring_systems(np.array(loop)) == []
    assert ring_systems(np.array(loop + five)) == [[3, 4, 20, 21, 22]]
    assert ring_systems(np.array(loop), max_ring_size=20) == [list(range(20))]


def test_sibling_torsions_see_bonds_to_cartesian_ring_atoms(traj: md.Trajectory) -> None:
    """Rows kept as internal coordinates keep their sibling flags (e.g. the Pro C-alpha
    improper) when the molecule's bonds are given, and gain those whose sibling bond is
    a ring-closing bond (not a Z-matrix pair before either)."""
    from bgflow_mini.coordinates import sibling_torsions
    from bgflow_mini.coordinates.zmatrix import bond_graph

    top = traj.topology
    z0 = build_zmatrix(top, positions=traj.xyz[0])
    z, cart = ring_zmatrix(z0, top, traj.xyz[0])
    bonds = bond_graph(top)[1]
    old = sibling_torsions(z0)[~cart[3:]]
    new = sibling_torsions(z, cart, bonds=bonds)
    assert new.dtype == torch.bool and not (old & ~new).any()
    real = {frozenset(map(int, b)) for b in bonds}
    rows = z[~cart][3:]
    for k in torch.nonzero(new & ~old).flatten().tolist():
        assert frozenset((int(rows[k, 3]), int(rows[k, 1]))) in real
    assert (old & ~sibling_torsions(z, cart)).any()  # Z-matrix pairs alone miss some


def test_all_ring_molecule_with_auto_torsions() -> None:
    """A bare 6-ring: every row after the third is Cartesian, no torsion is left."""
    ring = np.array([[i, (i + 1) % 6] for i in range(6)])
    ang = np.arange(6) * np.pi / 3
    pos = 0.14 * np.stack([np.cos(ang), np.sin(ang), np.zeros(6)], 1)
    rng = np.random.default_rng(0)
    x = pos.reshape(1, -1) + 0.003 * rng.normal(size=(64, 18))
    z, cart = ring_zmatrix(build_zmatrix(ring, positions=pos), ring, pos)
    assert cart.sum() == 3
    flow, circular = ic_transform(z, torch.as_tensor(x), cartesian=cart, bonds=ring)
    assert not circular.any()
    lat, _ = flow.inverse(torch.as_tensor(x))
    assert torch.isfinite(lat).all()


def test_ring_zmatrix_marks_ring_atoms(traj: md.Trajectory) -> None:
    top = traj.topology
    z0 = build_zmatrix(top, positions=traj.xyz[0])
    z, cart = ring_zmatrix(z0, top, traj.xyz[0])
    assert cart.shape == (top.n_atoms,) and not cart[:3].any()
    for g in ring_systems(top):
        rows = [int(np.flatnonzero(z[:, 0] == a)[0]) for a in g]
        rows.sort()
        # the first two ring atoms keep internal coordinates, the others share one frame
        assert not cart[rows[0]] and not cart[rows[1]]
        assert cart[rows[2:]].sum() >= len(g) - 3
        frames = {tuple(z[r, 1:]) for r in rows if cart[r]}
        assert len(frames) == 1
        r0, r1, q = frames.pop()
        assert {r0, r1} == {int(z[rows[0], 0]), int(z[rows[1], 0])}
    assert np.array_equal(z[~cart], z0[~cart])  # other rows unchanged
    assert np.array_equal(z[:, 0], z0[:, 0])  # same placement order


def _dists(xyz: torch.Tensor) -> torch.Tensor:
    """All interatomic distances ``(batch, n, n)`` of ``(batch, n, 3)`` positions."""
    return (xyz[:, :, None] - xyz[:, None]).norm(dim=-1)


def _ic(traj: md.Trajectory) -> InternalCoordinates:
    return InternalCoordinates.from_topology(traj.topology, traj.xyz[0])


def test_cartesian_rows_roundtrip_and_layout(traj: md.Trajectory) -> None:
    ic = _ic(traj)
    n = ic.n_atoms
    assert ic.cartesian.sum() == 3 * ic.cartesian_rows.sum() > 0
    assert not (ic.circular & ic.cartesian).any()
    assert ic.circular.sum() == (n - 3) - ic.cartesian_rows.sum()
    assert not (bond_mask(ic) & ic.cartesian).any() and not (angle_mask(ic) & ic.cartesian).any()
    x = _cart(traj)
    q, ld_inv = ic.inverse(x)
    # a Cartesian row's features are the atom's position in the frame: its norm is the
    # distance to the frame origin r0
    z = ic.zmatrix.numpy()
    xyz = x.reshape(len(x), n, 3)
    for row in np.flatnonzero(ic.cartesian_rows.numpy()):
        a, r0 = z[row, 0], z[row, 1]
        cols = [row - 1, n - 1 + row - 2, 2 * n - 3 + row - 3]
        dist = (xyz[:, a] - xyz[:, r0]).norm(dim=-1)
        torch.testing.assert_close(q[:, cols].norm(dim=-1), dist)
    x2, ld_fwd = ic(q)
    q2, _ = ic.inverse(x2)
    torch.testing.assert_close(q2[:, ~ic.circular], q[:, ~ic.circular], atol=1e-10, rtol=0)
    torch.testing.assert_close(ld_fwd, -ld_inv, atol=1e-10, rtol=0)
    d = lambda v: _dists(v.reshape(len(v), n, 3))  # noqa: E731
    assert (d(x2) - d(x)).abs().max() < 1e-10  # same structure, canonical orientation


def test_cartesian_rows_logdet_against_autograd(traj: md.Trajectory) -> None:
    ic = _ic(traj)
    q, ld_inv = ic.inverse(_cart(traj[::150]))
    for k in range(len(q)):
        ref = _full_map_logdet(ic, q[k])
        _, ld = ic(q[k : k + 1])
        assert abs(ld.item() - ref) < 1e-8 * max(1.0, abs(ref))
        assert abs(ld_inv[k].item() + ref) < 1e-8 * max(1.0, abs(ref))


def test_gradcheck_with_cartesian_rows(traj: md.Trajectory) -> None:
    ic = _ic(traj)
    x = _cart(traj[:2]).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: ic.inverse(v), (x,))
    q = ic.inverse(x)[0].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: ic(v), (q,))


def test_whiten_layer() -> None:
    torch.manual_seed(0)
    a = torch.randn(5, 5, dtype=DT)
    data = torch.randn(4000, 8, dtype=DT)
    data[:, 1:6] = data[:, 1:6] @ a.T
    data = (data - data.mean(0)) / data.std(0)  # Whiten follows standardisation
    layer = Whiten.from_data(data, [[1, 2, 3], [4, 5]])
    z, ld_inv = layer.inverse(data)
    torch.testing.assert_close(z[:, [0, 6, 7]], data[:, [0, 6, 7]])
    for block in ([1, 2, 3], [4, 5]):  # decorrelated within each block
        c = torch.corrcoef(z[:, block].T)
        assert (c - torch.eye(len(block), dtype=DT)).abs().max() < 0.02
    x, ld = layer(z)
    torch.testing.assert_close(x, data)
    torch.testing.assert_close(ld, -ld_inv)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], z[0])
    torch.testing.assert_close(ld[0], torch.linalg.slogdet(jac)[1])
    # a bimodal collective motion (like a ring pucker flip) lands on one latent axis
    flip = torch.randint(0, 2, (4000,), generator=torch.Generator().manual_seed(2)) * 2.0 - 1
    u = torch.tensor([0.5, -0.7, 0.3, 0.4], dtype=DT)
    block = flip[:, None].to(DT) * u + 0.2 * torch.randn(4000, 4, dtype=DT)
    block = (block - block.mean(0)) / block.std(0)
    zb, _ = Whiten.from_data(block, [[0, 1, 2, 3]]).inverse(block)
    corr = torch.stack(
        [torch.corrcoef(torch.stack([zb[:, j], flip.to(DT)]))[0, 1] for j in range(4)]
    )
    assert corr.abs().max() > 0.95 and torch.sort(corr.abs()).values[-2] < 0.1
    with pytest.raises(ValueError, match="invertible"):
        Whiten(3, [0, 1], torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        Whiten(3, [0, 1], torch.eye(3))


def test_ic_transform_with_rings_roundtrip_and_logdet(traj: md.Trajectory) -> None:
    top = traj.topology
    z, cart = ring_zmatrix(build_zmatrix(top, positions=traj.xyz[0]), top, traj.xyz[0])
    x = _cart(traj)
    flow, circular = ic_transform(z, x, cartesian=cart)
    assert isinstance(flow.flows[0], Whiten)
    blocks = cartesian_blocks(flow.internal)
    cols = torch.as_tensor([i for b in blocks for i in b])
    assert flow.internal.cartesian[cols].sum() == flow.internal.cartesian.sum()
    assert len(cols) > flow.internal.cartesian.sum()  # with the frame's own bonds
    assert len(cartesian_blocks(flow.internal)) == 2  # one frame per ring
    lat, ld_inv = flow.inverse(x)
    for block in cartesian_blocks(flow.internal):  # each ring's latent block is white
        c = torch.cov(lat[:, block].T)
        assert (c - torch.eye(len(block), dtype=DT)).abs().max() < 1e-4
    x2, ld_fwd = flow(lat)
    torch.testing.assert_close(ld_fwd, -ld_inv, atol=1e-9, rtol=0)
    ref = _full_map_logdet(flow, lat[5])
    assert abs(ld_fwd[5].item() - ref) < 1e-8 * abs(ref)
    n = top.n_atoms
    d = lambda v: _dists(v.reshape(len(v), n, 3))  # noqa: E731
    assert (d(x2) - d(x)).abs().max() < 1e-9


def _identity_flow_bond_ratios(traj: md.Trajectory, rings: str) -> dict[str, float]:
    """std ratio (samples / MD) of every ring bond when every non-angle latent is a fresh
    unit Gaussian and the latent angles are MD's (the flow at the identity)."""
    top = traj.topology
    z = build_zmatrix(top, positions=traj.xyz[0])
    cart = None
    if rings == "cartesian":
        z, cart = ring_zmatrix(z, top, traj.xyz[0])
    x = _cart(traj)
    flow, circular = ic_transform(z, x, cartesian=cart)
    lat, _ = flow.inverse(x)
    fresh = torch.randn(lat.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    with torch.no_grad():
        xs, _ = flow(torch.where(circular, lat, fresh))
    xyz_md, xyz = x.reshape(len(x), -1, 3), xs.reshape(len(xs), -1, 3)
    out = {}
    for i, j in _ring_bonds(top):
        ref = (xyz_md[:, i] - xyz_md[:, j]).norm(dim=-1)
        got = (xyz[:, i] - xyz[:, j]).norm(dim=-1)
        key = f"{top.atom(i)}-{top.atom(j).name}"
        out[key] = float(got.std() / ref.std())
        if rings == "cartesian":
            assert abs(got.mean() / ref.mean() - 1) < 0.01, key
    return out


def test_gaussian_latent_keeps_rings_closed(traj: md.Trajectory) -> None:
    """With Cartesian ring rows a Gaussian latent keeps the planar Phe ring's bonds at
    MD's spread; with internal coordinates the ring-closing bonds, set by several
    independent features, spread several times wider. (The Pro ring's pucker is
    bimodal, which a Gaussian cannot follow; a trained flow can.)"""
    cart = _identity_flow_bond_ratios(traj, "cartesian")
    internal = _identity_flow_bond_ratios(traj, "internal")
    phe = [v for k, v in cart.items() if k.startswith("PHE")]
    assert len(phe) == 6 and max(phe) < 1.3 and min(phe) > 0.75, cart
    assert max(internal.values()) > 3.0, internal
    assert max(cart.values()) < max(internal.values()) / 1.5, (cart, internal)


def test_1000_atom_chain_with_rings() -> None:
    """A 1,000-atom chain (a ring every 10 atoms, each atom with one hydrogen); the build
    time is measured by benchmarks/zmatrix_build.py."""
    heavy = 500
    bonds = [[i, i + 1] for i in range(heavy - 1)] + [[i, i + 4] for i in range(0, 496, 10)]
    bonds += [[i, heavy + i] for i in range(heavy)]
    hydrogens = np.arange(2 * heavy) >= heavy
    rng = np.random.default_rng(0)
    pos = np.cumsum(rng.normal(scale=0.1, size=(2 * heavy, 3)), axis=0)
    z = build_zmatrix(np.array(bonds), hydrogens=hydrogens)
    z, cart = ring_zmatrix(z, np.array(bonds))
    ic = InternalCoordinates(z, cart)
    assert ic.n_atoms == 1000 and cart.sum() == 3 * 50  # 5-rings: 3 Cartesian atoms each
    x = torch.as_tensor(pos.reshape(1, -1), dtype=DT)
    q, _ = ic.inverse(x)
    x2, _ = ic(q)
    assert (_dists(x2.view(1, -1, 3)) - _dists(x.view(1, -1, 3))).abs().max() < 1e-9
