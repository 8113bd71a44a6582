"""bgflow-free-energy (scripts/free_energy.py) end to end on a tiny ALDP run, its bad-input
errors, and the periodic handling of torsion PMFs (bgflow_mini.free_energy)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mdtraj
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from test_sample_script import aldp_run, run_script  # noqa: F401 - shared fixture

from bgflow_mini import cv as cvmod
from bgflow_mini import free_energy as fe
from bgflow_mini.apps.free_energy import free_energy
from bgflow_mini.apps.validation import ConfigError
from bgflow_mini.evaluation import block_free_energy
from bgflow_mini.pareto import pareto_k
from bgflow_mini.reweighting import free_energy_difference
from bgflow_mini.systems import load_system
from bgflow_mini.units import wrap_angle

ROOT = Path(__file__).parents[1]

CONFIGS = ROOT / "configs"
PHI_NEG, PHI_POS = (-math.pi, 0.0), (0.0, 2.0)


@pytest.fixture(scope="module")
def samples(aldp_run, tmp_path_factory) -> Path:  # noqa: F811 - fixture argument
    out = tmp_path_factory.mktemp("fe") / "samples"
    args = [f"checkpoint={aldp_run}", "n_samples=1500", f"out={out}", "progress=false"]
    run_script("sample", args, out.parent)
    return out


def fe_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="free_energy", overrides=list(overrides))


def read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path) as fh:
        rows = list(csv.reader(fh))
    return {k: np.array([float(r[i]) for r in rows[1:]]) for i, k in enumerate(rows[0])}


def test_free_energy_outputs_match_direct_estimates(samples, tmp_path):
    out = tmp_path / "fe"
    args = [f"samples={samples}", f"out={out}", "bins=36", "n_bootstrap=40", "n_blocks=10"]
    res = run_script("free_energy", [*args, "progress=false"], tmp_path)
    assert "ΔF = F(phi_positive) - F(phi_negative)" in res.stdout
    result = json.loads((out / "free_energy.json").read_text())
    for name in ["pmf_phi.csv", "pmf_psi.csv", "pmf_phi_psi.csv"]:
        assert name in result["files"] and (out / name).is_file()
    for name in ["ramachandran.png", "pmf_phi.png", "pmf_psi.png", "energies.png"]:
        assert name in result["plots"] and (out / name).stat().st_size > 10_000
    assert result["n_samples"] == 1500 and result["n_md_frames"] == 200
    assert result["md_reference"].endswith("traj.h5")  # found the run's MD cache

    # ΔF recomputed directly from the files
    traj = mdtraj.load_hdf5(str(samples / "samples.h5"))
    system = load_system("aldp_vacuum")
    phi = cvmod.compute_cvs(traj.xyz, system.cvs, ["phi"])["phi"]
    lw, u = np.load(samples / "log_weights.npy"), np.load(samples / "energies.npy")
    a, b = cvmod.in_range(phi, *PHI_NEG, periodic=True), cvmod.in_range(phi, *PHI_POS, True)
    dF, err = free_energy_difference(lw, a, b, n_bootstrap=40, seed=0)
    got = result["dF"]["reweighted"]
    assert got["dF"] == pytest.approx(dF, rel=1e-9) and got["stderr"] == pytest.approx(err)
    assert got["ess"] == pytest.approx(result["ess"]) and got["n_b"] == int(b.sum())
    assert result["pareto_k"] == pareto_k(lw)["k"]  # the tail diagnostic of the same weights
    ok = np.isfinite(u)
    dF_raw, _ = free_energy_difference(None, a[ok], b[ok], n_bootstrap=0)
    assert result["dF"]["unweighted"]["dF"] == pytest.approx(dF_raw, rel=1e-9)
    md = mdtraj.load_hdf5(result["md_reference"])
    md_phi = cvmod.compute_cvs(md.xyz, system.cvs, ["phi"])["phi"]
    in_a = cvmod.in_range(md_phi, *PHI_NEG, True)
    in_b = cvmod.in_range(md_phi, *PHI_POS, True)
    md_dF, md_err = block_free_energy(in_a, in_b, n_blocks=10, n_bootstrap=40, seed=0)
    assert result["dF"]["md"]["dF"] == md_dF and result["dF"]["md"]["n_a"] == int(in_a.sum())

    # PMFs: torsion bins cover [-pi, pi), minimum 0 for every source
    pmf = read_csv(out / "pmf_phi.csv")
    c = pmf["phi"]
    w = np.diff(c)
    assert len(c) == 36 and np.allclose(w, 2 * math.pi / 36)
    assert c[0] - w[0] / 2 == pytest.approx(-math.pi) and c[-1] + w[0] / 2 == pytest.approx(math.pi)
    for src in ("md", "unweighted", "reweighted"):
        f = pmf[f"F_{src}"]
        assert np.nanmin(f) == 0.0 and np.isinf(pmf[f"stderr_{src}"][np.isinf(f)]).all()
    centres, f_rw, _ = fe.pmf_1d(phi, system.cvs["phi"], np.linspace(-np.pi, np.pi, 37), lw, 0)
    np.testing.assert_allclose(pmf["F_reweighted"], f_rw)
    surface = read_csv(out / "pmf_phi_psi.csv")
    assert len(surface["phi"]) == 36 * 36 and np.nanmin(surface["F_unweighted"]) == 0.0
    # PMF agreement with MD, recomputed from the CSV
    agree = result["pmf_agreement_vs_md"]["phi"]["reweighted"]
    ref = fe.pmf_agreement(pmf["F_md"], pmf["F_reweighted"], max_f_ref=5.0)
    assert agree["max_abs_diff"] == pytest.approx(ref["max_abs_diff"])
    assert agree["n_bins"] == ref["n_bins"] > 0 and "PMF(phi) reweighted vs MD" in res.stdout


def test_sampling_from_a_checkpoint_with_a_state_from_the_config(aldp_run, tmp_path):  # noqa: F811
    out = tmp_path / "fe"
    args = [
        f"checkpoint={aldp_run}",
        "n_samples=600",
        f"out={out}",
        "+states.c7ax={phi: [0.5, 1.8], psi: [-1.5, 0.0]}",
        "state_b=c7ax",
        "cvs=[psi]",
        "cvs_2d=[]",
        "md_reference=null",
        "energy=torchff",  # the config group works as in train.py
        "weights=ema",  # the training checkpoint's final average, not model.pt
        "n_bootstrap=10",
        "progress=false",
    ]
    run_script("free_energy", args, tmp_path)
    result = json.loads((out / "free_energy.json").read_text())
    assert result["states"]["c7ax"] == {"phi": [0.5, 1.8], "psi": [-1.5, 0.0]}
    assert result["md_reference"] is None and set(result["dF"]) == {"unweighted", "reweighted"}
    traj = mdtraj.load_hdf5(str(out / "samples" / "samples.h5"))
    assert traj.n_frames == 600
    summary = json.loads((out / "samples" / "summary.json").read_text())
    assert summary["energy"] == "TorchForceField" and summary["weights"] == "ema"
    assert summary["checkpoint"] == str(aldp_run / "checkpoints" / "latest.pt")
    cvs = load_system("aldp_vacuum").cvs
    v = cvmod.compute_cvs(traj.xyz, cvs)
    in_b = cvmod.in_state(v, {"phi": [0.5, 1.8], "psi": [-1.5, 0.0]}, cvs)
    assert result["dF"]["reweighted"]["n_b"] == int(in_b.sum())
    assert (out / "pmf_psi.csv").is_file() and not (out / "pmf_phi.csv").exists()
    assert not (out / "ramachandran.png").exists()


def test_bad_inputs_are_clear_errors(samples, aldp_run, tmp_path):  # noqa: F811
    def analyse(*overrides: str, out: str = "x"):
        return free_energy(fe_config(*overrides), tmp_path / out)

    with pytest.raises(ConfigError, match=r"cvs\.1='chi': unknown CV.*'phi', 'psi'"):
        analyse(f"samples={samples}", "cvs=[phi,chi]")
    with pytest.raises(ConfigError, match="unknown CV"):
        analyse(f"samples={samples}", "cvs_2d=[[phi,omega]]")
    with pytest.raises(ConfigError, match="state_b='alpha_l'.*phi_negative"):
        analyse(f"samples={samples}", "state_b=alpha_l")
    with pytest.raises(ConfigError, match="theta"):
        analyse(f"samples={samples}", "+states.x={theta: [0, 1]}", "state_b=x")
    with pytest.raises(ValueError, match="'phi_negative'.*'left'.*overlap"):
        analyse(f"samples={samples}", "+states.left={phi: [-2, -1]}", "state_b=left")
    with pytest.raises(ConfigError, match="samples, checkpoint: neither given"):
        analyse()
    with pytest.raises(ConfigError, match="ais.steps: applies when sampling"):
        analyse(f"samples={samples}", "ais.steps=4")
    with pytest.raises(ConfigError, match="ais.target_acceptance=1.5"):
        analyse(f"checkpoint={aldp_run}", "ais.steps=4", "ais.target_acceptance=1.5", out="z")
    with pytest.raises(FileNotFoundError, match="not a sample folder"):
        analyse(f"samples={tmp_path}")
    with pytest.raises(ConfigError, match="state_b='bogus'"):  # checked before sampling
        analyse(f"checkpoint={aldp_run}", "state_b=bogus", out="y")
    assert not (tmp_path / "y" / "samples").exists()

    # a samples folder whose trajectory has the wrong number of atoms
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in samples.iterdir():
        if f.is_file() and f.name != "samples.h5":
            (bad / f.name).write_bytes(f.read_bytes())
    mdtraj.load_hdf5(str(samples / "samples.h5")).atom_slice(range(10)).save_hdf5(
        str(bad / "samples.h5")
    )
    with pytest.raises(ValueError, match="30 features per sample but target 'aldp_vacuum' has 66"):
        analyse(f"samples={bad}")
    res = run_script("free_energy", [f"samples={bad}", f"out={tmp_path / 'h'}"], tmp_path, ok=False)
    assert res.returncode == 2 and "30 features per sample" in res.stderr
    assert not (tmp_path / "h" / "free_energy.json").exists()


def test_torsion_pmfs_are_periodic():
    spec = {"type": "torsion", "atoms": [0, 1, 2, 3]}
    rng = np.random.default_rng(0)
    x = math.pi + 0.3 * rng.standard_normal(20_000)  # one basin across the ±pi cut
    x[:5] = math.pi  # exactly +pi belongs to the first bin, [-pi, -pi + w)
    edges = fe.cv_edges(spec, [x[x < 1.0]], 40)
    assert edges[0] == -math.pi and edges[-1] == math.pi and len(edges) == 41
    c, f, err = fe.pmf_1d(x, spec, edges, None, n_bootstrap=20, seed=0)
    # without wrapping, half the samples (> pi) would fall outside the bins
    assert np.isfinite(f[0]) and np.isfinite(f[-1]) and abs(f[0] - f[-1]) < 0.1
    assert max(f[0], f[-1]) < 0.2 and np.isinf(f[len(f) // 2])  # basin at ±pi, none at 0
    w = np.exp(-f[np.isfinite(f)]) * (edges[1] - edges[0])
    p0 = np.histogram(wrap_angle(x), bins=edges)[0] / len(x)  # all samples inside
    np.testing.assert_allclose(w / w.sum(), p0[np.isfinite(f)], atol=1e-12)
    assert np.histogram(wrap_angle(x[:5]), bins=edges)[0][0] == 5
    # the MD (block-bootstrap) profile wraps in the same way
    f_md, e_md = fe.block_pmf([x], [spec], [edges], n_blocks=10, n_bootstrap=20)
    np.testing.assert_allclose(f_md, f)
    assert np.isfinite(e_md[0]) and np.isfinite(e_md[-1])
    # a non-periodic CV is binned over the data range
    d_edges = fe.cv_edges({"type": "distance", "atoms": [0, 1]}, [np.array([0.1, 0.3])], 4)
    np.testing.assert_allclose(d_edges, [0.1, 0.15, 0.2, 0.25, 0.3])


def test_pmf_agreement_exact_cases():
    x = np.linspace(-3, 3, 61)
    f_ref = 0.5 * x**2  # kT, harmonic
    # the same profile up to a constant agrees exactly
    a = fe.pmf_agreement(f_ref, f_ref + 1.7)
    assert a["max_abs_diff"] < 1e-12 and a["shift"] == pytest.approx(1.7)
    assert a["n_bins"] == int((f_ref <= 5.0).sum())
    # one bin off by 0.5 kT inside the region is found (shift set by the whole region)
    f = f_ref.copy()
    f[30] += 0.5
    a = fe.pmf_agreement(f_ref, f, max_f_ref=5.0)
    assert 0.45 < a["max_abs_diff"] < 0.5 and a["rms_diff"] < a["max_abs_diff"]
    # deviations above the threshold and non-finite bins are ignored
    f = f_ref.copy()
    f[np.abs(x) > 2.9] += 3.0
    f[0] = np.inf
    assert fe.pmf_agreement(f_ref, f, max_f_ref=4.0)["max_abs_diff"] < 1e-12
    # z-scores with errors
    a = fe.pmf_agreement(f_ref, f_ref + 0.2 * (x > 0), np.full(61, 0.1), np.full(61, 0.1))
    assert a["max_abs_z"] == pytest.approx(0.1 / math.hypot(0.1, 0.1), rel=0.2)
    with pytest.raises(ValueError, match="share bins"):
        fe.pmf_agreement(f_ref, f_ref[:10])


def test_block_pmf_weights_and_series():
    """Weighted, multi-series MD profiles: a zero-weight second series changes nothing, an
    equally weighted copy changes nothing, and doubling one bin's weight lowers its F by ln 2."""
    spec = {"type": "distance", "atoms": [0, 1]}
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 0.1, 4000)
    edges = fe.cv_edges(spec, [x], 20)
    f0, e0 = fe.block_pmf([x], [spec], [edges], n_blocks=10, n_bootstrap=30)
    other = rng.normal(0.7, 0.1, 4000)
    lw = np.concatenate([np.zeros(4000), np.full(4000, -np.inf)])
    f1, e1 = fe.block_pmf([np.concatenate([x, other])], [spec], [edges], 10, 30, 0, lw, 2)
    np.testing.assert_allclose(f1, f0)
    np.testing.assert_allclose(e1, e0)
    f2, e2 = fe.block_pmf([np.concatenate([x, x])], [spec], [edges], 10, 30, 0, None, 2)
    np.testing.assert_allclose(f2, f0)
    np.testing.assert_allclose(e2, e0)
    k = 7  # a well-populated bin
    in_k = (x >= edges[k]) & (x < edges[k + 1])
    f3, _ = fe.block_pmf([x], [spec], [edges], 10, 0, 0, np.where(in_k, math.log(2), 0.0))
    p0 = np.exp(-f0) / np.exp(-f0).sum()
    p3 = np.exp(-f3) / np.exp(-f3).sum()
    ratio = p3 / p0  # bin k gains a factor 2 before normalisation, every other bin none
    np.testing.assert_allclose(ratio[k] / np.delete(ratio, k), 2.0, rtol=1e-12)
    with pytest.raises(ValueError, match="equal series"):
        fe.block_pmf([x[:-1]], [spec], [edges], 10, 0, 0, None, 2)
    with pytest.raises(ValueError, match="log_w"):
        fe.block_pmf([x], [spec], [edges], 10, 0, 0, np.full(4000, np.nan))


