"""TorchForceField against direct OpenMM Reference-platform evaluations.

Tolerances: float64 energies within max(1e-6 relative, 1e-3 kJ/mol) and forces within
1e-3 kJ/mol/nm RMS per configuration. float32 (documented, looser): energies within
0.02 kJ/mol + 2e-6 * (sum of |per-force energies|) and forces within
0.02 kJ/mol/nm + 2e-5 * (RMS force) RMS per configuration.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from bgflow_mini.energies import Energy
from bgflow_mini.energies._torchff_gbsa import GBSAOBCTerm
from bgflow_mini.energies._torchff_terms import ONE_4PI_EPS0
from bgflow_mini.energies.torchff import TorchForceField
from bgflow_mini.units import kt_kjmol

ROOT = Path(__file__).resolve().parents[1]
FORCEFIELDS = {
    "aldp_vacuum": ["amber99sbildn.xml"],
    "aldp_implicit": ["amber99sbildn.xml", "amber99_obc.xml"],
}
KJ = unit.kilojoule_per_mole
NM = unit.nanometer


def build_system(name: str) -> tuple[openmm.System, np.ndarray]:
    pdb = app.PDBFile(str(ROOT / "systems" / name / "aldp.pdb"))
    system = app.ForceField(*FORCEFIELDS[name]).createSystem(
        pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None
    )
    return system, np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(NM))


def reference_context(system: openmm.System) -> openmm.Context:
    platform = openmm.Platform.getPlatformByName("Reference")
    return openmm.Context(system, openmm.VerletIntegrator(0.001), platform)


def openmm_eval(system: openmm.System, xs: np.ndarray, groups: int = -1):
    """Energies (batch,) kJ/mol and forces (batch, n, 3) kJ/mol/nm on Reference."""
    ctx = reference_context(system)
    energies, forces = [], []
    for x in xs:
        ctx.setPositions(x)
        state = ctx.getState(getEnergy=True, getForces=True, groups=groups)
        energies.append(state.getPotentialEnergy().value_in_unit(KJ))
        forces.append(state.getForces(asNumpy=True).value_in_unit(KJ / NM))
    return np.array(energies), np.array(forces)


def configurations(system, x0, n_md300, n_md600, n_noise, seed=0) -> np.ndarray:
    """MD frames at 300 K and 600 K (Langevin, 1 fs, every 20 steps) and reference
    positions with Gaussian noise (0.015 nm), shape (n, n_atoms, 3) nm."""
    frames = []
    for temperature, n in ((300.0, n_md300), (600.0, n_md600)):
        if n == 0:
            continue
        integrator = openmm.LangevinMiddleIntegrator(temperature, 1.0, 0.001)
        integrator.setRandomNumberSeed(seed + 1)
        ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
        ctx.setPositions(x0)
        ctx.setVelocitiesToTemperature(temperature, seed + 2)
        integrator.step(200)
        for _ in range(n):
            integrator.step(20)
            state = ctx.getState(getPositions=True)
            frames.append(state.getPositions(asNumpy=True).value_in_unit(NM))
    rng = np.random.default_rng(seed)
    frames.extend(x0 + 0.015 * rng.standard_normal((n_noise, *x0.shape)))
    return np.asarray(frames)


def torch_eval(ff: TorchForceField, xs: np.ndarray, dtype: torch.dtype):
    """Energies kJ/mol and forces kJ/mol/nm (float64 numpy) from the torch force field."""
    x = torch.tensor(xs.reshape(len(xs), ff.dim), dtype=dtype, requires_grad=True)
    u = ff(x)
    (grad,) = torch.autograd.grad(u.sum(), x)
    energies = u.detach().double().numpy() * ff.kT
    forces = -grad.double().numpy().reshape(xs.shape) * ff.kT
    return energies, forces


def assert_agree(e, f, e_ref, f_ref, e_tol, f_tol) -> None:
    de = np.abs(e - e_ref)
    f_rms = np.sqrt(((f - f_ref) ** 2).mean(axis=(1, 2)))
    assert np.all(de <= e_tol), f"max |dE| {de.max():.3g} kJ/mol (tolerance {np.min(e_tol):.3g})"
    assert np.all(f_rms <= f_tol), f"max force RMS error {f_rms.max():.3g} kJ/mol/nm"


@pytest.fixture(scope="module", params=["aldp_vacuum", "aldp_implicit"])
def aldp(request):
    system, x0 = build_system(request.param)
    xs = configurations(system, x0, n_md300=100, n_md600=50, n_noise=50)
    e_ref, f_ref = openmm_eval(system, xs)
    return SimpleNamespace(name=request.param, system=system, x0=x0, xs=xs, e=e_ref, f=f_ref)


@pytest.mark.parametrize("analytic", [True, False])
def test_float64_matches_openmm(aldp, analytic):
    ff = TorchForceField.from_openmm(aldp.system, analytic_grad=analytic).double()
    e, f = torch_eval(ff, aldp.xs, torch.float64)
    assert_agree(e, f, aldp.e, aldp.f, np.maximum(1e-6 * np.abs(aldp.e), 1e-3), 1e-3)


def assert_float32_agrees(e, f, system, xs, e_ref, f_ref) -> None:
    """The documented float32 tolerances (module docstring)."""
    system = copy.deepcopy(system)
    for i, force in enumerate(system.getForces()):
        force.setForceGroup(i)
    scale = sum(np.abs(openmm_eval(system, xs, {i})[0]) for i in range(system.getNumForces()))
    f_scale = np.sqrt((f_ref**2).mean(axis=(1, 2)))
    assert_agree(e, f, e_ref, f_ref, 0.02 + 2e-6 * scale, 0.02 + 2e-5 * f_scale)


def test_float32_matches_openmm(aldp):
    ff = TorchForceField.from_openmm(aldp.system).float()
    e, f = torch_eval(ff, aldp.xs, torch.float32)
    assert_float32_agrees(e, f, aldp.system, aldp.xs, aldp.e, aldp.f)


def test_per_force_energies(aldp):
    system = copy.deepcopy(aldp.system)
    for i, force in enumerate(system.getForces()):
        force.setForceGroup(i)
    ff = TorchForceField.from_openmm(system).double()
    terms = ff.energy_terms(torch.as_tensor(aldp.xs[:50].reshape(50, -1)))
    names = [type(f).__name__ for f in system.getForces() if type(f).__name__ in terms]
    assert set(names) == set(terms)
    assert ("GBSAOBCForce" in terms) == (aldp.name == "aldp_implicit")
    for i, force in enumerate(system.getForces()):
        name = type(force).__name__
        if name in terms:
            e_ref, _ = openmm_eval(system, aldp.xs[:50], {i})
            np.testing.assert_allclose(terms[name].numpy(), e_ref, rtol=1e-9, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["aldp_vacuum", "aldp_implicit"])
def test_float64_matches_openmm_1000(name):
    system, x0 = build_system(name)
    xs = configurations(system, x0, n_md300=500, n_md600=250, n_noise=250, seed=7)
    e_ref, f_ref = openmm_eval(system, xs)
    ff = TorchForceField.from_openmm(system).double()
    e, f = torch_eval(ff, xs, torch.float64)
    assert_agree(e, f, e_ref, f_ref, np.maximum(1e-6 * np.abs(e_ref), 1e-3), 1e-3)


def test_gradient_is_minus_forces_over_kt(aldp):
    ff = TorchForceField.from_openmm(aldp.system, temperature=350.0).double()
    x = torch.tensor(aldp.xs[:20], requires_grad=True)  # (batch, n_atoms, 3) input
    (grad,) = torch.autograd.grad(ff(x).sum(), x)
    kt = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(KJ / unit.kelvin) * 350.0
    assert ff.kT == pytest.approx(kt) == kt_kjmol(350.0)
    np.testing.assert_allclose(grad.numpy(), -aldp.f[:20] / kt, rtol=0, atol=1e-4 / kt)


def test_analytic_second_derivatives_match_autograd(aldp):
    """create_graph through the analytic path gives the autograd path's Hessian products."""
    results = []
    for analytic in (True, False):
        ff = TorchForceField.from_openmm(aldp.system, analytic_grad=analytic).double()
        x = torch.tensor(aldp.xs[:4].reshape(4, -1), requires_grad=True)
        (grad,) = torch.autograd.grad(ff(x).sum(), x, create_graph=True)
        direction = torch.linspace(-1.0, 1.0, x.shape[1], dtype=x.dtype).expand_as(x)
        (hvp,) = torch.autograd.grad((grad * direction).sum(), x)
        results.append(hvp)
    torch.testing.assert_close(results[0], results[1], rtol=1e-8, atol=1e-6)


