"""bgflow-sample (scripts/sample.py) and load_generator on tiny trained runs (ALDP, a toy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mdtraj
import numpy as np
import pytest
import torch

from bgflow_mini import load_generator
from bgflow_mini.checkpoint import read_checkpoint
from bgflow_mini.energies import DoubleWell, TorchForceField
from bgflow_mini.report import summary_table
from bgflow_mini.reweighting import effective_sample_size
from bgflow_mini.systems import load_system

ROOT = Path(__file__).parents[1]
SCRIPTS = ROOT / "scripts"

PHASES = (
    "training.phases=[{name: ml, steps: 20, w_ml: 1.0},"
    "{name: mixed, steps: 10, w_ml: 1.0, w_kl: 0.1}]"
)
FAST = [
    "progress=false",
    "flow.n_blocks=1",
    "flow.hidden=[16]",
    PHASES,
    "training.eval_every=10",
    "training.ess_every=0",
    "training.batch_size=64",
    "training.kl_batch_size=64",
    "evaluation.n_samples=500",
    "evaluation.n_bootstrap=10",
]
TINY_MD = [
    "md.n_frames=200",
    "md.n_replicas=2",
    "md.equilibration_steps=500",
    "md.save_every=50",
]
TOY = [
    "system=double_well",
    "data.toy.n_chains=32",
    "data.toy.n_steps=300",
    "data.toy.burn_in=100",
]


def run_script(name: str, args: list[str], cwd: Path, ok: bool = True):
    """Run ``scripts/<name>.py`` with one thread; assert success (or failure)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    res = subprocess.run(
        [sys.executable, str(SCRIPTS / f"{name}.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    out = res.stdout[-3000:] + res.stderr[-3000:]
    assert (res.returncode == 0) == ok, out
    return res


def trained_run(tmp_path_factory, name: str, args: list[str]) -> Path:
    """A tiny train.py run, trained once per session (shared through the base temp dir)."""
    base = tmp_path_factory.getbasetemp()
    run = base / f"shared_run_{name}"
    if not (run / "model.pt").is_file():
        run_script("train", [*args, f"data_dir={base / 'md_data'}", f"hydra.run.dir={run}"], base)
    return run


@pytest.fixture(scope="session")
def aldp_run(tmp_path_factory) -> Path:
    # a second tiny MD run (md.seed=1) joins the evaluation's reference
    args = ["system=aldp_vacuum", "energy=torchff", *TINY_MD, *FAST]
    return trained_run(tmp_path_factory, "aldp", [*args, "evaluation.md_reference_seeds=[1]"])


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory, "toy", [*TOY, *FAST])


def test_training_run_pools_the_md_of_its_reference_seeds(aldp_run):
    """evaluation.md_reference_seeds=[1]: the MD of seed 1 (same settings) is made, cached
    and pooled with the run's own as the reference; each run's dF stays beside it."""
    m = json.loads((aldp_run / "metrics.json").read_text())
    ref = m["data_info"]["md_reference"]
    assert ref["label"] == "MD (2 runs)" and [r["md_seed"] for r in ref["runs"]] == [0, 1]
    keys = [r["cache_key"] for r in ref["runs"]]
    assert keys[0] == m["data_info"]["cache_key"] and keys[0] != keys[1]
    md_data = aldp_run.parent / "md_data" / "aldp_vacuum"
    assert all((md_data / k / "traj.h5").is_file() for k in keys)
    assert m["dF_reference_kind"] == "md"
    assert {"dF_reference_md_run0", "dF_reference_md_run1"} <= set(m)
    assert "| MD reference | MD (2 runs): md.seed 0, 1" in summary_table(m)


def test_sample_aldp_writes_consistent_files(aldp_run, tmp_path):
    out = tmp_path / "s"
    args = [f"checkpoint={aldp_run}", "n_samples=700", "batch_size=300", "progress=false"]
    res = run_script("sample", [*args, "formats=[h5,dcd,pdb]", f"out={out}"], tmp_path)
    assert "ess" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    lw, u, lq = (np.load(out / f"{k}.npy") for k in ("log_weights", "energies", "log_q"))
    assert summary["n_samples"] == 700 and lw.shape == u.shape == lq.shape == (700,)
    assert summary["system"] == "aldp_vacuum" and summary["energy"] == "TorchForceField"
    assert summary["target"]["name"] == "aldp_vacuum" and summary["md"]["n_frames"] == 200
    assert summary["data_replicas"] == 1  # md_replicas=auto of bgflow-free-energy reads it
    assert summary["ess"] == pytest.approx(effective_sample_size(lw), rel=1e-12)
    assert summary["nonfinite_energy_fraction"] == pytest.approx(1 - np.isfinite(u).mean())
    finite = np.isfinite(u) & np.isfinite(lq)
    np.testing.assert_allclose(lw[finite], -u[finite] - lq[finite], rtol=1e-12)
    assert np.isneginf(lw[~finite]).all()

    traj = mdtraj.load_hdf5(str(out / "samples.h5"))
    assert traj.n_frames == 700 and traj.n_atoms == 22
    dcd = mdtraj.load_dcd(str(out / "samples.dcd"), top=str(out / "samples.pdb"))
    np.testing.assert_allclose(dcd.xyz, traj.xyz, atol=1e-5)  # DCD: angstrom on disk
    assert mdtraj.load_pdb(str(out / "samples.pdb")).n_frames == 1

    # the frames on disk are the frames whose energies and densities were stored
    x = torch.as_tensor(traj.xyz.reshape(700, -1), dtype=torch.float64)
    gen = load_generator(aldp_run, dtype="float64")
    u_ref = TorchForceField.from_openmm(load_system("aldp_vacuum"))(x).numpy()
    ok = np.isfinite(u)
    rel = np.abs(u_ref[ok] - u[ok]) / np.maximum(np.abs(u[ok]), 1.0)
    assert np.median(rel) < 1e-3  # float32 positions on disk
    with torch.no_grad():
        lq_ref = gen.log_prob(x).numpy()
    assert np.median(np.abs(lq_ref - lq)) < 1e-2


def test_load_generator_reproduces_the_trained_generator(aldp_run):
    gen = load_generator(aldp_run)  # model.pt: no config file is read
    gen_ckpt = load_generator(aldp_run / "checkpoints" / "latest.pt")  # the last step
    for (k, a), (k2, b) in zip(gen.state_dict().items(), gen_ckpt.state_dict().items()):
        assert k == k2 and a.shape == b.shape
    # model.pt holds the weights chosen for evaluation (EMA, best periodic ESS estimate)
    selected = read_checkpoint(aldp_run / "model.pt")["extra"]["selected"]
    metrics = json.loads((aldp_run / "metrics.json").read_text())
    assert selected == metrics["selected_model"] and selected["kind"] in ("best_ess", "ema")
    # train.py's own samples are a sample folder: log q = -log w - u, with the real energy
    traj = mdtraj.load_hdf5(str(aldp_run / "samples.h5"))
    lw, u = np.load(aldp_run / "log_weights.npy"), np.load(aldp_run / "energies.npy")
    lq_saved = np.load(aldp_run / "log_q.npy")
    ff = TorchForceField.from_openmm(load_system("aldp_vacuum"))
    with torch.no_grad():
        x = torch.as_tensor(traj.xyz.reshape(traj.n_frames, -1))
        lq = gen.log_prob(x).double().numpy()
        u_new = ff.float()(x).double().numpy()
    ok = np.isfinite(lw)
    assert ok.mean() > 0.9
    np.testing.assert_array_equal(lw[ok], -u[ok] - lq_saved[ok])  # how the weights were made
    np.testing.assert_allclose(lq[ok], lq_saved[ok], atol=1e-2)
    np.testing.assert_allclose(u_new[ok], u[ok], rtol=1e-5)


def test_a_lone_checkpoint_samples_and_bad_ones_are_clear_errors(aldp_run, tmp_path):
    lone = tmp_path / "lone" / "model.pt"  # the file alone: no config.yaml, no MD data
    lone.parent.mkdir()
    lone.write_bytes((aldp_run / "model.pt").read_bytes())
    out = tmp_path / "x"
    run_script("sample", [f"checkpoint={lone}", f"out={out}", "n_samples=50"], tmp_path)
    assert json.loads((out / "summary.json").read_text())["n_samples"] == 50

    broken = tmp_path / "broken" / "checkpoints" / "latest.pt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(lone.read_bytes()[:1000])  # truncated by a crash
    (broken.parent / "best.pt").write_bytes(lone.read_bytes())
    res = run_script(
        "sample", [f"checkpoint={broken}", f"out={tmp_path / 'y'}", "n_samples=10"], tmp_path, False
    )
    assert res.returncode == 2 and "latest.pt" in res.stderr and "best.pt" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "y" / "summary.json").exists()


def test_sample_toy_writes_npy(toy_run, tmp_path):
    out = tmp_path / "toy"
    args = [f"checkpoint={toy_run}", "n_samples=1000", "batch_size=256", f"out={out}"]
    run_script("sample", [*args, "progress=false"], tmp_path)
    x = np.load(out / "samples.npy")
    assert x.shape == (1000, 2) and not (out / "samples.h5").exists()
    u, lq, lw = (np.load(out / f"{k}.npy") for k in ("energies", "log_q", "log_weights"))
    np.testing.assert_allclose(u, DoubleWell()(torch.as_tensor(x)).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lw, -u - lq)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ess"] == pytest.approx(effective_sample_size(lw), rel=1e-12)
    assert 0.05 < summary["ess"] <= 1.0  # a flow fitted to the data is a fair proposal


def test_sample_with_ais_writes_exact_weights_and_its_settings(aldp_run, tmp_path):
    """ais.steps > 0: the written frames are the final AIS points, their energies are the
    stored ones, log_q = -u - log w, and the summary records the sampler."""
    out = tmp_path / "ais"
    args = [f"checkpoint={aldp_run}", "n_samples=400", "batch_size=200", "progress=false"]
    run_script("sample", [*args, "ais.steps=3", "energy=torchff", f"out={out}"], tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    sampler = summary["sampler"]
    assert sampler["kind"] == "ais" and sampler["steps"] == 3 and sampler["leapfrog"] == 1
    assert len(sampler["step_sizes"]) == 3 and all(s > 0 for s in sampler["step_sizes"])
    assert len(sampler["acceptance"]) == 3 and all(0 < a <= 1 for a in sampler["acceptance"])
    lw, u, lq = (np.load(out / f"{k}.npy") for k in ("log_weights", "energies", "log_q"))
    finite = np.isfinite(lw)
    assert finite.mean() > 0.5
    np.testing.assert_allclose(lw[finite], -u[finite] - lq[finite], rtol=1e-12)
    traj = mdtraj.load_hdf5(str(out / "samples.h5"))
    x = torch.as_tensor(traj.xyz.reshape(400, -1), dtype=torch.float64)
    u_ref = TorchForceField.from_openmm(load_system("aldp_vacuum"))(x).numpy()
    ok = np.isfinite(u)
    assert np.median(np.abs(u_ref[ok] - u[ok]) / np.maximum(np.abs(u[ok]), 1.0)) < 1e-3
    # not the plain flow's weights: log q of the model differs from the stored -u - log w
    gen = load_generator(aldp_run, dtype="float64")
    with torch.no_grad():
        lq_model = gen.log_prob(x).numpy()
    assert np.median(np.abs(lq_model[finite] - lq[finite])) > 1e-3
    bad = run_script("sample", [*args, "ais.steps=-1", f"out={tmp_path / 'x'}"], tmp_path, ok=False)
    assert "ais.steps=-1" in bad.stderr + bad.stdout


def test_sample_other_weights_of_the_training_checkpoint(toy_run, tmp_path):
    """weights=ema / last sample the training checkpoint's other weights; model.pt alone
    and an unknown name are clear errors before any sampling."""
    x = None
    for weights in ("ema", "last"):
        out = tmp_path / weights
        args = [f"checkpoint={toy_run}", "n_samples=300", f"out={out}", f"weights={weights}"]
        run_script("sample", [*args, "progress=false"], tmp_path)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["weights"] == weights
        assert summary["checkpoint"] == str(toy_run / "checkpoints" / "latest.pt")
        x = torch.as_tensor(np.load(out / "samples.npy"))
        gen = load_generator(toy_run, weights=weights)
        with torch.no_grad():
            lq = gen.log_prob(x.to(next(gen.parameters()).dtype)).double().numpy()
        np.testing.assert_allclose(np.load(out / "log_q.npy"), lq, rtol=1e-5, atol=1e-5)
    # the two weight sets are not the same model (the EMA lags the last step)
    with torch.no_grad():
        a, b = (load_generator(toy_run, weights=w).log_prob(x.float()) for w in ("ema", "last"))
    assert not torch.allclose(a, b)
    bad = [f"out={tmp_path / 'bad'}", "n_samples=10"]
    res = run_script(
        "sample", [f"checkpoint={toy_run / 'model.pt'}", "weights=ema", *bad], tmp_path, False
    )
    assert "training checkpoint" in res.stderr and "Traceback" not in res.stderr
    res = run_script("sample", [f"checkpoint={toy_run}", "weights=best", *bad], tmp_path, False)
    assert "weights" in res.stderr and "best_ess" in res.stderr
    assert not (tmp_path / "bad" / "summary.json").exists()