def test_pooled_md_reference_is_mbar_weighted(samples, tmp_path, capsys):
    """md_replicas=2 on a replica-exchange cache that kept two replicas: every frame of both,
    MBAR-weighted to 300 K, for ΔF and PMFs; the 300 K frames alone stay beside it."""
    from bgflow_mini.data import generate_or_load, load_replica_frames
    from bgflow_mini.replica_pool import series_log_weights

    settings = {"n_frames": 200, "n_replicas": 2, "keep_replicas": 2}
    settings.update(equilibration_steps=500, save_every=50)
    entry = generate_or_load("aldp_vacuum", settings, tmp_path / "md", 1, False, log=None)
    states = ["+states.low={psi: [-2.5, 1.2]}", "+states.high={psi: [1.25, 3.0]}"]
    common = [f"samples={samples}", f"md_reference={entry.path}", *states, "state_a=low"]
    common += ["state_b=high", "n_bootstrap=20", "n_blocks=10", "md_energies=false"]
    common += ["plots=false", "progress=false", "cvs=[psi]", "cvs_2d=[]"]
    pooled = free_energy(fe_config(*common, "md_replicas=2"), tmp_path / "a")
    printed = capsys.readouterr().out
    plain = free_energy(fe_config(*common, "md_replicas=1"), tmp_path / "b")
    # both tables (the main pair, then phi's sign pair) show the 300 K frames' own column
    head = "| MD (2 replicas, MBAR) | MD, target temperature only | generator |"
    assert printed.count(head) == 2 and head not in capsys.readouterr().out
    assert (
        pooled["state_delta_f"]["phi"]["md_target_temperature"]
        == (plain["state_delta_f"]["phi"]["md"])
    )
    assert pooled["md_reference_kind"] == "md_mbar" and plain["md_reference_kind"] == "md"
    assert pooled["n_md_series"] == 2 and pooled["n_md_frames"] == 400
    assert pooled["md_temperatures"][0] == pytest.approx(300.0)
    assert pooled["dF"]["md_target_temperature"] == plain["dF"]["md"]
    assert pooled["dF"]["reweighted"] == plain["dF"]["reweighted"]

    x, u, temps = load_replica_frames(entry, 2)
    lw = series_log_weights(u, temps)
    psi = cvmod.compute_cvs(x.reshape(400, -1).double().numpy(), load_system("aldp_vacuum").cvs)
    psi = psi["psi"]
    low, high = cvmod.in_range(psi, -2.5, 1.2, True), cvmod.in_range(psi, 1.25, 3.0, True)
    w = np.exp(lw - lw.max()).reshape(2, 200)
    dF, err = block_free_energy(low.reshape(2, 200), high.reshape(2, 200), 10, 20, 0, w)
    assert pooled["dF"]["md"]["dF"] == pytest.approx(dF) and pooled["dF"]["md"]["stderr"] == err
    assert np.isfinite(dF) and abs(dF - plain["dF"]["md"]["dF"]) > 1e-6  # the pool counts
    pmf = read_csv(tmp_path / "a" / "pmf_psi.csv")
    edges = np.linspace(-math.pi, math.pi, 61)
    spec = load_system("aldp_vacuum").cvs["psi"]
    f_md, _ = fe.block_pmf([psi], [spec], [edges], 10, 0, 0, lw, 2)
    np.testing.assert_allclose(pmf["F_md"], f_md)

    with pytest.raises(Exception, match="keep_replicas"):
        free_energy(fe_config(*common, "md_replicas=3"), tmp_path / "c")
    traj = f"md_reference={entry.traj_path}"
    with pytest.raises(ValueError, match="cache folder"):
        free_energy(fe_config(*common, traj, "md_replicas=2"), tmp_path / "d")
    with pytest.raises(ConfigError, match="md_replicas"):
        free_energy(fe_config(*common, "md_replicas=0"), tmp_path / "e")


