"""One interface over toys and molecules: specs rebuild targets, fingerprints guard them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bgflow_mini import cv as cvmod
from bgflow_mini.energies import DoubleWell, MuellerBrown
from bgflow_mini.targets import (
    MolecularTarget,
    ToyTarget,
    UnsupportedSystemError,
    as_target,
    load_target,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("energy", [DoubleWell(), DoubleWell(c=0.5, dim=3), MuellerBrown()])
def test_toy_spec_round_trip_and_states(energy) -> None:
    target = as_target(energy)
    again = load_target(target.spec())
    assert isinstance(again, ToyTarget) and again.fingerprint() == target.fingerprint()
    x = torch.randn(64, energy.dim, dtype=torch.float64)
    torch.testing.assert_close(again.energy()(x), energy(x))
    # the states A/B are the energy's own state definition, and the exact dF is its value
    a = torch.as_tensor(cvmod.in_state(cvmod.compute_cvs(x, target.cvs), target.states["A"]))
    assert torch.equal(a, torch.as_tensor(energy.in_state_a(x)))
    assert target.default_states == ("A", "B") and target.reference_delta_f("B", "A") == (
        -energy.free_energy_difference()
    )
    assert target.reference_delta_f("A", "A") is None


def test_changed_toy_is_refused() -> None:
    spec = as_target(DoubleWell()).spec()
    spec["kwargs"]["c"] = 2.0  # another energy surface under the same fingerprint
    with pytest.raises(ValueError, match="fingerprint"):
        load_target(spec)


def test_molecular_target_by_path_and_name(tmp_path: Path) -> None:
    target = as_target("aldp_vacuum")
    assert isinstance(target, MolecularTarget) and target.dim == 66
    assert target.default_states == ("phi_negative", "phi_positive")
    assert target.reference_delta_f(*target.default_states) is None
    spec = target.spec()
    assert load_target(spec).fingerprint() == spec["fingerprint"]
    # a user folder with the same name but another force field: its own path is preferred
    folder = tmp_path / "aldp_vacuum"
    shutil.copytree(ROOT / "systems" / "aldp_vacuum", folder)
    text = (folder / "system.yaml").read_text().replace("amber99sbildn.xml", "amber14-all.xml")
    (folder / "system.yaml").write_text(text)
    mine = as_target(folder)
    assert mine.fingerprint() != spec["fingerprint"]
    assert load_target(mine.spec()).fingerprint() == mine.fingerprint()
    moved = {**mine.spec(), "path": str(tmp_path / "gone")}  # folder gone: shipped one differs
    with pytest.raises(ValueError, match="fingerprint"):
        load_target(moved)


def test_constrained_system_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "hbonds"
    shutil.copytree(ROOT / "systems" / "aldp_vacuum", folder)
    text = (folder / "system.yaml").read_text().replace("constraints: null", "constraints: HBonds")
    (folder / "system.yaml").write_text(text)
    target = as_target(folder)
    with pytest.raises(UnsupportedSystemError, match="constraints 'HBonds'"):
        target.check_supported()
    ref = torch.as_tensor(target.system.positions).reshape(1, -1).repeat(4, 1)
    with pytest.raises(UnsupportedSystemError):
        target.generator(ref + 1e-3 * torch.randn_like(ref), lambda **kw: None)
    as_target("aldp_vacuum").check_supported()  # the shipped systems are fine


def test_as_target_errors() -> None:
    with pytest.raises(TypeError, match="cannot make a target"):
        as_target(3.0)
    with pytest.raises(TypeError, match="ToyEnergy"):
        ToyTarget(torch.nn.Identity())  # type: ignore[arg-type]


def test_several_molecules_are_refused(tmp_path: Path) -> None:
    from openmm import Vec3, app, unit
    from openmm.app import element

    folder = tmp_path / "wet"
    shutil.copytree(ROOT / "systems" / "aldp_vacuum", folder)
    pdb = app.PDBFile(str(folder / "aldp.pdb"))
    water = app.Topology()
    res = water.addResidue("HOH", water.addChain())
    o = water.addAtom("O", element.oxygen, res)
    for name in ("H1", "H2"):
        water.addBond(o, water.addAtom(name, element.hydrogen, res))
    xyz = [Vec3(1.0, 1.0, 1.0), Vec3(1.0957, 1.0, 1.0), Vec3(0.976, 1.0927, 1.0)]
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.add(water, [v * unit.nanometer for v in xyz])
    with open(folder / "aldp.pdb", "w") as fh:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, fh)
    text = (folder / "system.yaml").read_text()
    text = text.replace("[amber99sbildn.xml]", "[amber99sbildn.xml, tip3p.xml]")
    (folder / "system.yaml").write_text(text)
    target = as_target(folder)
    with pytest.raises(UnsupportedSystemError, match=r"2 separate molecules.*3 atoms \(HOH\)"):
        target.check_supported()