def test_energy_without_grad_matches(aldp):
    ff = TorchForceField.from_openmm(aldp.system, chunk_elements=1000).double()
    x = torch.tensor(aldp.xs[:30].reshape(30, -1))
    with torch.no_grad():
        u = ff(x)
    np.testing.assert_allclose(u.numpy() * ff.kT, aldp.e[:30], rtol=1e-9, atol=1e-6)


def _eval_both(ff: TorchForceField, xs: np.ndarray):
    """Analytic energies + forces, and graph-free energies, in kJ/mol (float64 numpy)."""
    e, f = torch_eval(ff, xs, torch.float64)
    with torch.no_grad():
        u = ff(torch.as_tensor(xs.reshape(len(xs), -1))).numpy() * ff.kT
    return e, f, u


@pytest.mark.parametrize(
    ("chunk_elements", "max_chunk_elements"), [(300, None), (None, 300), (65536, 1 << 22)]
)
def test_chunking_matches_unchunked(aldp, chunk_elements, max_chunk_elements):
    """Splitting the batch and the items (pairs, angles, ...) changes nothing."""
    xs = aldp.xs[:70]  # not a multiple of the 64-row batch chunks
    whole = TorchForceField.from_openmm(aldp.system, chunk_elements=None, max_chunk_elements=None)
    e0, f0, u0 = _eval_both(whole.double(), xs)
    ff = TorchForceField.from_openmm(
        aldp.system, chunk_elements=chunk_elements, max_chunk_elements=max_chunk_elements
    ).double()
    if chunk_elements == 300 or max_chunk_elements == 300:
        for term in ff.terms:  # really split: batch and items (GBSA: the 3-pass path)
            rows, items = ff.chunking(term, len(xs), torch.device("cpu"))
            assert rows < len(xs) and (items < term.n_items or term.n_items < 3)
    e, f, u = _eval_both(ff, xs)
    np.testing.assert_allclose(e, e0, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(u, u0, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(f, f0, rtol=1e-10, atol=1e-8)
    assert_agree(e, f, aldp.e[:70], aldp.f[:70], np.maximum(1e-6 * np.abs(aldp.e[:70]), 1e-3), 1e-3)
    terms = ff.energy_terms(torch.as_tensor(xs.reshape(len(xs), -1)))  # graph-free, chunked
    terms0 = whole.energy_terms(torch.as_tensor(xs.reshape(len(xs), -1)))
    for name, value in terms0.items():
        np.testing.assert_allclose(terms[name].numpy(), value.numpy(), rtol=1e-12, atol=1e-9)


def ring_system(name: str, solvent: str) -> tuple[openmm.System, np.ndarray]:
    """A shipped dipeptide with a ring (Pro, Trp), in vacuum or with OBC GBSA."""
    folder = ROOT / "systems" / name
    pdb = app.PDBFile(str(next(folder.glob("*.pdb"))))
    files = ["amber99sbildn.xml"] + (["amber99_obc.xml"] if solvent == "obc" else [])
    system = app.ForceField(*files).createSystem(
        pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None
    )
    return system, np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(NM))


@pytest.mark.parametrize("solvent", ["vacuum", "obc"])
@pytest.mark.parametrize("name", ["pro_dipeptide_vacuum", "trp_dipeptide_vacuum"])
def test_rings_match_openmm(name, solvent):
    """Ring molecules (torsions around ring bonds, 1-4 pairs across the ring)."""
    system, x0 = ring_system(name, solvent)
    xs = configurations(system, x0, n_md300=10, n_md600=10, n_noise=20, seed=3)
    e_ref, f_ref = openmm_eval(system, xs)
    for chunk_elements in (65536, 200):
        ff = TorchForceField.from_openmm(system, chunk_elements=chunk_elements).double()
        e, f = torch_eval(ff, xs, torch.float64)
        assert_agree(e, f, e_ref, f_ref, np.maximum(1e-6 * np.abs(e_ref), 1e-3), 1e-3)
    ff = TorchForceField.from_openmm(system).float()
    e, f = torch_eval(ff, xs, torch.float32)
    assert_float32_agrees(e, f, system, xs, e_ref, f_ref)


def test_250_atom_peptide_default_chunks(tmp_path):
    """A 252-atom capped Ala24 with OBC: with the default settings the pairs are split
    into chunks (the GBSA three-pass path), energies and forces still match OpenMM,
    and the buffers grow with the number of items, not atoms x items."""
    pytest.importorskip("PeptideBuilder")
    from bgflow_mini.system_builder import build_system as build_peptide
    from bgflow_mini.systems import load_system

    folder = build_peptide(tmp_path / "ala24", sequence="A" * 24, solvent="obc", minimize=False)
    mol = load_system(folder)
    rng = np.random.default_rng(0)
    xs = mol.positions[None] + 0.01 * rng.standard_normal((6, mol.n_atoms, 3))
    e_ref, f_ref = openmm_eval(mol.system, xs)
    ff = TorchForceField.from_openmm(mol).double()
    gbsa = next(t for t in ff.terms if t.name == "GBSAOBCForce")
    assert ff.chunking(gbsa, len(xs), torch.device("cpu"))[1] < gbsa.n_items
    e, f = torch_eval(ff, xs, torch.float64)
    assert_agree(e, f, e_ref, f_ref, np.maximum(1e-6 * np.abs(e_ref), 1e-3), 1e-3)
    items = sum(t.n_items for t in ff.terms)
    assert sum(b.numel() for b in ff.buffers()) <= 12 * (items + mol.n_atoms)
    ff32 = TorchForceField.from_openmm(mol).float()
    e32, f32 = torch_eval(ff32, xs, torch.float32)
    assert_float32_agrees(e32, f32, mol.system, xs, e_ref, f_ref)
    x = torch.as_tensor(xs.reshape(len(xs), -1))
    gb64 = ff.energy_terms(x)["GBSAOBCForce"].numpy()
    gb32 = ff32.energy_terms(x.float())["GBSAOBCForce"].double().numpy()
    np.testing.assert_allclose(gb32, gb64, atol=0.02)  # 0.07 kJ/mol without the series


def test_gbsa_far_pair_series():
    """Below float64, distant pairs use a series for the HCT integral and its
    derivative: equal to the float64 closed form, in both evaluations."""
    term = GBSAOBCTerm([0.5, -0.5], [0.15, 0.12], [0.8, 1.1], 78.5, 1.0, 2.25936)
    r = torch.cat([torch.linspace(0.05, 1.0, 60), torch.logspace(0, 1.5, 60)])[:, None]
    r64 = r.double().requires_grad_(True)
    hct64 = term._hct(r64, slice(None))
    d64 = torch.stack(
        [torch.autograd.grad(hct64[k].sum(), r64, retain_graph=True)[0] for k in (0, 1)]
    )
    r32 = r.float().requires_grad_(True)
    hct32 = term._hct(r32, slice(None))
    d32 = torch.stack(
        [torch.autograd.grad(hct32[k].sum(), r32, retain_graph=True)[0] for k in (0, 1)]
    )
    with torch.no_grad():
        hct_inplace, d_inplace = term._hct_inplace(r.float(), slice(None), grad=True)
    for value, ref in ((hct32, hct64), (hct_inplace, hct64), (d32, d64), (d_inplace, d64)):
        err = (value.detach().double() - ref.detach()).abs() / ref.detach().abs().clamp_min(1e-30)
        assert err.max() < 2e-5, err.max()


def random_system(seed: int, gbsa: bool) -> tuple[openmm.System, np.ndarray]:
    """Small synthetic system exercising every exception kind and every GBSA branch
    (atoms inside scaled spheres, inactive pairs) with random parameters; positions
    (40, 8, 3) nm with all distances >= 0.12 nm."""
    rng = np.random.default_rng(seed)
    n = 8
    system = openmm.System()
    nb = openmm.NonbondedForce()
    nb.setNonbondedMethod(openmm.NonbondedForce.NoCutoff)
    gb = openmm.GBSAOBCForce()
    gb.setSolventDielectric(80.0)
    gb.setSoluteDielectric(2.0)
    gb.setSurfaceAreaEnergy(3.0)
    for i in range(n):
        system.addParticle(12.0)
        q = rng.uniform(-0.8, 0.8)
        nb.addParticle(q, rng.uniform(0.05, 0.15), rng.uniform(0.0, 1.0))
        # atom 0 small, atom 1 large: 0 lies inside scaled 1, scaled 0 inside 1 (inactive)
        radius, scale = {0: (0.1, 0.5), 1: (0.35, 1.6)}.get(i, (rng.uniform(0.1, 0.3), 1.0))
        gb.addParticle(q, radius, scale * rng.uniform(0.8, 1.0))
    nb.addException(0, 1, 0.0, 1.0, 0.0)  # exclusion
    nb.addException(1, 2, 0.3, 0.2, 0.5)  # scaled 1-4 with its own sigma
    nb.addException(2, 3, 0.0, 0.25, 0.7)  # LJ only
    nb.addException(3, 4, -0.4, 0.3, 0.0)  # Coulomb only
    nb.setForceGroup(1)
    system.addForce(nb)
    if gbsa:
        gb.setForceGroup(2)
        system.addForce(gb)
    frames = []
    while len(frames) < 40:
        x = rng.uniform(0.0, 0.7, size=(n, 3))
        direction = rng.normal(size=3)
        x[1] = x[0] + rng.uniform(0.15, 0.25) * direction / np.linalg.norm(direction)
        if np.linalg.norm(x[:, None] - x[None], axis=-1)[np.triu_indices(n, 1)].min() >= 0.12:
            frames.append(x)
    return system, np.array(frames)


@pytest.mark.parametrize("gbsa", [False, True])
def test_random_parameters_all_branches(gbsa):
    system, xs = random_system(3, gbsa)
    e_ref, f_ref = openmm_eval(system, xs)
    for analytic in (True, False):
        ff = TorchForceField.from_openmm(system, analytic_grad=analytic).double()
        e, f = torch_eval(ff, xs, torch.float64)
        assert_agree(e, f, e_ref, f_ref, np.maximum(1e-6 * np.abs(e_ref), 1e-3), 1e-3)
    with torch.no_grad():  # graph-free energy path
        u = ff(torch.as_tensor(xs.reshape(len(xs), -1)))
    np.testing.assert_allclose(u.numpy() * ff.kT, e_ref, rtol=1e-9, atol=1e-6)
    if gbsa:
        e_gb, _ = openmm_eval(system, xs, {2})
        assert np.abs(e_gb).min() > 1.0  # the GB term is not negligible
        terms = ff.energy_terms(torch.as_tensor(xs.reshape(len(xs), -1)))
        np.testing.assert_allclose(terms["GBSAOBCForce"].numpy(), e_gb, rtol=1e-9)
        # the configurations reach OpenMM's special GBSA branches
        term = ff.terms[-1]
        i, j = term.atoms.numpy()
        r = np.linalg.norm(xs[:, j] - xs[:, i], axis=-1)[:, None]  # (batch, 1, pairs)
        offset_i, scaled_j = term.offset_i.numpy(), term.scaled_j.numpy()  # (2, pairs)
        assert (offset_i < scaled_j - r).any()  # I inside scaled J
        assert (offset_i >= r + scaled_j).any()  # inactive pair


def test_coulomb_constant_is_openmms():
    system = openmm.System()
    nb = openmm.NonbondedForce()
    for q in (1.0, -1.0):
        system.addParticle(1.0)
        nb.addParticle(q, 1.0, 0.0)
    system.addForce(nb)
    e_ref, _ = openmm_eval(system, np.array([[[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]]]))
    assert e_ref[0] == pytest.approx(-ONE_4PI_EPS0 / 0.5, rel=1e-12)
    ff = TorchForceField.from_openmm(system).double()
    x = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.0, 0.0]], dtype=torch.float64)
    assert ff(x).item() * ff.kT == pytest.approx(e_ref[0], rel=1e-12)