def test_independent_md_runs_pool_into_one_reference(samples, tmp_path, capsys):
    """md_reference=[A, B]: two replica exchanges (other seeds) pooled, each run half the
    weight, time blocks resampled in all four series at once; the target temperature's
    column pools both runs' 300 K frames, as md_replicas=1 on their two trajectories does."""
    from bgflow_mini.data import generate_or_load, load_replica_frames
    from bgflow_mini.replica_pool import series_log_weights

    entries = []
    for seed in (0, 1):
        settings = {"n_frames": 200, "n_replicas": 2, "keep_replicas": 2, "seed": seed}
        settings.update(equilibration_steps=500, save_every=50)
        entries.append(generate_or_load("aldp_vacuum", settings, tmp_path / "md", 1, False))
    states = ["+states.low={psi: [-2.5, 1.2]}", "+states.high={psi: [1.25, 3.0]}"]
    common = [f"samples={samples}", *states, "state_a=low", "state_b=high", "n_bootstrap=20"]
    common += ["n_blocks=10", "md_energies=false", "plots=false", "progress=false"]
    common += ["cvs=[psi]", "cvs_2d=[]"]
    folders = f"md_reference=[{entries[0].path},{entries[1].path}]"
    pooled = free_energy(fe_config(*common, folders, "md_replicas=2"), tmp_path / "a")
    assert "| MD (2 runs x 2 replicas, MBAR) | MD, target temperature only |" in (
        capsys.readouterr().out
    )
    trajs = f"md_reference=[{entries[0].traj_path},{entries[1].traj_path}]"
    plain = free_energy(fe_config(*common, trajs, "md_replicas=1"), tmp_path / "b")
    assert plain["md_reference_kind"] == "md" and plain["n_md_runs"] == 2
    assert pooled["md_reference_kind"] == "md_mbar" and pooled["n_md_runs"] == 2
    assert pooled["n_md_series"] == 4 and pooled["n_md_frames"] == 800
    assert pooled["dF"]["md_target_temperature"] == plain["dF"]["md"]

    spec = load_system("aldp_vacuum").cvs
    labels, weights = [], []
    for e in entries:  # temperature-major: run 0 300 K, run 1 300 K, run 0 hot, run 1 hot
        x, u, temps = load_replica_frames(e, 2)
        lw = series_log_weights(u, temps)
        weights.append(np.exp(lw - np.log(np.exp(lw).sum())).reshape(2, 200))
        labels.append(cvmod.compute_cvs(x.reshape(400, -1).double().numpy(), spec)["psi"])
    psi = np.stack([p.reshape(2, 200) for p in labels], axis=1).reshape(4, 200)
    w = np.stack(weights, axis=1).reshape(4, 200)
    low, high = cvmod.in_range(psi, -2.5, 1.2, True), cvmod.in_range(psi, 1.25, 3.0, True)
    dF, err = block_free_energy(low, high, 10, 20, 0, w)
    assert pooled["dF"]["md"]["dF"] == pytest.approx(dF, rel=1e-10)
    assert pooled["dF"]["md"]["stderr"] == pytest.approx(err, rel=1e-10)
    one = free_energy(
        fe_config(*common, f"md_reference={entries[0].path}", "md_replicas=2"), tmp_path / "c"
    )
    assert abs(one["dF"]["md"]["dF"] - dF) > 1e-6  # the second run counts

    with pytest.raises(ConfigError, match="md_reference"):
        free_energy(fe_config(*common, "md_reference=[]"), tmp_path / "d")
    with pytest.raises(ConfigError, match="stands alone"):
        free_energy(fe_config(*common, f"md_reference=[auto,{entries[0].path}]"), tmp_path / "e")
