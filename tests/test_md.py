"""Tests of plain Langevin MD and replica exchange (bgflow_mini.md, bgflow_mini.replica)."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import numpy as np
import openmm
import pytest
from openmm import app
from scipy.integrate import quad

from bgflow_mini.md import (
    count_transitions,
    degrees_of_freedom,
    geometric_ladder,
    repartition_hydrogen_mass,
    replica_exchange,
    resolve_settings,
    simulate,
)
from bgflow_mini.units import MOLAR_GAS_CONSTANT, kt_kjmol

# Tilted double well in x, harmonic in y and z (kJ/mol, nm); one particle of 1 amu.
A, B, K = 8.0, 2.0, 50.0


def double_well(a: float = A, b: float = B, k: float = K, mass: float = 1.0) -> SimpleNamespace:
    """One particle in V = a (x^2 - 1)^2 + b x + k/2 (y^2 + z^2)."""
    system = openmm.System()
    system.addParticle(mass)
    force = openmm.CustomExternalForce("a*(x^2-1)^2 + b*x + 0.5*k*(y^2+z^2)")
    for name, value in (("a", a), ("b", b), ("k", k)):
        force.addGlobalParameter(name, value)
    force.addParticle(0, [])
    system.addForce(force)
    top = app.Topology()
    res = top.addResidue("DW", top.addChain())
    top.addAtom("X", app.element.argon, res)
    pos = np.array([[-1.0, 0.0, 0.0]])
    return SimpleNamespace(system=system, topology=top, positions=pos, temperature=300.0)


def exact_positive_fraction(temperature: float, a: float = A, b: float = B) -> float:
    """p(x > 0) at ``temperature`` by numerical quadrature."""
    beta = 1.0 / kt_kjmol(temperature)

    def w(x: float) -> float:
        return math.exp(-beta * (a * (x * x - 1.0) ** 2 + b * x))

    pos = quad(w, 0.0, 3.0)[0]
    return pos / (pos + quad(w, -3.0, 0.0)[0])


def block_se(values: np.ndarray, n_blocks: int = 20) -> float:
    """Standard error of the mean from ``n_blocks`` contiguous block means."""
    blocks = np.array([b.mean() for b in np.array_split(np.asarray(values, float), n_blocks)])
    return float(blocks.std(ddof=1) / math.sqrt(n_blocks))


def test_geometric_ladder() -> None:
    t = geometric_ladder(300.0, 1000.0, 8)
    assert t[0] == pytest.approx(300.0) and t[-1] == pytest.approx(1000.0)
    ratios = t[1:] / t[:-1]
    assert np.allclose(ratios, ratios[0])
    assert geometric_ladder(300.0, 1000.0, 1).tolist() == [300.0]
    with pytest.raises(ValueError):
        geometric_ladder(300.0, 200.0, 4)


def test_count_transitions_hysteresis() -> None:
    d = math.radians
    # noise around 0 (inside the +-20 deg band) is not a transition
    phi = np.array([d(-60), d(-5), d(5), d(-5), d(5), d(-70), d(60), d(10), d(70), d(-60)])
    assert count_transitions(phi) == 2
    assert count_transitions(np.full(5, d(-60))) == 0


@pytest.mark.parametrize("n_workers", [1, 2])
def test_replica_exchange_double_well_populations(n_workers: int) -> None:
    """Populations of x > 0 and <y^2 + z^2> at every temperature match the exact values,
    in-process and with the replicas split over two worker processes."""
    temps = [300.0, 600.0, 1200.0]
    res = replica_exchange(
        double_well(),
        temps,
        n_frames=6000,
        save_every=20,
        swap_every=20,
        timestep=0.005,
        friction=5.0,
        equilibration_steps=2000,
        n_workers=n_workers,
        keep_all=True,
        progress=False,
    )
    acc = np.asarray(res.info["swap_acceptance"])
    assert acc.shape == (2,) and np.all((acc > 0.05) & (acc < 0.95))
    assert res.info["round_trips"] > 10
    for i, t in enumerate(temps):
        xyz = res.replica_positions[i, :, 0, :]
        ind = (xyz[:, 0] > 0).astype(float)
        p, se, exact = ind.mean(), block_se(ind), exact_positive_fraction(t)
        assert se < 0.03, f"T={t}: too noisy to test (se={se:.3f})"
        assert abs(p - exact) < 4 * se + 0.005, (
            f"T={t}: p(x>0)={p:.3f}+-{se:.3f}, exact {exact:.3f}"
        )
        t_kin = (
            2 * res.kinetic_energies[i] / (3 * MOLAR_GAS_CONSTANT)
        )  # 3 DOF, no CM motion remover
        assert abs(t_kin.mean() - t) < 4 * block_se(t_kin) + 0.01 * t, (t, t_kin.mean())
        r2 = (xyz[:, 1] ** 2 + xyz[:, 2] ** 2).astype(float)
        expect = 2 * kt_kjmol(t) / K
        assert abs(r2.mean() - expect) < 4 * block_se(r2) + 0.01 * expect
    # the tilt makes the populations differ from 1/2 and from each other
    assert exact_positive_fraction(300.0) < 0.2 < 0.4 < exact_positive_fraction(1200.0)


def _short_remd(seed: int, n_workers: int = 1) -> np.ndarray:
    res = replica_exchange(
        double_well(),
        [300.0, 700.0],
        n_frames=50,
        save_every=10,
        swap_every=10,
        timestep=0.005,
        equilibration_steps=100,
        seed=seed,
        n_workers=n_workers,
        progress=False,
    )
    return np.concatenate([res.trajectory.xyz.ravel(), res.walkers.ravel()])


def test_same_seed_same_trajectory_and_different_seed_differs() -> None:
    a, b, c = _short_remd(1), _short_remd(1), _short_remd(2)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_worker_processes_reproducible() -> None:
    """Same seed and worker count -> identical; the Reference platform shares one random
    stream among the contexts of a process, so the worker count changes the noise."""
    assert np.array_equal(_short_remd(3, n_workers=2), _short_remd(3, n_workers=2))


def test_worker_error_is_reported() -> None:
    with pytest.raises(RuntimeError, match="replica worker .* failed"):
        replica_exchange(
            double_well(),
            [300.0, 400.0],
            2,
            10,
            platform="NoSuchPlatform",
            n_workers=2,
            progress=False,
        )


def test_plain_md_single_temperature_has_no_swaps() -> None:
    res = simulate(
        double_well(), 20, save_every=10, timestep=0.005, equilibration_steps=0, progress=False
    )
    assert res.info["n_replicas"] == 1 and res.info["swap_acceptance"] == []
    assert res.trajectory.n_frames == 20 and res.energies.shape == (20,)
    assert res.trajectory.time[-1] == pytest.approx(20 * 10 * 0.005)


@pytest.mark.parametrize("progress", [False, True])
def test_md_without_a_progress_bar_logs_each_tenth(
    progress: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the bar, a long MD run says how far it is (a log line per tenth); with it,
    nothing is logged twice."""
    with caplog.at_level("INFO", logger="bgflow_mini.replica"):
        simulate(double_well(), 40, save_every=5, timestep=0.005, equilibration_steps=0,
                 progress=progress)  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.name == "bgflow_mini.replica"]
    if progress:
        assert lines == []
        return
    assert [int(m.split()[1]) for m in lines] == list(range(10, 101, 10))
    assert all("200 steps per replica" in m and "min left" in m for m in lines)
    assert lines[-1].endswith("about 0.0 min left")


