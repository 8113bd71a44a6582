"""Tests of InternalCoordinates, the normalisation layers and ic_transform (float64)."""

from __future__ import annotations

import math
from pathlib import Path

import mdtraj as md
import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from bgflow_mini.coordinates import (
    CircularShift,
    ICTransform,
    InternalCoordinates,
    Standardize,
    build_zmatrix,
    ic_transform,
    least_populated_angle,
    narrow_torsions,
    sibling_torsions,
)
from bgflow_mini.units import wrap_angle

ROOT = Path(__file__).resolve().parents[1]
ALDP_PDB = ROOT / "systems" / "aldp_vacuum" / "aldp.pdb"
PEPTIDE_PDB = Path(__file__).resolve().parent / "data" / "ace_phe_pro_nme.pdb"
PDB = ALDP_PDB if ALDP_PDB.exists() else PEPTIDE_PDB  # MD molecule
DT = torch.float64


def _md_frames(pdb_path: Path, n_frames: int = 200, stride: int = 20) -> md.Trajectory:
    """Short Langevin MD (amber99sbildn, vacuum, 1 fs, 300 K, no constraints)."""
    pdb = app.PDBFile(str(pdb_path))
    ff = app.ForceField("amber99sbildn.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 5.0 / unit.picosecond, 0.001)
    integrator.setRandomNumberSeed(1234)
    platform = openmm.Platform.getPlatformByName("Reference")
    ctx = openmm.Context(system, integrator, platform)
    ctx.setPositions(pdb.positions)
    ctx.setVelocitiesToTemperature(300 * unit.kelvin, 1234)
    xyz = []
    for _ in range(n_frames):
        integrator.step(stride)
        pos = ctx.getState(getPositions=True).getPositions(asNumpy=True)
        xyz.append(pos.value_in_unit(unit.nanometer))
    return md.Trajectory(np.asarray(xyz), md.load(str(pdb_path)).topology)


@pytest.fixture(scope="module")
def traj() -> md.Trajectory:
    return _md_frames(PDB)


@pytest.fixture(scope="module")
def ic(traj: md.Trajectory) -> InternalCoordinates:
    return InternalCoordinates(build_zmatrix(traj.topology, positions=traj.xyz[0]))


def _cart(traj: md.Trajectory) -> torch.Tensor:
    return torch.as_tensor(traj.xyz.reshape(traj.n_frames, -1), dtype=DT)


def _kabsch_rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """RMSD (nm) between (n, 3) structures after optimal superposition."""
    a, b = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1.0, 1.0, d]) @ vt
    return float(np.sqrt(((a @ rot - b) ** 2).sum(-1).mean()))


def _torsion_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return wrap_angle(a - b).abs()


# ---------------------------------------------------------------- InternalCoordinates


def test_layout(ic: InternalCoordinates) -> None:
    n = ic.n_atoms
    assert ic.dim == 3 * n - 6
    assert ic.bond_idx.tolist() == list(range(n - 1))
    assert ic.angle_idx.tolist() == list(range(n - 1, 2 * n - 3))
    assert ic.torsion_idx.tolist() == list(range(2 * n - 3, 3 * n - 6))
    assert ic.circular.dtype == torch.bool and ic.circular.sum() == n - 3
    assert ic.circular[ic.torsion_idx].all()


def test_cartesian_roundtrip_md_frames(traj: md.Trajectory, ic: InternalCoordinates) -> None:
    x = _cart(traj)
    q, _ = ic.inverse(x)
    x2, _ = ic(q)
    assert x2.dtype == DT and x2.shape == x.shape
    xyz, xyz2 = x.numpy().reshape(len(x), -1, 3), x2.numpy().reshape(len(x), -1, 3)
    rmsd = max(_kabsch_rmsd(a, b) for a, b in zip(xyz, xyz2, strict=True))
    assert rmsd < 1e-6
    # not trivially equal: the reconstruction is in the canonical frame
    assert np.abs(xyz - xyz2).max() > 0.1