def _with(system: openmm.System, change) -> openmm.System:
    system = copy.deepcopy(system)
    change(system)
    return system


def _force(system: openmm.System, cls):
    return next(f for f in system.getForces() if isinstance(f, cls))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.addForce(openmm.CustomExternalForce("x")), "CustomExternalForce"),
        (
            lambda s: _force(s, openmm.NonbondedForce).setNonbondedMethod(
                openmm.NonbondedForce.CutoffNonPeriodic
            ),
            "NonbondedForce",
        ),
        (
            lambda s: _force(s, openmm.HarmonicBondForce).setUsesPeriodicBoundaryConditions(True),
            "HarmonicBondForce",
        ),
        (
            lambda s: _force(s, openmm.GBSAOBCForce).setNonbondedMethod(
                openmm.GBSAOBCForce.CutoffNonPeriodic
            ),
            "GBSAOBCForce",
        ),
        (lambda s: s.addForce(openmm.MonteCarloBarostat(1.0, 300.0)), "MonteCarloBarostat"),
    ],
)
def test_unsupported_force_raises(change, match):
    system, _ = build_system("aldp_implicit")
    with pytest.raises(ValueError, match=match):
        TorchForceField.from_openmm(_with(system, change))


def test_cmmotion_remover_is_ignored():
    system, x0 = build_system("aldp_vacuum")
    assert any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces())
    TorchForceField.from_openmm(system)