def test_resolve_settings() -> None:
    s = resolve_settings({"n_replicas": 4, "t_max": 600.0}, 300.0)
    assert s["temperatures"][0] == 300.0 and s["temperatures"][-1] == 600.0
    assert resolve_settings({}, 300.0)["swap_every"] is None
    with pytest.raises(KeyError, match="n_frame"):
        resolve_settings({"n_frame": 10}, 300.0)


def test_resolve_settings_hydrogen_mass_only_when_set() -> None:
    """Caches made before the option keep their keys: no ``hydrogen_mass`` entry unless set."""
    assert "hydrogen_mass" not in resolve_settings({}, 300.0)
    assert "hydrogen_mass" not in resolve_settings({"hydrogen_mass": None}, 300.0)
    assert resolve_settings({"hydrogen_mass": 4}, 300.0)["hydrogen_mass"] == 4.0


def _masses(system: openmm.System) -> np.ndarray:
    amu = openmm.unit.dalton
    return np.array(
        [system.getParticleMass(i).value_in_unit(amu) for i in range(system.getNumParticles())]
    )


def _energy(system: openmm.System, positions: np.ndarray) -> float:
    integ = openmm.VerletIntegrator(0.001)
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(positions)
    kj = openmm.unit.kilojoule_per_mole
    return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(kj)