def test_canonical_frame(traj: md.Trajectory, ic: InternalCoordinates) -> None:
    q, _ = ic.inverse(_cart(traj[:20]))
    x, _ = ic(q)
    xyz = x.reshape(len(x), -1, 3)
    a0, a1, a2 = ic.zmatrix[:3, 0]
    assert torch.all(xyz[:, a0] == 0)
    assert torch.all(xyz[:, a1, 0] > 0) and torch.all(xyz[:, a1, 1:] == 0)
    assert torch.all(xyz[:, a2, 1] > 0) and torch.all(xyz[:, a2, 2] == 0)


def test_ic_roundtrip_perturbed(traj: md.Trajectory, ic: InternalCoordinates) -> None:
    q, _ = ic.inverse(_cart(traj[:50]))
    gen = torch.Generator().manual_seed(0)
    scale = torch.full((ic.dim,), 0.05, dtype=DT)  # angles: 0.05 rad
    scale[ic.bond_idx], scale[ic.torsion_idx] = 0.003, 2.0  # bonds: 0.003 nm, torsions 2 rad
    q = q + scale * torch.randn(q.shape, generator=gen, dtype=DT)
    q[:, ic.torsion_idx] = wrap_angle(q[:, ic.torsion_idx])
    x, _ = ic(q)
    q2, _ = ic.inverse(x)
    t = ic.torsion_idx
    assert (q2[:, ~ic.circular] - q[:, ~ic.circular]).abs().max() < 1e-10
    assert _torsion_diff(q2[:, t], q[:, t]).max() < 1e-10
    assert q2[:, t].min() >= -math.pi and q2[:, t].max() < math.pi
    a = q2[:, ic.angle_idx]
    assert a.min() > 0 and a.max() < math.pi


def test_features_match_mdtraj(traj: md.Trajectory, ic: InternalCoordinates) -> None:
    q, _ = ic.inverse(_cart(traj))
    bonds = md.compute_distances(traj, ic.bond_atoms)
    angles = md.compute_angles(traj, ic.angle_atoms)
    tors = md.compute_dihedrals(traj, ic.torsion_atoms)
    np.testing.assert_allclose(q[:, ic.bond_idx].numpy(), bonds, atol=1e-6)
    np.testing.assert_allclose(q[:, ic.angle_idx].numpy(), angles, atol=1e-5)
    diff = _torsion_diff(q[:, ic.torsion_idx], torch.as_tensor(tors, dtype=DT))
    assert diff.max() < 1e-5  # mdtraj computes in float32
    assert tors.std(0).max() > 0.3  # some torsions actually move in the MD


@pytest.mark.skipif(not ALDP_PDB.exists(), reason="ALDP PDB not present")
def test_phi_psi_match_mdtraj(traj: md.Trajectory, ic: InternalCoordinates) -> None:
    q, _ = ic.inverse(_cart(traj))
    quads = [tuple(r) for r in ic.torsion_atoms.tolist()]
    for compute in (md.compute_phi, md.compute_psi):
        idx, ref = compute(traj)
        quad = tuple(idx[0].tolist())
        j = quads.index(quad) if quad in quads else quads.index(quad[::-1])
        diff = _torsion_diff(q[:, ic.torsion_idx[j]], torch.as_tensor(ref[:, 0], dtype=DT))
        assert diff.max() < 1e-5


# rigid-body parametrised square map: (t, alpha, beta, gamma, latent) -> Cartesian


def _rot(axis: int, a: torch.Tensor) -> torch.Tensor:
    """Right-handed rotation matrix about x (0), y (1) or z (2) by angle ``a``."""
    c, s, one, zero = torch.cos(a), torch.sin(a), torch.ones_like(a), torch.zeros_like(a)
    rows = {
        0: [[one, zero, zero], [zero, c, -s], [zero, s, c]],
        1: [[c, zero, s], [zero, one, zero], [-s, zero, c]],
        2: [[c, -s, zero], [s, c, zero], [zero, zero, one]],
    }[axis]
    return torch.stack([torch.stack(r) for r in rows])