def test_empty_forces_and_batches():
    system = openmm.System()
    nb, gb = openmm.NonbondedForce(), openmm.GBSAOBCForce()
    for _ in range(3):
        system.addParticle(1.0)
        nb.addParticle(0.0, 0.3, 0.0)
        gb.addParticle(0.0, 0.15, 1.0)
    for force in (openmm.HarmonicBondForce(), openmm.HarmonicAngleForce(), nb, gb):
        system.addForce(force)
    system.addForce(openmm.PeriodicTorsionForce())
    ff = TorchForceField.from_openmm(system).double()
    for batch in (0, 1, 3):
        xs = np.random.default_rng(batch).uniform(0, 1, size=(batch, 3, 3))
        e, f = torch_eval(ff, xs, torch.float64)
        if batch:
            e_ref, f_ref = openmm_eval(system, xs)
            assert_agree(e, f, e_ref, f_ref, 1e-6, 1e-6)
        else:
            assert e.shape == (0,) and f.shape == (0, 3, 3)


def test_wrong_shapes_raise():
    system, x0 = build_system("aldp_vacuum")
    ff = TorchForceField.from_openmm(system)
    for bad in (torch.zeros(66), torch.zeros(2, 65), torch.zeros(2, 22, 2), torch.zeros(1, 2, 3)):
        with pytest.raises(ValueError, match="expects x of shape"):
            ff(bad)