def test_repartition_hydrogen_mass_aldp() -> None:
    systems = pytest.importorskip("bgflow_mini.systems")
    aldp = systems.load_system("aldp_vacuum")
    before = _masses(aldp.system)
    hmr = repartition_hydrogen_mass(aldp.system, aldp.topology, 4.0)
    after = _masses(hmr)
    np.testing.assert_array_equal(_masses(aldp.system), before)  # the input is untouched
    is_h = np.array([a.element.symbol == "H" for a in aldp.topology.atoms()])
    assert is_h.sum() == 12
    np.testing.assert_allclose(after[is_h], 4.0)
    assert after.sum() == pytest.approx(before.sum(), abs=1e-9)  # mass moved, not made
    # each heavy atom gave (4 - 1.008) per bonded hydrogen: a methyl carbon three times
    lost = before - after
    n_h = np.zeros(len(before))
    for bond in aldp.topology.bonds():
        a, b = bond[0], bond[1]
        for h, heavy in ((a, b), (b, a)):
            if h.element.symbol == "H" and heavy.element.symbol != "H":
                n_h[heavy.index] += 1
    np.testing.assert_allclose(lost[~is_h], n_h[~is_h] * (4.0 - before[is_h][0]), atol=1e-9)
    assert n_h.max() == 3
    pos = np.asarray(aldp.positions)
    assert _energy(hmr, pos) == pytest.approx(_energy(aldp.system, pos), rel=1e-12)
    with pytest.raises(ValueError, match="positive"):
        repartition_hydrogen_mass(aldp.system, aldp.topology, 0.0)
    with pytest.raises(ValueError, match="< 1 amu"):  # a methyl carbon cannot give 3 x 4 amu
        repartition_hydrogen_mass(aldp.system, aldp.topology, 5.5)


def test_repartition_hydrogen_mass_needs_a_bonded_heavy_atom() -> None:
    system = openmm.System()
    system.addParticle(1.008)
    top = app.Topology()
    top.addAtom("H1", app.element.hydrogen, top.addResidue("HYD", top.addChain()))
    with pytest.raises(ValueError, match="no bond to a heavy atom"):
        repartition_hydrogen_mass(system, top, 4.0)


def test_repartitioned_masses_at_2fs_sample_the_same_energy() -> None:
    """Masses do not enter exp(-U/kT): 300 K MD of ALDP with 4-amu hydrogens at 2 fs has the
    mean potential energy of MD with the force field's masses at 1 fs, within 4 combined
    block standard errors (measured over 4 ns each: -14.77 +- 0.20 vs -14.99 +- 0.25 kJ/mol);
    the kinetic temperature is 300 K. A thermostat 10 % off would move <U> by ~8 kJ/mol."""
    systems = pytest.importorskip("bgflow_mini.systems")
    aldp = systems.load_system("aldp_vacuum")
    runs = {}
    for dt, mass in ((0.001, None), (0.002, 4.0)):
        every = round(0.1 / dt)  # a frame every 0.1 ps, 250 ps
        runs[dt] = simulate(
            aldp,
            2500,
            save_every=every,
            timestep=dt,
            friction=10.0,
            hydrogen_mass=mass,
            equilibration_steps=every * 50,
            seed=3,
            progress=False,
        )
    (u1, r1), (u2, r2) = ((r.energies, r) for r in runs.values())
    se = math.hypot(block_se(u1), block_se(u2))
    assert se < 2.0
    assert abs(u1.mean() - u2.mean()) < 4 * se, (u1.mean(), u2.mean(), se)
    assert r2.info["hydrogen_mass"] == 4.0 and r1.info["hydrogen_mass"] is None
    dof = r2.info["degrees_of_freedom"]
    t_kin = 2 * r2.kinetic_energies[0] / (dof * MOLAR_GAS_CONSTANT)
    assert abs(t_kin.mean() - 300.0) < 4 * block_se(t_kin) + 0.02 * 300.0