def _full_map_logdet(flow, latent: torch.Tensor, angles=(0.7, 0.4, -1.1)) -> float:
    """slogdet of (t, alpha, beta, gamma, latent) -> Rz(alpha) Ry(beta) Rx(gamma) x + t.

    For these Euler angles the rotation's own volume factor is |cos(beta)|, so
    ``result - log|cos(beta)|`` must equal the flow's forward logdet.
    """

    def f(p: torch.Tensor) -> torch.Tensor:
        x, _ = flow(p[6:].unsqueeze(0))
        rot = _rot(2, p[3]) @ _rot(1, p[4]) @ _rot(0, p[5])
        return (x.reshape(-1, 3) @ rot.T + p[:3]).reshape(-1)

    p = torch.cat([torch.tensor([0.1, -0.2, 0.3, *angles], dtype=DT), latent])
    jac = torch.autograd.functional.jacobian(f, p)
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    return float(logabs) - math.log(abs(math.cos(angles[1])))


def test_rotation_helper_is_a_rotation() -> None:
    for axis in range(3):
        r = _rot(axis, torch.tensor(0.3, dtype=DT))
        torch.testing.assert_close(r @ r.T, torch.eye(3, dtype=DT))
        assert torch.isclose(torch.linalg.det(r), torch.tensor(1.0, dtype=DT))
    rz = _rot(2, torch.tensor(math.pi / 2, dtype=DT))
    torch.testing.assert_close(
        rz @ torch.tensor([1.0, 0, 0], dtype=DT), torch.tensor([0.0, 1, 0], dtype=DT)
    )


@pytest.mark.parametrize("root", [None, "second"])
def test_logdet_against_autograd(traj: md.Trajectory, root: str | None) -> None:
    top = traj.topology
    if root is None:
        zmat = build_zmatrix(top, positions=traj.xyz[0])
    else:  # start at a terminal heavy atom: third atom bonded to the second atom
        terminal = [a.index for a in top.atoms if a.element.symbol == "C" and a.name == "CH3"][0]
        zmat = build_zmatrix(top, positions=traj.xyz[0], root=terminal)
    flow = InternalCoordinates(zmat)
    assert (zmat[2, 1] == zmat[1, 0]) == (root is not None)
    q, ld_inv = flow.inverse(_cart(traj[::67]))
    q2, _ = flow.inverse(flow(q)[0])  # round trip for both placements of the third atom
    assert (q2[:, ~flow.circular] - q[:, ~flow.circular]).abs().max() < 1e-10
    assert _torsion_diff(q2[:, flow.circular], q[:, flow.circular]).max() < 1e-10
    for k in range(len(q)):
        ref = _full_map_logdet(flow, q[k])
        _, ld = flow(q[k : k + 1])
        assert abs(ld.item() - ref) < 1e-8 * max(1.0, abs(ref))
        assert abs(ld_inv[k].item() + ref) < 1e-8 * max(1.0, abs(ref))


def test_forward_inverse_logdets_cancel(traj: md.Trajectory, ic: InternalCoordinates) -> None:
    q, ld_inv = ic.inverse(_cart(traj))
    x, ld_fwd = ic(q)
    _, ld_inv2 = ic.inverse(x)
    assert ld_fwd.shape == (traj.n_frames,)
    torch.testing.assert_close(ld_fwd + ld_inv, torch.zeros_like(ld_fwd), atol=1e-10, rtol=0)
    torch.testing.assert_close(ld_inv2, ld_inv, atol=1e-10, rtol=0)
    assert ld_fwd.std() > 0  # depends on the configuration


