"""Tests of the shipped system folders and ``bgflow_mini.systems.load_system``."""

from __future__ import annotations

import shutil
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import pytest
import torch
import yaml
from openmm import app, unit

from bgflow_mini import cv as cvmod
from bgflow_mini import systems as systems_module
from bgflow_mini.systems import (
    MolecularSystem,
    SystemConfigError,
    available_systems,
    load_system,
)

SYSTEMS = Path(__file__).resolve().parent.parent / "systems"
VARIANTS = ["aldp_vacuum", "aldp_implicit"]


def _copy(tmp_path: Path, name: str = "aldp_vacuum") -> Path:
    dst = tmp_path / "mysys"
    shutil.copytree(SYSTEMS / name, dst)
    return dst


def _edit_yaml(folder: Path, **changes) -> None:
    cfg = yaml.safe_load((folder / "system.yaml").read_text())
    cfg.update(changes)
    (folder / "system.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize("name", VARIANTS)
def test_load_variants(name):
    s = load_system(name)
    assert isinstance(s, MolecularSystem)
    assert s.name == name and s.path == (SYSTEMS / name).resolve()
    assert s.n_atoms == 22 and s.dim == 66
    assert s.positions.shape == (22, 3) and s.positions.dtype == np.float64
    assert s.system.getNumParticles() == 22 and s.topology.getNumAtoms() == 22
    assert s.mdtraj_topology.n_atoms == 22 and s.mdtraj_topology.n_bonds == 21
    assert s.temperature == 300.0
    r = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
    assert s.kT == pytest.approx(r * 300.0) and s.kT == pytest.approx(2.4943, abs=1e-4)
    forces = {type(f).__name__ for f in s.system.getForces()}
    assert ("GBSAOBCForce" in forces) == (name == "aldp_implicit")
    # no constraints, NoCutoff
    assert s.system.getNumConstraints() == 0
    nb = next(f for f in s.system.getForces() if isinstance(f, openmm.NonbondedForce))
    assert nb.getNonbondedMethod() == openmm.NonbondedForce.NoCutoff
    assert set(s.cvs) == {"phi", "psi"} and "phi_positive" in s.states


def test_available_systems():
    assert set(VARIANTS) <= set(available_systems())


@pytest.mark.parametrize("name", VARIANTS)
def test_cvs_match_mdtraj(name):
    s = load_system(name)
    rng = np.random.default_rng(1)
    x = s.positions[None] + 0.02 * rng.normal(size=(20, 22, 3))
    x[0] = s.positions
    traj = mdtraj.Trajectory(x, s.mdtraj_topology)
    for cv, fn in (("phi", mdtraj.compute_phi), ("psi", mdtraj.compute_psi)):
        idx, ref = fn(traj)
        assert idx.tolist() == [s.cvs[cv]["atoms"]]
        got = s.compute_cvs(torch.as_tensor(x))[cv]
        assert isinstance(got, torch.Tensor) and got.shape == (20,)
        np.testing.assert_allclose(got.numpy(), ref[:, 0], atol=1e-5)
        flat = s.compute_cvs(torch.as_tensor(x.reshape(20, 66)), [cv])
        assert list(flat) == [cv]
        np.testing.assert_allclose(flat[cv].numpy(), ref[:, 0], atol=1e-5)
        as_np = s.compute_cvs(x)[cv]  # numpy in, numpy out
        assert isinstance(as_np, np.ndarray) and as_np.dtype == np.float64
        np.testing.assert_allclose(as_np, ref[:, 0], atol=1e-5)
        # the method is the cv module's implementation, not a copy
        np.testing.assert_array_equal(as_np, cvmod.compute_cvs(x, s.cvs)[cv])


def test_reference_structure_is_sensible():
    s = load_system("aldp_vacuum")
    cv = s.compute_cvs(s.positions[None])
    assert -2.5 < float(cv["phi"][0]) < -1.0 and 0.5 < float(cv["psi"][0]) < 3.0
    x = s.positions
    lengths = [np.linalg.norm(x[a.index] - x[b.index]) for a, b in s.topology.bonds()]
    assert 0.095 < min(lengths) and max(lengths) < 0.16
    # minimised (up to the 1e-4 nm PDB rounding): re-minimising gains < 0.5 kJ/mol
    ctx = openmm.Context(s.system, openmm.VerletIntegrator(0.001))
    ctx.setPositions(x)
    e0 = ctx.getState(getEnergy=True).getPotentialEnergy()._value
    openmm.LocalEnergyMinimizer.minimize(ctx, 0.1)
    e1 = ctx.getState(getEnergy=True).getPotentialEnergy()._value
    assert e0 - e1 < 0.5, (e0, e1)
    assert not s.in_state("phi_positive", x[None])[0] and s.in_state("phi_negative", x[None])[0]


def _with_phi(s: MolecularSystem, phis: list[float]) -> np.ndarray:
    """Copies of the reference structure whose phi atoms are placed to give torsions ``phis``."""
    i, j, k, m = s.cvs["phi"]["atoms"]
    x = np.repeat(s.positions[None], len(phis), axis=0)
    x[:, j] = [0.0, 0.0, 0.0]
    x[:, k] = [0.0, 0.0, 0.15]
    x[:, i] = [0.1, 0.0, -0.05]
    for n, phi in enumerate(phis):
        x[n, m] = [0.1 * np.cos(phi), 0.1 * np.sin(phi), 0.2]
    return x


def test_in_state_uses_periodic_torsion_ranges(tmp_path):
    folder = _copy(tmp_path)
    # [2.5, 4.0] rad crosses the +-pi cut: it selects phi >= 2.5 or phi < 4 - 2 pi = -2.283
    _edit_yaml(
        folder,
        states={
            "across_cut": {"phi": [2.5, 4.0]},
            "phi_negative": {"phi": [-np.pi, 0.0]},
            "both": {"phi": [2.5, 4.0], "psi": [-10.0, 10.0]},
        },
    )
    s = load_system(folder)
    phis = [3.0, -3.0, -2.0, 0.0, 2.6, -2.5]
    x = _with_phi(s, phis)
    traj = mdtraj.Trajectory(x, s.mdtraj_topology)
    np.testing.assert_allclose(mdtraj.compute_phi(traj)[1][:, 0], phis, atol=1e-5)
    expect = [True, True, False, False, True, True]
    assert s.in_state("across_cut", x).tolist() == expect
    assert s.in_state("across_cut", torch.as_tensor(x)).tolist() == expect
    assert s.in_state("both", x).tolist() == expect
    assert s.in_state("phi_negative", x).tolist() == [False, True, True, False, False, True]
    # lo <= phi < hi: the lower bound is included, the upper one is not (exact CV values)
    edges = _with_phi(s, [0.5, 2.0, 1.0])
    v = s.compute_cvs(edges)["phi"]
    s.states["edge"] = {"phi": [float(v[0]), float(v[1])]}
    assert s.in_state("edge", edges).tolist() == [True, False, True]
    with pytest.raises(KeyError, match="unknown state 'nope'"):
        s.in_state("nope", x)


def test_cv_implementation_lives_in_cv_module():
    assert not hasattr(systems_module, "compute_cv")
    assert not hasattr(systems_module, "CV_TYPES")


def test_same_pdb_in_both_variants():
    a = (SYSTEMS / "aldp_vacuum" / "aldp.pdb").read_text()
    b = (SYSTEMS / "aldp_implicit" / "aldp.pdb").read_text()
    assert a == b


def test_user_folder_loads(tmp_path):
    folder = _copy(tmp_path)
    _edit_yaml(folder, name="custom", temperature=350)
    for arg in (folder, str(folder)):
        s = load_system(arg)
        assert s.name == "custom" and s.temperature == 350.0 and s.n_atoms == 22
        assert s.path == folder.resolve()
    np.testing.assert_allclose(s.positions, load_system("aldp_vacuum").positions)


def test_env_var_search_path(tmp_path, monkeypatch):
    _copy(tmp_path)
    monkeypatch.setenv("BGFLOW_MINI_SYSTEMS", str(tmp_path))
    assert "mysys" in available_systems()
    assert load_system("mysys").n_atoms == 22


def test_unknown_name():
    with pytest.raises(SystemConfigError, match="unknown system 'nope'.*aldp_vacuum"):
        load_system("nope")
    assert issubclass(SystemConfigError, ValueError)


def test_missing_folder_yaml_pdb(tmp_path):
    with pytest.raises(SystemConfigError, match="does not exist"):
        load_system(tmp_path / "absent")
    folder = _copy(tmp_path)
    (folder / "aldp.pdb").unlink()
    with pytest.raises(SystemConfigError, match="missing PDB file"):
        load_system(folder)
    (folder / "system.yaml").unlink()
    with pytest.raises(SystemConfigError, match="missing system.yaml"):
        load_system(folder)


def test_bad_yaml_key(tmp_path):
    folder = _copy(tmp_path)
    _edit_yaml(folder, temprature=300)
    with pytest.raises(SystemConfigError, match=r"unknown key\(s\) \['temprature'\].*valid keys"):
        load_system(folder)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"nonbonded_method": "Magic"}, "nonbonded_method"),
        ({"constraints": "Everything"}, "constraints"),
        ({"temperature": -5}, "temperature"),
        ({"forcefield": ["no_such_ff.xml"]}, "cannot load force field"),
        ({"states": {"s": {"chi": [0.0, 1.0]}}}, "unknown CV 'chi'"),
        ({"states": {"s": {"phi": [1.0, 1.0]}}}, "low < high"),
        (
            {
                "cvs": {"d": {"type": "distance", "atoms": [5, 17]}},
                "states": {"s": {"d": [0.3, 0.2]}},
            },
            "low < high",
        ),
    ],
)
def test_bad_values(tmp_path, changes, match):
    folder = _copy(tmp_path)
    _edit_yaml(folder, **changes)
    with pytest.raises(SystemConfigError, match=match):
        load_system(folder)


