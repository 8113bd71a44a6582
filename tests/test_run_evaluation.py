"""evaluate (bgflow_mini.run_evaluation): metrics of trained generators of small peptides
against their MD references: any named CV, several residues, rings, pooled references."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bgflow_mini import cv as cvmod
from bgflow_mini import free_energy as fe
from bgflow_mini import pipeline, run_evaluation
from bgflow_mini.energies import TorchForceField
from bgflow_mini.flows import coupling_flow
from bgflow_mini.md import simulate
from bgflow_mini.md_reference import MDReference, pool_runs
from bgflow_mini.pareto import pareto_k
from bgflow_mini.report import summary_table
from bgflow_mini.systems import load_system
from bgflow_mini.targets import MolecularTarget
from bgflow_mini.training import Trainer
from bgflow_mini.weight_drivers import energy_slope, weight_drivers


def _peptide_like(folder: Path) -> Path:
    """A copy of aldp_vacuum with more CVs: a second phi/psi pair on the same atoms (a fake
    residue 2), chi1 (N-CA-CB-HB1), a distance and an angle, and states on them."""
    shutil.copytree(Path(load_system("aldp_vacuum").path), folder)
    cfg = yaml.safe_load((folder / "system.yaml").read_text())
    cfg["cvs"].update(
        phi_2=cfg["cvs"]["phi"],
        psi_2=cfg["cvs"]["psi"],
        chi1={"type": "torsion", "atoms": [6, 8, 10, 11]},
        d_hb={"type": "distance", "atoms": [5, 17]},
        theta={"type": "angle", "atoms": [6, 8, 14]},
    )
    cfg["states"].update(
        phi_2_negative={"phi_2": [-math.pi, 0.0]},
        phi_2_positive={"phi_2": [0.0, 2.0]},
        # HB1 of the methyl rotor stays near 1 rad in a short MD run: split there
        chi1_negative={"chi1": [-math.pi, 1.0]},
        chi1_positive={"chi1": [1.0, math.pi]},
        chi1_b={"chi1": [0.0, 1.2]},
        c7eq={"phi": [-math.pi, 0.0], "psi": [0.5, 2.5], "d_hb": [0.0, 0.25]},
        wide={"theta": [1.7, 2.1]},
    )
    (folder / "system.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder


def _short_md_generator(system, n_frames: int, seed: int, steps: int = 30):
    """Short MD split 4:1:1 in time, a tiny RNVP generator and 30 ML steps."""
    res = simulate(system, n_frames=n_frames, save_every=50, seed=seed,
                   equilibration_steps=1000, progress=False)  # fmt: skip
    x = torch.as_tensor(res.trajectory.xyz.reshape(n_frames, -1), dtype=torch.float64)
    a, b = 4 * n_frames // 6, 5 * n_frames // 6
    data = pipeline.DataSplit(x[:a], x[a:b], x[b:], x)
    energy = TorchForceField.from_openmm(system)
    factory = lambda dim, circular: coupling_flow(  # noqa: E731
        dim, 1, hidden=(16,), kind="rnvp", circular=circular, seed=0
    )
    torch.manual_seed(0)
    bg = pipeline.molecular_generator(system, data.train, factory, energy)
    Trainer(bg, lr=3e-3, batch_size=128, progress=False).fit(steps, data=data.train)
    return data, bg, energy


@pytest.fixture(scope="module")
def peptide(tmp_path_factory):
    system = load_system(_peptide_like(tmp_path_factory.mktemp("sys") / "pep"))
    # a rotamer state across the ±pi cut (system.yaml cannot hold lo > hi yet)
    system.states["chi1_wrap"] = {"chi1": [1.2, -2.5]}
    data, bg, energy = _short_md_generator(system, 600, seed=1)
    return MolecularTarget(system), data, bg, energy


def test_evaluate_with_any_named_cvs_and_several_residues(peptide):
    target, data, bg, energy = peptide
    kw = dict(energy=energy, n_samples=2000, batch_size=1000, n_bootstrap=20, n_blocks=10)
    m, s = run_evaluation.evaluate(bg, target, data, progress=False, **kw)
    cvs, states = target.cvs, target.states
    v = cvmod.compute_cvs(s["x"], cvs)
    # populations of states over torsions (also across the cut), distances and angles,
    # and of a state over three CVs (an AND of the ranges)
    for name in ("chi1_b", "chi1_wrap", "c7eq", "wide"):
        mask = np.asarray(cvmod.in_state(v, states[name], cvs))
        assert m["state_populations"][name]["raw"] == pytest.approx(mask.mean())
    c7 = (v["phi"] < 0) & (v["psi"] >= 0.5) & (v["psi"] < 2.5) & (v["d_hb"] < 0.25)
    assert m["state_populations"]["c7eq"]["raw"] == pytest.approx(c7.mean())
    assert 0 < c7.mean() < (v["phi"] < 0).mean()  # the AND is narrower than one range
    wrap = (v["chi1"] >= 1.2) | (v["chi1"] < -2.5)
    assert m["state_populations"]["chi1_wrap"]["raw"] == pytest.approx(wrap.mean())
    assert 0 < wrap.mean() < 1
    # a state's share of the squared weights and the ESS/n of its own samples' weights
    pops = m["state_populations"]
    neg = np.asarray(cvmod.in_state(v, states["phi_negative"], cvs))
    w = np.exp(s["log_w"].astype(np.float64) - s["log_w"].max())
    assert pops["phi_negative"]["weight2_share"] == pytest.approx(
        (w[neg] ** 2).sum() / (w**2).sum()
    )
    assert pops["phi_negative"]["ess_within"] == pytest.approx(
        run_evaluation.effective_sample_size(s["log_w"][neg])
    )
    assert "share of w^2, ESS/n inside" in summary_table(m)

    # ΔF of every <cv>_negative / <cv>_positive pair, like the main ΔF
    sdf = m["state_delta_f"]
    assert list(sdf) == ["phi", "phi_2", "chi1"]
    assert sdf["phi"]["dF_reweighted"] == m["dF_reweighted"]
    assert sdf["phi_2"]["dF_reweighted"] == sdf["phi"]["dF_reweighted"]  # same atoms
    assert sdf["phi_2"]["stderr"] == sdf["phi"]["stderr"]
    chi = sdf["chi1"]
    ref = fe.md_delta_f(cvmod.compute_cvs(data.reference.numpy(), cvs), states, cvs,
                        "chi1_negative", "chi1_positive", 10, 20, 0)  # fmt: skip
    rw = fe.state_delta_f(v, states, cvs, "chi1_negative", "chi1_positive", s["log_w"], 20, 0)
    assert chi["dF_reference"] == ref["dF"] and chi["reference_stderr"] == ref["stderr"]
    assert chi["dF_reweighted"] == rw["dF"] and chi["stderr"] == rw["stderr"]
    assert chi["error"] == pytest.approx(rw["dF"] - ref["dF"])
    assert math.isfinite(chi["dF_reference"]) and chi["reference_kind"] == "md"

    # per-residue Ramachandran KL; the plain pair keeps the old keys
    assert m["ramachandran_residues"] == ["2"] and m["ramachandran_kl_kind"] == "phi, psi"
    for k in ("", "_unweighted", "_md_train"):
        assert m[f"ramachandran_kl{k}_2"] == m[f"ramachandran_kl{k}"] > 0
    assert m["ramachandran_kl_md_train"] != m["ramachandran_kl"]

    # chirality: L-alanine of the PDB kept by every sample of an ML-fitted flow
    assert m["chirality_n_centres"] == 1
    assert m["chirality_kept_fraction_per_centre"] == {"ALA2": m["chirality_kept_fraction"]}
    assert m["chirality_kept_fraction"] > 0.99
    table = summary_table(m)
    assert "phi_2_negative -> phi_2_positive" in table and "chirality kept" in table
    blocks = m["ess_blocks"]  # the spread of the ESS over 5 disjoint blocks of the samples
    assert blocks["n_blocks"] == 5 and blocks["block_size"] == m["n_samples"] // 5
    assert 0 < blocks["min"] <= blocks["median"] <= blocks["max"] <= 1
    assert f"ESS of 5 blocks of {blocks['block_size']:,} samples" in table
    assert m["pareto_k"] == pareto_k(s["log_w"])["k"]  # the tail shape of the same weights
    row = f"| Pareto k of the largest weights (> 0.7: ESS, dF unreliable) | {m['pareto_k']:.2f} |"
    assert row in table
    fit = m["energy_slope"]  # the line of log w on u, the same as on the samples directly
    assert fit == energy_slope(s["log_w"], s["u"])
    head = "| generator temperature / target's (log w on u: slope, R^2) |"
    assert f"{head} {fit['temperature_ratio']:.3f} ({fit['slope']:+.3f}, " in table
    assert "chi1_negative -> chi1_positive" in table and "residue 2" in table
    # the largest weights: the samples' own weights, energies and CVs (torsions in degrees)
    heavy = m["largest_weights"]
    assert len(heavy) == 5 and "largest weight 1" in table
    w = np.exp(s["log_w"] - s["log_w"].max())
    top = int(np.argmax(w))
    assert heavy[0]["index"] == top and heavy[0]["share"] == pytest.approx(w[top] / w.sum())
    assert heavy[0]["cvs"]["psi"] == pytest.approx(math.degrees(v["psi"][top]))
    assert heavy[0]["cvs"]["d_hb"] == pytest.approx(v["d_hb"][top])
    # the coordinates log w follows: the same as weight_drivers on the samples directly
    drivers = m["weight_drivers"]
    rows = bg.spec["zmatrix"]
    names = [f"{a.residue.name}{a.residue.resSeq}:{a.name}" for a in target.topology.atoms]
    masks = {k: np.asarray(cvmod.in_state(v, st, cvs)) for k, st in states.items()}
    assert drivers == weight_drivers(s["x"], s["log_w"], rows, names, masks=masks)
    assert len(drivers["all"]) == 5 and all(0 <= d["r2"] <= 1 for d in drivers["all"])
    assert set(drivers["states"]) <= set(states) and drivers["states"]
    assert f"| log w follows (binned R^2) | {drivers['all'][0]['coordinate']} " in table

    # the main ΔF between rotamer states, one of them across the cut
    m2, _ = run_evaluation.evaluate(
        bg, target, data, state_a="chi1_b", state_b="chi1_wrap", progress=False, **kw
    )
    assert math.isfinite(m2["dF_reweighted"]) and math.isfinite(m2["dF_reference"])


def test_state_populations_say_where_the_squared_weights_sit():
    """Hand-made weights: three samples of weight 1 at phi < 0; at phi > 0 weights 1 and 3
    and one sample without a finite energy (zero weight, still a sample of the state)."""
    cvs = {"phi": {"type": "torsion", "atoms": [0, 1, 2, 3]}}
    states = {"neg": {"phi": [-math.pi, 0.0]}, "pos": {"phi": [0.0, math.pi]},
              "empty": {"phi": [2.0, 2.5]}}  # fmt: skip
    values = {"phi": np.array([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])}
    log_w = np.array([0.0, 0.0, 0.0, 0.0, math.log(3.0), -math.inf])
    finite = np.isfinite(log_w)
    pops = run_evaluation._populations(values, states, cvs, log_w, finite)
    assert pops["neg"] == pytest.approx(
        {"raw": 3 / 5, "reweighted": 3 / 7, "weight2_share": 3 / 13, "ess_within": 1.0}
    )
    # ESS/n inside: (1 + 3)^2 / (3 samples * (1 + 9))
    assert pops["pos"] == pytest.approx(
        {"raw": 2 / 5, "reweighted": 4 / 7, "weight2_share": 10 / 13, "ess_within": 16 / 30}
    )
    assert pops["empty"]["weight2_share"] == 0.0 and math.isnan(pops["empty"]["ess_within"])


def test_evaluate_refuses_an_undefined_cv_before_sampling(peptide):
    target, data, bg, _ = peptide
    bad = MolecularTarget(target.system)
    bad.system = copy.copy(target.system)
    bad.system.states = {**target.states, "rot": {"chi9": [0.0, 1.0]}}

    def no_energy(x):
        raise AssertionError("sampled before checking the states")

    with pytest.raises(KeyError, match="state 'rot' uses unknown CV 'chi9'"):
        run_evaluation.evaluate(bg, bad, data, energy=no_energy, n_samples=10, progress=False)


def test_ramachandran_kl_of_several_residues_without_a_plain_pair(peptide):
    target, data, _, _ = peptide
    cvs = {k: v for k, v in target.cvs.items() if k not in ("phi", "psi")}
    cvs["phi_1"], cvs["psi_1"] = cvs.pop("chi1"), target.cvs["psi"]  # residue 1: chi1/psi
    x = data.test.numpy()
    v = cvmod.compute_cvs(x, cvs)
    finite = np.ones(len(x), dtype=bool)
    m = run_evaluation._ramachandran(v, np.zeros(len(x)), finite, data, cvs, bins=32)
    assert m["ramachandran_residues"] == ["1", "2"]
    assert m["ramachandran_kl_kind"] == "mean over residues 1, 2"
    for k in ("", "_unweighted", "_md_train"):
        mean = 0.5 * (m[f"ramachandran_kl{k}_1"] + m[f"ramachandran_kl{k}_2"])
        assert m[f"ramachandran_kl{k}"] == pytest.approx(mean)
    # the test frames against themselves: KL 0 for both residues
    assert m["ramachandran_kl_1"] == pytest.approx(0, abs=1e-6)
    assert m["ramachandran_kl_md_train_1"] > 0.01


def test_evaluate_reports_ring_bonds_of_a_proline_dipeptide():
    from bgflow_mini.ring_geometry import ring_bond_stats

    system = load_system("pro_dipeptide_vacuum")
    data, bg, energy = _short_md_generator(system, 480, seed=2)
    assert sum(bg.spec["cartesian"]) == 2  # CD, CG in the frame of CA, N, CB (rows 0-2)
    target = MolecularTarget(system)
    m, s = run_evaluation.evaluate(
        bg, target, data, energy=energy, n_samples=1000, batch_size=500, n_bootstrap=10,
        n_blocks=5, progress=False,
    )  # fmt: skip
    rings = m["ring_bonds"]
    finite = np.isfinite(s["u"])
    assert rings == ring_bond_stats(s["x"], data.test.numpy(), target.topology, finite)
    assert rings["n_ring_bonds"] == 5 and len(rings["bonds"]) == 5
    assert rings["max_mean_rel_error"] < 0.05  # closed rings, even after 30 steps
    assert m["chirality_n_centres"] == 1 and m["chirality_kept_fraction"] > 0.99
    assert "ring bonds (5)" in summary_table(m)


def test_summary_says_why_there_is_no_md_reference():
    """A plain MD that never leaves one basin gives no reference dF: said, not 'inf'."""
    m = {"ess": 0.5, "dF_reweighted": 3.6, "dF_reweighted_stderr": 0.5}
    m |= {"dF_reference": math.inf, "dF_reference_stderr": math.inf, "dF_error": -math.inf}
    table = summary_table({**m, "dF_reference_kind": "md"})
    assert "inf" not in table and table.count("do not visit both states") == 2
    assert "| dF reweighted (kT) | 3.600 ± 0.500 |" in table
    # the per-residue rows of a longer peptide say it too
    state = {"state_a": "phi_2_negative", "state_b": "phi_2_positive", "dF_reweighted": 9.0}
    state |= {"stderr": 2.7, "dF_reference": math.inf, "reference_stderr": math.inf}
    state |= {"error": -math.inf, "reference_kind": "md"}
    table = summary_table({**m, "state_delta_f": {"phi_2": state}})
    assert "inf" not in table and table.count("do not visit both states") == 3
    row = "| dF phi_2_negative -> phi_2_positive (kT): reweighted / reference | 9.000 ± 2.700"
    assert row in table


def test_evaluate_uses_the_pooled_mbar_reference_first(peptide):
    """With a replica pool the main MD reference is the MBAR-weighted pool ("md_mbar");
    the target temperature's frames alone stay in the metrics as ``dF_reference_md``."""
    target, data, bg, energy = peptide
    kw = dict(energy=energy, n_samples=1000, batch_size=1000, n_bootstrap=20, n_blocks=10)
    ref = data.reference
    # two series: the MD itself with weight 1 and a shuffled copy with weight 0, so the
    # weighted reference must reproduce the plain one exactly
    shuffled = ref[torch.randperm(ref.shape[0], generator=torch.Generator().manual_seed(0))]
    lw = np.concatenate([np.zeros(ref.shape[0]), np.full(ref.shape[0], -np.inf)])
    pooled = copy.copy(data)
    both = torch.cat([ref, shuffled]).numpy()
    pooled.md_reference = MDReference(both, "pool", lw, 2, [300.0, 400.0])
    m, _ = run_evaluation.evaluate(bg, target, pooled, progress=False, **kw)
    plain, _ = run_evaluation.evaluate(bg, target, data, progress=False, **kw)
    assert m["dF_reference_kind"] == "md_mbar" and plain["dF_reference_kind"] == "md"
    assert m["dF_reference"] == pytest.approx(plain["dF_reference"])
    assert m["dF_reference_md"] == plain["dF_reference"]
    assert m["dF_reference_md_stderr"] == plain["dF_reference_stderr"]
    chi = m["state_delta_f"]["chi1"]
    assert chi["reference_kind"] == "md_mbar" and chi["reference_md"] == pytest.approx(
        chi["dF_reference"]
    )
    # equal weights on the shuffled copy move the reference to the mean of the two
    pooled.md_reference = MDReference(both, "pool", np.zeros(2 * ref.shape[0]), 2, [300.0, 400.0])
    m_eq, _ = run_evaluation.evaluate(bg, target, pooled, progress=False, **kw)
    assert m_eq["dF_reference"] == pytest.approx(plain["dF_reference"])  # same frames, twice
    # ... but time blocks of the shuffled copy hold frames from all times: a smaller error
    chi_eq, chi_plain = m_eq["state_delta_f"]["chi1"], plain["state_delta_f"]["chi1"]
    assert chi_eq["dF_reference"] == pytest.approx(chi_plain["dF_reference"])
    assert 0 < chi_eq["reference_stderr"] < chi_plain["reference_stderr"] < math.inf