def test_gradcheck(traj: md.Trajectory, ic: InternalCoordinates) -> None:
    x = _cart(traj[:2]).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: ic.inverse(v), (x,))
    q = ic.inverse(x)[0].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: ic(v), (q,))


def test_float32_and_bad_shapes(traj: md.Trajectory, ic: InternalCoordinates) -> None:
    x = _cart(traj[:8]).float()
    q, ld = ic.inverse(x)
    assert q.dtype == torch.float32 and ld.dtype == torch.float32 and q.shape == (8, ic.dim)
    x2, _ = ic(q)
    assert x2.dtype == torch.float32
    q2, _ = ic.inverse(x2)
    assert (q2[:, ~ic.circular] - q[:, ~ic.circular]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="expected dim"):
        ic(torch.zeros(4, ic.dim + 1, dtype=DT))
    with pytest.raises(ValueError, match="expected dim"):
        ic.inverse(torch.zeros(4, 3 * ic.n_atoms - 1, dtype=DT))
    with pytest.raises(ValueError, match="shape"):
        ic.inverse(_cart(traj[:2]).reshape(2, -1, 3))
    with pytest.raises(ValueError):
        InternalCoordinates(np.array([[0, -1, -1, -1], [1, 0, -1, -1], [1, 0, -1, -1]]))


# ---------------------------------------------------------------- normalisation


def test_standardize_logdet_and_roundtrip() -> None:
    mask = torch.tensor([True, False, True, True])
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(500, 4, generator=gen, dtype=DT) * torch.tensor([0.01, 2.0, 3.0, 0.5])
    layer = Standardize.from_data(data + 1.0, mask)
    z, ld_inv = layer.inverse(data + 1.0)
    torch.testing.assert_close(z[:, mask].mean(0), torch.zeros(3, dtype=DT), atol=1e-12, rtol=0)
    torch.testing.assert_close(z[:, mask].std(0), torch.ones(3, dtype=DT))
    torch.testing.assert_close(z[:, ~mask], data[:, ~mask] + 1.0)  # unselected: untouched
    x, ld_fwd = layer(z)
    torch.testing.assert_close(x, data + 1.0)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], z[0])
    ref = torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(ld_fwd, ref.expand(500))
    torch.testing.assert_close(ld_inv, -ref.expand(500))
    assert abs(ref.item() - math.log(0.01 * 3.0 * 0.5)) < 0.2  # data-derived scales
    # explicit parameters of length mask.sum()
    layer2 = Standardize(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 0.5]), mask)
    assert math.isclose(layer2(z[:1])[1].item(), math.log(4.0))
    with pytest.raises(ValueError, match="std must be positive"):
        Standardize(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]), mask)
    with pytest.raises(ValueError, match="mean must have shape"):
        Standardize(torch.zeros(2), torch.ones(3), mask)
    with pytest.raises(ValueError, match="expected dim"):
        layer(torch.zeros(3, 5, dtype=DT))