def test_is_an_energy_and_interchangeable():
    system, x0 = build_system("aldp_vacuum")
    holder = SimpleNamespace(system=system, temperature=310.0)
    ff = TorchForceField.from_openmm(holder)
    assert isinstance(ff, Energy) and ff.dim == 66 and ff.n_atoms == 22
    assert ff.temperature == 310.0

    def generic(energy: Energy, x: torch.Tensor) -> torch.Tensor:  # any code using energy(x)
        return energy(x).mean()

    x = torch.tensor(x0.reshape(1, -1) + 0.01 * np.random.default_rng(0).normal(size=(8, 66)))
    x32 = x.float().requires_grad_(True)
    loss = generic(ff, x32)  # float64 buffers, float32 input: works in float32
    loss.backward()
    assert loss.dtype == torch.float32 and x32.grad.shape == x32.shape
    ff32 = ff.to(torch.float32)
    floats = [b for b in ff32.buffers() if b.is_floating_point()]
    assert floats and all(b.dtype == torch.float32 for b in floats)
    assert all(b.dtype == torch.int64 for b in ff32.buffers() if not b.is_floating_point())
    assert torch.allclose(generic(ff32, x.float()), loss.detach())


def test_interchangeable_with_openmm_energy():
    pytest.importorskip("bgflow_mini.energies.openmm")
    from bgflow_mini.energies.openmm import OpenMMEnergy

    system, x0 = build_system("aldp_implicit")
    x = torch.tensor(x0.reshape(1, -1) + 0.01 * np.random.default_rng(1).normal(size=(6, 66)))
    grads = []
    for energy in (
        TorchForceField.from_openmm(system, temperature=300.0),
        OpenMMEnergy(system, platform="Reference", n_workers=0, temperature=300.0),
    ):
        xx = x.clone().requires_grad_(True)
        u = energy(xx)
        (g,) = torch.autograd.grad(u.sum(), xx)
        grads.append((u.detach(), g))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-7, atol=1e-5)