def test_evaluate_pools_independent_runs_and_reports_each(peptide):
    """A reference pooled from two runs is the main one; each run's own ΔF stays in the
    metrics as ``..._run<i>`` and equals that run evaluated alone."""
    target, data, bg, energy = peptide
    kw = dict(energy=energy, n_samples=1000, batch_size=1000, n_bootstrap=20, n_blocks=10)
    x = data.reference.numpy()
    half = len(x) // 2
    runs = [MDReference(x[:half], "a"), MDReference(x[half : 2 * half], "b")]
    alone = []
    for r in runs:
        one = copy.copy(data)
        one.md_reference = r
        alone.append(run_evaluation.evaluate(bg, target, one, progress=False, **kw)[0])
    pooled = copy.copy(data)
    pooled.md_reference = pool_runs(runs)
    m, _ = run_evaluation.evaluate(bg, target, pooled, progress=False, **kw)
    assert m["dF_reference_kind"] == "md"
    for i, a in enumerate(alone):
        assert m[f"dF_reference_md_run{i}"] == pytest.approx(a["dF_reference"], rel=1e-12)
        chi = m["state_delta_f"]["chi1"]
        assert chi[f"reference_md_run{i}"] == pytest.approx(
            a["state_delta_f"]["chi1"]["dF_reference"], rel=1e-12
        )
    # counted frames of equal-length runs: the pooled population is the runs' mean
    p_b = [1 / (1 + np.exp(a["state_delta_f"]["chi1"]["dF_reference"])) for a in alone]
    p_pool = 1 / (1 + np.exp(m["state_delta_f"]["chi1"]["dF_reference"]))
    assert p_pool == pytest.approx(np.mean(p_b), rel=1e-9)
    # the summary names the pooled runs
    info = {"md_reference": {"label": "MD (2 runs)", "runs": [{"md_seed": 0}, {"md_seed": 4}]}}
    table = summary_table({**m, "data_info": info})
    assert "| MD reference | MD (2 runs): md.seed 0, 4 " in table
    assert "| MD reference |" not in summary_table(m)
    chis = [a["state_delta_f"]["chi1"]["dF_reference"] for a in alone]
    assert np.isfinite(chis).all() and chis[0] != chis[1]  # the runs differ
