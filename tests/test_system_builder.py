"""Systems built from a sequence or a PDB (``bgflow_mini.system_builder``, ``bgflow-system``):
energies equal plain OpenMM, CVs equal mdtraj's, L residues, closed rings, PDB repair, clear
refusals, and the shipped built systems."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

pytest.importorskip("PeptideBuilder")
pytest.importorskip("pdbfixer")

from bgflow_mini import cv as cvmod  # noqa: E402
from bgflow_mini.energies import OpenMMEnergy  # noqa: E402
from bgflow_mini.peptide_geometry import AMINO_ACIDS, CHI2_ATOM, build_peptide, peptide_cvs  # noqa: E402
from bgflow_mini.system_builder import (  # noqa: E402
    SystemBuildError,
    build_system,
    check_supported_topology,
    forcefield_files,
    parse_sequence,
)
from bgflow_mini.systems import load_system  # noqa: E402
from bgflow_mini.units import kt_kjmol  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUILDS = {  # folder: (sequence, solvent, termini)
    "aa_obc": ("AA", "obc", "capped"),
    "pro": ("P", "vacuum", "capped"),
    "phe": ("F", "vacuum", "capped"),
    "trp": ("W", "vacuum", "capped"),
    "his": ("H", "vacuum", "capped"),
    "ga_zwitterion": ("GLY-ALA", "vacuum", "zwitterion"),
}
SHIPPED = {  # name: (atoms, first two states)
    "ala4_implicit": (42, ("phi_1_negative", "phi_1_positive")),
    "ala6_implicit": (62, ("phi_1_negative", "phi_1_positive")),
    "pro_dipeptide_vacuum": (26, ("pucker_down", "pucker_up")),
    "phe_dipeptide_vacuum": (32, ("phi_negative", "phi_positive")),
    "tyr_dipeptide_vacuum": (33, ("phi_negative", "phi_positive")),
    "trp_dipeptide_vacuum": (36, ("phi_negative", "phi_positive")),
    "his_dipeptide_vacuum": (29, ("phi_negative", "phi_positive")),
}
RINGS = {
    "PRO": {"N", "CA", "CB", "CG", "CD"},
    "PHE": {"CG", "CD1", "CD2", "CE1", "CE2", "CZ"},
    "TYR": {"CG", "CD1", "CD2", "CE1", "CE2", "CZ"},
    "TRP": {"CG", "CD1", "NE1", "CE2", "CD2", "CE3", "CZ2", "CZ3", "CH2"},
    "HIS": {"CG", "ND1", "CD2", "CE1", "NE2"},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("built")
    return {
        key: build_system(root / key, sequence=seq, solvent=solvent, termini=termini)
        for key, (seq, solvent, termini) in BUILDS.items()
    }


def _pdb(folder: Path) -> Path:
    return folder / load_system(folder).config["pdb"]


def _dihedral(x: np.ndarray, idx) -> float:
    t = mdtraj.Trajectory(x[None], None)
    return float(mdtraj.compute_dihedrals(t, np.array([idx]))[0, 0])


def _mdtraj_cvs(traj: mdtraj.Trajectory) -> dict[str, list[int]]:
    """The torsion CVs a built system should name, with the atoms mdtraj uses."""
    single = sum(r.name not in ("ACE", "NME") for r in traj.topology.residues) == 1
    expected = {}
    for cv, fn in (("phi", mdtraj.compute_phi), ("psi", mdtraj.compute_psi),
                   ("chi1", mdtraj.compute_chi1), ("chi2", mdtraj.compute_chi2)):  # fmt: skip
        for atoms in fn(traj)[0]:
            k = 1 + sum(r.name not in ("ACE", "NME") for r in traj.topology.residues
                        if r.index < traj.topology.atom(int(atoms[1])).residue.index)  # fmt: skip
            expected[cv if single else f"{cv}_{k}"] = [int(i) for i in atoms]
    # proline also gets omega of the peptide bond before it (CA or ACE's CH3, C, N, CA)
    for res in traj.topology.residues:
        if res.name == "PRO" and res.index > 0:
            before = traj.topology.residue(res.index - 1)
            first = [a.index for a in before.atoms if a.name in ("CA", "CH3")][0]
            k = 1 + sum(r.name not in ("ACE", "NME") for r in traj.topology.residues
                        if r.index < res.index)  # fmt: skip
            quad = [first, before.atom("C").index, res.atom("N").index, res.atom("CA").index]
            expected["omega" if single else f"omega_{k}"] = quad
    return expected


def _check_cvs_equal_mdtraj(system) -> None:
    traj = mdtraj.load(str(system.path / system.config["pdb"]))
    expected = _mdtraj_cvs(traj)
    assert {k: v["atoms"] for k, v in system.cvs.items()} == expected
    values = system.compute_cvs(system.positions[None].reshape(1, -1))
    for name, atoms in expected.items():  # same values (and sign convention) as mdtraj
        ref = mdtraj.compute_dihedrals(traj, np.array([atoms]))[0, 0]
        np.testing.assert_allclose(values[name][0], ref, atol=1e-5)


@pytest.mark.parametrize("key", ["aa_obc", "pro"])
def test_energy_equals_plain_openmm(built, key) -> None:
    seq, solvent, _ = BUILDS[key]
    system = load_system(built[key])
    pdb = app.PDBFile(str(_pdb(built[key])))
    ff = app.ForceField(*forcefield_files("amber99sbildn", solvent))
    plain = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    reference = openmm.Platform.getPlatformByName("Reference")
    ctx = openmm.Context(plain, openmm.VerletIntegrator(0.001), reference)
    rng = np.random.default_rng(0)
    x = system.positions[None] + 0.002 * rng.normal(size=(3, system.n_atoms, 3))
    ref = []
    for xi in x:
        ctx.setPositions(xi * unit.nanometer)
        e = ctx.getState(getEnergy=True).getPotentialEnergy()
        ref.append(e.value_in_unit(unit.kilojoule_per_mole) / kt_kjmol(300.0))
    with OpenMMEnergy(system, n_workers=0) as energy:
        u = energy(torch.tensor(x.reshape(3, -1), dtype=torch.float64))
    assert u.dtype == torch.float64
    np.testing.assert_allclose(u.numpy(), ref, rtol=1e-10, atol=1e-8)
    assert system.temperature == 300.0 and system.config["constraints"] is None


@pytest.mark.parametrize("key", list(BUILDS))
def test_cvs_equal_mdtraj(built, key) -> None:
    system = load_system(built[key])
    _check_cvs_equal_mdtraj(system)
    if key == "ga_zwitterion":  # free termini: no phi for residue 1, no psi for residue 2
        assert set(system.cvs) == {"psi_1", "phi_2"}
        assert list(system.states) == ["phi_2_negative", "phi_2_positive"]


def test_states(built) -> None:
    phe = load_system(built["phe"]).states
    assert list(phe) == ["phi_negative", "phi_positive", "chi1_plus", "chi1_trans", "chi1_minus"]
    pro = load_system(built["pro"])
    assert list(pro.states) == ["pucker_down", "pucker_up", "omega_trans", "omega_cis"]
    assert "phi" in pro.cvs and "omega" in pro.cvs
    omega = np.linspace(-np.pi, np.pi, 720, endpoint=False) + 1e-3  # trans and cis: a cover
    hits = sum(cvmod.in_range(omega, *pro.states[f"omega_{s}"]["omega"], periodic=True)
               .astype(int) for s in ("trans", "cis"))  # fmt: skip
    assert (hits == 1).all()
    assert list(load_system(built["aa_obc"]).states) == [
        "phi_1_negative", "phi_1_positive", "phi_2_negative", "phi_2_positive"
    ]  # fmt: skip
    # the three rotamer ranges cover the circle once (the trans range wraps across +-pi)
    trp = load_system(built["trp"])
    chi1 = np.linspace(-np.pi, np.pi, 720, endpoint=False) + 1e-3  # off the boundaries
    hits = sum(
        cvmod.in_range(chi1, *trp.states[f"chi1_{r}"]["chi1"], periodic=True).astype(int)
        for r in ("plus", "trans", "minus")
    )
    assert (hits == 1).all()


def test_residues_are_l(built) -> None:
    aldp = load_system("aldp_vacuum")
    ref = np.sign(_dihedral(aldp.positions, [6, 8, 14, 10]))  # N-CA-C-CB of L-alanine
    n_checked = 0
    for folder in built.values():
        system = load_system(folder)
        for res in system.topology.residues():
            names = {a.name: a.index for a in res.atoms()}
            if {"N", "CA", "C", "CB"} <= set(names):
                idx = [names[a] for a in ("N", "CA", "C", "CB")]
                assert np.sign(_dihedral(system.positions, idx)) == ref, (folder.name, res.name)
                n_checked += 1
    assert n_checked >= 7


def test_rings_are_closed(built) -> None:
    seen = set()
    for key in ("pro", "phe", "trp", "his"):
        system = load_system(built[key])
        for a, b in system.topology.bonds():
            ring = RINGS.get(a.residue.name, set())
            if a.residue is b.residue and {a.name, b.name} <= ring:
                d = np.linalg.norm(system.positions[a.index] - system.positions[b.index])
                assert 0.13 < d < 0.16, (key, a.name, b.name, d)
                seen.add((a.residue.name, a.name, b.name))
    assert len(seen) == 5 + 6 + 10 + 5  # every ring bond of PRO, PHE, TRP (two rings), HIS


def test_pdb_round_trip_adds_missing_heavy_atoms(built, tmp_path) -> None:
    pdb = app.PDBFile(str(_pdb(built["phe"])))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    gone = [a for a in modeller.topology.atoms() if a.name in ("CZ", "HZ")]
    assert len(gone) == 2
    modeller.delete(gone)
    with open(tmp_path / "broken.pdb", "w") as fh:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, fh)
    out = build_system(tmp_path / "fixed", pdb=tmp_path / "broken.pdb")
    fixed = load_system(out)
    atoms = sorted((a.residue.name, a.name) for a in fixed.topology.atoms())
    assert atoms == sorted((a.residue.name, a.name) for a in pdb.topology.atoms())
    assert "pdbfixer added 1 heavy atom" in (out / "system.yaml").read_text()
    _check_cvs_equal_mdtraj(fixed)


def _two_chains_and_water(built, tmp_path) -> tuple[Path, Path]:
    pdb = app.PDBFile(str(_pdb(built["pro"])))
    two = app.Modeller(pdb.topology, pdb.positions)
    two.add(pdb.topology, [p + openmm.Vec3(2.0, 0, 0) * unit.nanometer for p in pdb.positions])
    water = app.Modeller(pdb.topology, pdb.positions)
    top = app.Topology()
    res = top.addResidue("HOH", top.addChain("B"))
    for name, el in (("O", "O"), ("H1", "H"), ("H2", "H")):
        top.addAtom(name, app.Element.getBySymbol(el), res)
    xyz = [openmm.Vec3(1.5, 1.5, 1.5), openmm.Vec3(1.6, 1.5, 1.5), openmm.Vec3(1.47, 1.59, 1.5)]
    water.add(top, xyz * unit.nanometer)
    paths = tmp_path / "two_chains.pdb", tmp_path / "water.pdb"
    for path, m in zip(paths, (two, water)):
        with open(path, "w") as fh:
            app.PDBFile.writeFile(m.topology, m.positions, fh)
    return paths


def test_unsupported_pdbs_are_refused(built, tmp_path) -> None:
    two, water = _two_chains_and_water(built, tmp_path)
    for path, what in ((two, "2 chains"), (water, "water (HOH x1)")):
        with pytest.raises(SystemBuildError, match="Supported: one chain") as info:
            build_system(tmp_path / "out", pdb=path)
        assert what in str(info.value)
        with pytest.raises(SystemBuildError, match=what.replace("(", r"\(").replace(")", r"\)")):
            check_supported_topology(mdtraj.load(str(path)).topology)
    assert not (tmp_path / "out").exists()
    check_supported_topology(app.PDBFile(str(_pdb(built["pro"]))).topology)  # fine
    check_supported_topology(mdtraj.load(str(_pdb(built["aa_obc"]))).topology)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sequence": "AXZ"}, r"unknown residue letter\(s\) \['X', 'Z'\].*ACDEFGHIKLMNPQRSTVWY"),
        ({"sequence": "B"}, r"unknown residue letter\(s\) \['B'\]"),
        ({"sequence": ""}, "give one-letter codes"),
        ({"sequence": "ALA-XYZ"}, r"unknown three-letter code\(s\) \['XYZ'\]"),
        ({"sequence": "A", "solvent": "water"}, r"solvent='water'.*\['vacuum', 'obc'\]"),
        ({"sequence": "A", "forcefield": "charmm36"}, r"\['amber99sbildn', 'amber14'\]"),
        ({"sequence": "A", "termini": "free"}, r"\['capped', 'zwitterion'\]"),
        ({}, "exactly one of"),
        ({"sequence": "A", "pdb": "x.pdb"}, "exactly one of"),
        ({"pdb": "does_not_exist.pdb"}, "no such file"),
        ({"sequence": "A", "temperature": -1.0}, "temperature"),
    ],
)
def test_bad_input_is_refused_before_any_work(tmp_path, kwargs, match) -> None:
    with pytest.raises(SystemBuildError, match=match):
        build_system(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_parse_sequence() -> None:
    assert parse_sequence("aP") == ["ALA", "PRO"]
    assert parse_sequence("ala-Pro-TRP") == ["ALA", "PRO", "TRP"]
    assert parse_sequence("ALA") == ["ALA", "LEU", "ALA"]  # no dash: one-letter codes


def test_amber14_obc_builds(tmp_path) -> None:
    out = build_system(tmp_path / "a14", sequence="Y", forcefield="amber14", solvent="obc")
    system = load_system(out)
    assert system.forcefield == ["amber14-all.xml", "implicit/obc2.xml"] and system.n_atoms == 33


def test_existing_folder_needs_overwrite_and_builds_are_reproducible(built) -> None:
    with pytest.raises(SystemBuildError, match="overwrite"):
        build_system(built["pro"], sequence="P")
    before = _pdb(built["pro"]).read_text().splitlines()[1:]  # after the dated REMARK
    assert build_system(built["pro"], sequence="P", overwrite=True) == built["pro"]
    assert _pdb(built["pro"]).read_text().splitlines()[1:] == before


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_built_systems(name) -> None:
    n_atoms, first_two = SHIPPED[name]
    system = load_system(name)
    assert system.n_atoms == n_atoms and tuple(system.states)[:2] == first_two
    assert "Built by: bgflow-system" in (system.path / "system.yaml").read_text()
    assert (ROOT / "configs" / "system" / f"{name}.yaml").is_file()
    _check_cvs_equal_mdtraj(system)
    for state in first_two[:1]:  # the reference structure lies in the first state
        assert system.in_state(state, system.positions[None].reshape(1, -1))[0]


def test_command_line(tmp_path) -> None:
    script = str(ROOT / "scripts" / "build_system.py")
    ok = subprocess.run([sys.executable, script, "sequence=G", "out=gly"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert str(tmp_path / "gly") in ok.stdout and "states: phi_negative, phi_positive" in ok.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gly"]  # no Hydra run folder
    header = (tmp_path / "gly" / "system.yaml").read_text()
    assert "Built by: bgflow-system sequence=G out=gly" in header
    bad = subprocess.run([sys.executable, script, "sequence=AXZ", "out=bad"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "error: sequence='AXZ'" in bad.stderr


def _topology(*residues: tuple[str, str, list[str]]) -> app.Topology:
    """An OpenMM topology from (chain id, residue name, atom names) rows."""
    top, chains = app.Topology(), {}
    for chain_id, name, atoms in residues:
        if chain_id not in chains:
            chains[chain_id] = top.addChain(chain_id)
        res = top.addResidue(name, chains[chain_id])
        for atom in atoms:
            top.addAtom(atom, app.Element.getBySymbol(atom[0]), res)
    return top


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (("A", "NA", ["NA"]), r"ions \(NA x1\)"),
        (("A", "LIG", ["C1", "O1"]), r"ligands, unknown or non-standard residues \(LIG x1\)"),
        (("A", "MSE", ["N", "CA", "C", "O"]), r"non-standard residues \(MSE x1\)"),
        (("B", "ALA", ["N", "CA", "C", "O", "CB"]), r"2 chains \(A, B\)"),
    ],
)
def test_check_supported_topology_names_the_problem(extra, match) -> None:
    ala = ("A", "ALA", ["N", "CA", "C", "O", "CB"])
    check_supported_topology(_topology(ala))
    with pytest.raises(SystemBuildError, match=match + r".*Supported: one chain"):
        check_supported_topology(_topology(ala, extra))
    with pytest.raises(SystemBuildError, match="no amino acid"):
        check_supported_topology(_topology(("A", "ACE", ["C", "O", "CH3"])))


def test_chain_break_is_refused(tmp_path) -> None:
    pdb = app.PDBFile(str(load_system("ala4_implicit").path / "ala4_implicit.pdb"))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.delete([r for r in modeller.topology.residues() if r.id == "3"])  # middle ALA
    with open(tmp_path / "gap.pdb", "w") as fh:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, fh, keepIds=True)
    with pytest.raises(SystemBuildError, match=r"chain break between ALA2 and ALA4"):
        build_system(tmp_path / "out", pdb=tmp_path / "gap.pdb")


def test_torsions_of_every_amino_acid_equal_mdtraj() -> None:
    """phi, psi, chi1, chi2 (and proline's omega) of all 20 amino acids in one chain: the
    atoms mdtraj uses, residue by residue (heavy atoms from PeptideBuilder, no minimising)."""
    topology, positions = build_peptide(list(AMINO_ACIDS))
    cvs = peptide_cvs(topology)
    traj = mdtraj.Trajectory(positions[None], mdtraj.Topology.from_openmm(topology))
    assert {k: v["atoms"] for k, v in cvs.items()} == _mdtraj_cvs(traj)
    named = {AMINO_ACIDS[int(k.split("_")[1]) - 1] for k in cvs if k.startswith("chi2_")}
    assert named == set(CHI2_ATOM)  # every residue with a chi2 has one, and no other
    assert len(named) == 14