def test_load_system_convenience():
    systems = pytest.importorskip("bgflow_mini.systems")
    mol = systems.load_system("aldp_implicit")
    ff = TorchForceField.from_openmm(mol)
    assert ff.temperature == mol.temperature and ff.kT == pytest.approx(mol.kT)
    e_ref, _ = openmm_eval(mol.system, mol.positions[None])
    u = ff(torch.as_tensor(mol.positions.reshape(1, -1)))
    assert u.item() * ff.kT == pytest.approx(e_ref[0], abs=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("max_chunk_elements", [1 << 22, 500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(aldp, dtype, max_chunk_elements):
    ff = TorchForceField.from_openmm(aldp.system, max_chunk_elements=max_chunk_elements)
    ff = ff.to(dtype)
    e_cpu, f_cpu = torch_eval(ff, aldp.xs, dtype)
    tol = 1e-6 if dtype == torch.float64 else 1e-2
    for module_device in ("cuda", "cpu"):  # buffers on the GPU, or copied per call
        ff_dev = ff.to(module_device)
        x = torch.tensor(aldp.xs.reshape(len(aldp.xs), -1), dtype=dtype, device="cuda")
        x.requires_grad_(True)
        u = ff_dev(x)
        (grad,) = torch.autograd.grad(u.sum(), x)
        assert u.device.type == "cuda" and grad.device.type == "cuda"
        np.testing.assert_allclose(u.detach().cpu().double().numpy() * ff.kT, e_cpu, atol=tol)
        f_gpu = -grad.cpu().double().numpy().reshape(aldp.xs.shape) * ff.kT
        np.testing.assert_allclose(f_gpu, f_cpu, atol=100 * tol)
        with torch.no_grad():
            u_plain = ff_dev(x.detach())
        np.testing.assert_allclose(u_plain.cpu().double().numpy() * ff.kT, e_cpu, atol=tol)