def _gapped_angles(n: int, gap_centre: float, seed: int = 0) -> torch.Tensor:
    """Angles uniform on the circle except an empty arc of width 1 rad at gap_centre."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen, dtype=DT) * (2 * math.pi - 1.0)
    return wrap_angle(gap_centre + 0.5 + u)


def test_least_populated_angle() -> None:
    centres = [2.0, -3.0, 0.0, 3.1]  # -3.0 and 3.1: the gap straddles the cut
    data = torch.stack([_gapped_angles(4000, c, seed=i) for i, c in enumerate(centres)], -1)
    found = least_populated_angle(data, n_bins=36)
    for f, c in zip(found.tolist(), centres, strict=True):
        assert abs(wrap_angle(torch.tensor(f - c)).item()) < 2 * math.pi / 36


def test_circular_shift_places_gap_at_cut() -> None:
    centres = [1.0, -2.5, 3.0]
    data = torch.stack([_gapped_angles(3000, c, seed=i) for i, c in enumerate(centres)], -1)
    data = torch.cat([data, torch.randn(3000, 1, dtype=DT)], -1)  # last feature not an angle
    mask = torch.tensor([True, True, True, False])
    assert (data[:, :3].abs() > math.pi - 0.3).any()  # the data do cross the cut
    layer = CircularShift.from_data(data, mask)
    z, ld = layer.inverse(data)
    assert torch.all(ld == 0)
    latent = z[:, :3]
    assert latent.min() >= -math.pi and latent.max() < math.pi
    assert (latent.abs() > math.pi - 0.4).sum() == 0  # nothing near the cut any more
    torch.testing.assert_close(z[:, 3], data[:, 3])
    x, ld_fwd = layer(z)
    assert torch.all(ld_fwd == 0)
    assert _torsion_diff(x[:, :3], data[:, :3]).max() < 1e-12
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], z[0])
    torch.testing.assert_close(jac, torch.eye(4, dtype=DT))


def test_circular_shift_wraps_edge_values() -> None:
    layer = CircularShift(torch.tensor([math.pi, -math.pi / 2]), torch.tensor([True, True]))
    edge = torch.tensor(
        [[-math.pi, math.pi - 1e-16], [1e-17, -1e-17], [math.pi / 2, -math.pi / 2]], dtype=DT
    )
    below = torch.nextafter(torch.tensor(-math.pi, dtype=DT), torch.tensor(-4.0, dtype=DT))
    assert wrap_angle(below).item() == -math.pi  # remainder alone would give +pi here
    for out in (layer(edge)[0], layer.inverse(edge)[0], wrap_angle(edge * 7)):
        assert out.min() >= -math.pi and out.max() < math.pi
    f32 = layer(edge.float())[0]
    assert f32.dtype == torch.float32 and f32.min() >= -math.pi and f32.max() < math.pi


# ---------------------------------------------------------------- ic_transform


@pytest.mark.parametrize("mode", ["auto", "all"])
def test_ic_transform_roundtrip_and_logdet(traj: md.Trajectory, mode: str) -> None:
    zmat = build_zmatrix(traj.topology, positions=traj.xyz[0])
    x = _cart(traj)
    flow, circular = ic_transform(zmat, x, circular=mode)
    assert isinstance(flow, ICTransform) and isinstance(flow.internal, InternalCoordinates)
    torsions = flow.internal.circular
    assert torch.equal(circular, flow.circular) and not (circular & ~torsions).any()
    if mode == "all":
        assert torch.equal(circular, torsions)
    else:  # short MD: narrow torsions are unrolled, free methyl rotors stay angles
        q, _ = flow.internal.inverse(x)
        narrow = narrow_torsions(q[:, torsions]) & sibling_torsions(flow.internal.zmatrix)
        assert torch.equal(circular[torsions], ~narrow)
        assert 0 < circular.sum() < torsions.sum()
    z, ld_inv = flow.inverse(x)
    assert z.shape == (traj.n_frames, 3 * traj.n_atoms - 6)
    # bonds, angles (and narrow torsions) standardised on the training data
    torch.testing.assert_close(z[:, ~circular].mean(0), torch.zeros_like(z[0, ~circular]))
    torch.testing.assert_close(z[:, ~circular].std(0), torch.ones_like(z[0, ~circular]))
    assert z[:, circular].min() >= -math.pi and z[:, circular].max() < math.pi
    x2, ld_fwd = flow(z)
    rmsd = max(
        _kabsch_rmsd(a, b)
        for a, b in zip(
            x.numpy().reshape(len(x), -1, 3), x2.numpy().reshape(len(x), -1, 3), strict=True
        )
    )
    assert rmsd < 1e-6
    torch.testing.assert_close(ld_fwd + ld_inv, torch.zeros_like(ld_fwd), atol=1e-9, rtol=0)
    # logdet = IC logdet + sum log std of the standardised features (torsions after shift)
    q, ld_ic = flow.internal.inverse(x)
    shifted, _ = flow.flows[1].inverse(q)
    std = shifted[:, ~circular].std(0)
    torch.testing.assert_close(ld_inv, ld_ic - torch.log(std).sum())
    # and against autograd on the full square map
    ref = _full_map_logdet(flow, z[3])
    assert abs(ld_fwd[3].item() - ref) < 1e-8 * abs(ref)
    # float32 inputs with float64 buffers
    z32, _ = flow.inverse(x[:4].float())
    assert z32.dtype == torch.float32 and (z32 - z[:4]).abs().max() < 1e-3
    # a given mask rebuilds the same layout from other data (like a checkpoint's spec)
    other, circ2 = ic_transform(zmat, x[:3] + 1e-3, circular=circular)
    assert torch.equal(circ2, circular)


def test_narrow_torsions() -> None:
    g = torch.Generator().manual_seed(0)
    n = 2000
    narrow = 3.0 + 0.2 * torch.randn(n, generator=g, dtype=DT)  # straddles the +-pi cut
    uniform = (torch.rand(n, generator=g, dtype=DT) * 2 - 1) * math.pi
    two_modes = torch.where(torch.rand(n, generator=g, dtype=DT) < 0.5, -1.5, 1.5)
    two_modes = two_modes + 0.2 * torch.randn(n, generator=g, dtype=DT)
    got = narrow_torsions(torch.stack([narrow, uniform, two_modes], 1))
    assert got.tolist() == [True, False, False]
    # half circle covered: narrow only for a smaller gap threshold
    half = torch.linspace(0, 0.8 * math.pi, n, dtype=DT)[:, None]
    assert not narrow_torsions(half, max_gap=1.25 * math.pi)[0]
    assert narrow_torsions(half, max_gap=math.pi)[0]
    with pytest.raises(ValueError, match="max_gap"):
        narrow_torsions(half, max_gap=7.0)


def test_sibling_torsions_aldp() -> None:
    """Backbone phi/psi, peptide bonds and methyl rotors are proper torsions; the rest
    place an atom relative to a sibling."""
    top = md.load(str(ALDP_PDB)).topology
    zmat = build_zmatrix(top)
    got = sibling_torsions(zmat)
    rows = [r for r in zmat if r[3] >= 0]
    assert got.shape == (len(rows),) == (top.n_atoms - 3,)
    bonded = {frozenset((b.atom1.index, b.atom2.index)) for b in top.bonds}
    for (_i, j, k, l), sib in zip(rows, got.tolist(), strict=True):
        assert sib == (frozenset((int(l), int(j))) in bonded)
        assert sib != (frozenset((int(l), int(k))) in bonded)
    proper = {str(top.atom(int(r[0]))) for r, sib in zip(rows, got.tolist()) if not sib}
    assert proper == {"ACE1-C", "NME3-N", "ACE1-CH3", "NME3-C", "ALA2-HB1", "ACE1-H1", "NME3-H1"}


def test_ic_transform_narrow_torsion_across_cut(traj: md.Trajectory) -> None:
    """An unrolled torsion whose data straddle +-pi round-trips without a jump."""
    zmat = build_zmatrix(traj.topology, positions=traj.xyz[0])
    flow, circular = ic_transform(zmat, _cart(traj))
    internal = flow.internal
    q, _ = internal.inverse(_cart(traj))
    j = int(torch.nonzero(internal.circular & ~circular)[0])
    q[:, j] = wrap_angle(q[:, j] - q[:, j].mean() + math.pi)  # centre the data on the cut
    x = internal(q)[0]
    flow2, circ2 = ic_transform(zmat, x)
    assert not circ2[j]
    z, _ = flow2.inverse(x)
    assert z[:, j].abs().max() < 8  # standardised, not split into two far-apart halves
    x2, _ = flow2(z)
    assert (x2 - x).abs().max() < 1e-8 or max(
        _kabsch_rmsd(a, b)
        for a, b in zip(
            x.numpy().reshape(len(x), -1, 3), x2.numpy().reshape(len(x), -1, 3), strict=True
        )
    ) < 1e-6


def test_ic_transform_input_validation(traj: md.Trajectory) -> None:
    zmat = build_zmatrix(traj.topology)
    n = traj.n_atoms
    flow, _ = ic_transform(zmat, traj.xyz[:20])  # (n_frames, n_atoms, 3) numpy
    flow_b, _ = ic_transform(zmat, traj[:20])  # mdtraj.Trajectory
    x = _cart(traj[:5])
    torch.testing.assert_close(flow.inverse(x)[0], flow_b.inverse(x)[0])
    for bad in (
        np.zeros((10, 3 * n + 3)),
        np.zeros((10, n, 2)),
        np.zeros(3 * n),
        np.zeros((1, 3 * n)),
    ):
        with pytest.raises(ValueError):
            ic_transform(zmat, bad)
    with pytest.raises(ValueError, match="non-finite"):
        ic_transform(zmat, np.full((4, 3 * n), np.nan))
    with pytest.raises(ValueError, match="expected dim"):
        flow(torch.zeros(2, 3 * n, dtype=DT))
    with pytest.raises(ValueError, match="circular must be"):
        ic_transform(zmat, traj.xyz[:20], circular="some")
    with pytest.raises(ValueError, match="not torsions"):
        ic_transform(zmat, traj.xyz[:20], circular=torch.ones(3 * n - 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool of shape"):
        ic_transform(zmat, traj.xyz[:20], circular=torch.ones(3, dtype=torch.bool))


def test_forward_counts_out_of_domain_rows() -> None:
    flow = InternalCoordinates(
        np.array([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0]])
    )
    keys_before = set(flow.state_dict())
    assert flow.domain_stats == {"evaluated": 0, "out_of_domain": 0}
    # layout: bonds [0, 3), angles [3, 5), torsion 5
    valid = torch.tensor(
        [[0.15, 0.14, 0.13, 1.9, 2.0, 0.5], [0.1, 0.1, 0.1, 0.1, math.pi - 0.1, -3.0]], dtype=DT
    )
    flow(valid)
    assert flow.domain_stats == {"evaluated": 2, "out_of_domain": 0}
    bad = valid[[0, 0, 0, 0, 1]].clone()
    bad[0, 1] = -0.1  # negative bond
    bad[1, 4] = math.pi + 0.2  # angle > pi
    bad[2, 2] = 0.0  # zero bond
    bad[3, 3], bad[3, 0] = -0.5, -0.2  # two violations in one row: counted once
    x, logdet = flow(bad)
    assert flow.domain_stats == {"evaluated": 7, "out_of_domain": 4}
    assert flow.n_forward == 7 and flow.n_out_of_domain == 4
    # values are unchanged: the same as a fresh flow, log-det as logdet_forward (NaN for r < 0)
    fresh = InternalCoordinates(flow.zmatrix.numpy())
    x_ref, logdet_ref = fresh(bad)
    assert torch.equal(x, x_ref)
    torch.testing.assert_close(logdet, logdet_ref, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(logdet[0]) and torch.isfinite(logdet[4])
    # the inverse does not count; a NaN angle is out of domain
    flow.inverse(x_ref[4:])
    nan_row = valid[:1].clone()
    nan_row[0, 3] = math.nan
    flow(nan_row)
    assert flow.domain_stats == {"evaluated": 8, "out_of_domain": 5}
    flow.reset_domain_stats()
    assert flow.domain_stats == {"evaluated": 0, "out_of_domain": 0}
    assert set(flow.state_dict()) == keys_before  # counters are not in checkpoints