class _Captured(Exception):
    pass


@pytest.mark.parametrize("n_workers", [1, 2])
def test_simulate_hands_the_repartitioned_system_to_the_replicas(
    monkeypatch: pytest.MonkeyPatch, n_workers: int
) -> None:
    """The System that reaches run_replicas (which serialises it for worker processes)
    carries the 4-amu hydrogens; the caller's System keeps its masses."""
    systems = pytest.importorskip("bgflow_mini.systems")
    import bgflow_mini.md as md

    aldp = systems.load_system("aldp_vacuum")
    seen = {}

    def fake_run_replicas(system, *args, **kwargs):
        seen["masses"], seen["n_workers"] = _masses(system), kwargs["n_workers"]
        raise _Captured

    monkeypatch.setattr(md, "run_replicas", fake_run_replicas)
    with pytest.raises(_Captured):
        simulate(aldp, 10, timestep=0.002, hydrogen_mass=4.0, n_workers=n_workers)
    is_h = np.array([a.element.symbol == "H" for a in aldp.topology.atoms()])
    np.testing.assert_allclose(seen["masses"][is_h], 4.0)
    assert seen["n_workers"] == n_workers
    assert _masses(aldp.system)[is_h] == pytest.approx(1.008, abs=1e-3)


def test_long_timestep_without_heavier_hydrogens_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    systems = pytest.importorskip("bgflow_mini.systems")
    import bgflow_mini.md as md

    def fake_run_replicas(*args, **kwargs):
        raise _Captured

    monkeypatch.setattr(md, "run_replicas", fake_run_replicas)
    aldp = systems.load_system("aldp_vacuum")
    with pytest.warns(UserWarning, match="hydrogen_mass=4.0"), pytest.raises(_Captured):
        simulate(aldp, 10, timestep=0.002)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1 fs, or 2 fs with heavier hydrogens: no warning
        for kwargs in ({"timestep": 0.001}, {"timestep": 0.002, "hydrogen_mass": 4.0}):
            with pytest.raises(_Captured):
                simulate(aldp, 10, **kwargs)


def test_aldp_kinetic_temperature() -> None:
    """Mean kinetic temperature of a short ALDP run is within error of 300 K.

    63 DOF: one frame's kinetic temperature has relative std sqrt(2/63) = 18% (53 K).
    With friction 10/ps the kinetic energy decorrelates in ~0.1 ps, so 600 frames 50 fs
    apart give a block standard error of ~3-4 K (the test insists on < 6 K). Allowed:
    4 standard errors plus 1% for the O(dt^2) half-step-velocity bias of the
    LangevinMiddle integrator (measured: 300.2 +- 5.7 K over 100 ps at 1 fs). A 10% wrong
    thermostat (30 K) would fail.
    """
    systems = pytest.importorskip("bgflow_mini.systems")
    aldp = systems.load_system("aldp_vacuum")
    res = simulate(
        aldp, 600, save_every=50, friction=10.0, equilibration_steps=2000, seed=5, progress=False
    )
    assert degrees_of_freedom(aldp.system) == 63
    t_kin = 2 * res.kinetic_energies[0] / (63 * MOLAR_GAS_CONSTANT)
    se = block_se(t_kin)
    assert se < 6.0
    assert abs(t_kin.mean() - 300.0) < 4 * se + 0.01 * 300.0, (t_kin.mean(), se)
    assert res.trajectory.n_atoms == 22 and res.trajectory.n_frames == 600
    assert "phi_positive_fraction" in res.info and "phi_transitions" in res.info
    assert res.info["cis_peptide_fraction"] == 0.0  # trans peptides stay trans at 300 K
    assert np.all(np.isfinite(res.energies)) and res.energies.std() > 1.0