def test_torsion_state_may_wrap_across_pi(tmp_path):
    folder = _copy(tmp_path)
    _edit_yaml(folder, states={"a": {"phi": [-1.0, 0.0]}, "alpha_l_wrap": {"phi": [2.5, -2.5]}})
    system = load_system(folder)
    assert system.states["alpha_l_wrap"] == {"phi": [2.5, -2.5]}
    x = np.asarray(system.positions).reshape(1, -1)
    assert system.in_state("alpha_l_wrap", x).shape == (1,)


@pytest.mark.parametrize(
    "atoms", [[4, 6, 8, 22], [4, 6, 8], [4, 6, 8, -1], [4, 4, 8, 14], [4, 6, 8, 1.5]]
)
def test_bad_cv_indices(tmp_path, atoms):
    folder = _copy(tmp_path)
    _edit_yaml(folder, cvs={"phi": {"type": "torsion", "atoms": atoms}})
    with pytest.raises(SystemConfigError, match="CV 'phi'.*atoms must be 4 distinct"):
        load_system(folder)


def test_untemplatable_pdb(tmp_path):
    folder = _copy(tmp_path)
    pdb = folder / "aldp.pdb"
    pdb.write_text(pdb.read_text().replace(" ALA A", " XYZ A"))
    with pytest.raises(SystemConfigError, match=r"cannot build a system.*XYZ2.*No template"):
        load_system(folder)


def test_pdb_roundtrip_positions_match_openmm():
    s = load_system("aldp_vacuum")
    pdb = app.PDBFile(str(SYSTEMS / "aldp_vacuum" / "aldp.pdb"))
    ref = pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    np.testing.assert_allclose(s.positions, ref)
