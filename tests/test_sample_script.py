"""scripts/sample.py and scripts/common.load_run on tiny trained runs (ALDP and a toy)."""

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
from omegaconf import OmegaConf

from bgflow_mini.energies import DoubleWell, TorchForceField
from bgflow_mini.reweighting import effective_sample_size

ROOT = Path(__file__).parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import common  # noqa: E402

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
    return trained_run(
        tmp_path_factory, "aldp", ["system=aldp_vacuum", "energy=torchff", *TINY_MD, *FAST]
    )


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory, "toy", [*TOY, *FAST])


def test_sample_aldp_writes_consistent_files(aldp_run, tmp_path):
    out = tmp_path / "s"
    args = [f"checkpoint={aldp_run}", "n_samples=700", "batch_size=300", "progress=false"]
    res = run_script("sample", [*args, "formats=[h5,dcd,pdb]", f"out={out}"], tmp_path)
    assert "ess" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    lw, u, lq = (np.load(out / f"{k}.npy") for k in ("log_weights", "energies", "log_q"))
    assert summary["n_samples"] == 700 and lw.shape == u.shape == lq.shape == (700,)
    assert summary["system"] == "aldp_vacuum" and summary["energy"] == "TorchForceField"
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
    assert OmegaConf.load(out / "run_config.yaml").system.name == "aldp_vacuum"

    # the frames on disk are the frames whose energies and densities were stored
    x = torch.as_tensor(traj.xyz.reshape(700, -1), dtype=torch.float64)
    _, system, gen = common.load_run(aldp_run, "cpu", "float64", with_energy=False)
    u_ref = TorchForceField.from_openmm(system)(x).numpy()
    ok = np.isfinite(u)
    rel = np.abs(u_ref[ok] - u[ok]) / np.maximum(np.abs(u[ok]), 1.0)
    assert np.median(rel) < 1e-3  # float32 positions on disk
    with torch.no_grad():
        lq_ref = gen.log_prob(x).numpy()
    assert np.median(np.abs(lq_ref - lq)) < 1e-2


def test_load_run_reproduces_the_trained_generator(aldp_run):
    cfg, system, gen = common.load_run(aldp_run, "cpu", regularize=True)
    _, _, gen_ckpt = common.load_run(aldp_run / "checkpoints" / "latest.pt", "cpu")
    for (k, a), b in zip(gen.state_dict().items(), gen_ckpt.state_dict().values()):
        assert torch.equal(a, b), k
    assert cfg.system.name == "aldp_vacuum" and system.n_atoms == 22
    # train.py's own samples: log q = -log w - u (its weights use the regularised energy)
    traj = mdtraj.load_hdf5(str(aldp_run / "samples.h5"))
    lw, u = np.load(aldp_run / "log_weights.npy"), np.load(aldp_run / "energies.npy")
    with torch.no_grad():
        x = torch.as_tensor(traj.xyz.reshape(traj.n_frames, -1))
        lq = gen.log_prob(x).double().numpy()
        u_new = gen.reduced_energy(x).double().numpy()
    ok = np.isfinite(lw)
    assert ok.mean() > 0.9
    np.testing.assert_allclose(lq[ok], -lw[ok] - u[ok], atol=1e-2)
    np.testing.assert_allclose(u_new[ok], u[ok], rtol=1e-5)


def test_mismatched_checkpoint_and_config_are_clear_errors(aldp_run, tmp_path):
    cfg = OmegaConf.load(aldp_run / "config.yaml")
    cfg.flow.hidden = [8]  # a different flow size
    other = tmp_path / "other.yaml"
    OmegaConf.save(cfg, other)
    with pytest.raises(ValueError, match="does not match the generator"):
        common.load_run(aldp_run / "model.pt", config=other, with_energy=False)
    with pytest.raises(ValueError, match=r"flow\.hidden"):  # checkpoints carry the flow
        common.load_run(aldp_run / "checkpoints" / "latest.pt", config=other, with_energy=False)

    cfg = OmegaConf.load(aldp_run / "config.yaml")
    cfg.system = {"name": "double_well", "load": {"_target_": "bgflow_mini.energies.DoubleWell"}}
    toy = tmp_path / "toy.yaml"
    OmegaConf.save(cfg, toy)
    with pytest.raises(ValueError, match="trained on system 'aldp_vacuum'"):
        common.load_run(aldp_run / "checkpoints" / "best.pt", config=toy, with_energy=False)
    with pytest.raises(ValueError, match="does not match"):
        common.load_run(aldp_run / "model.pt", config=toy, with_energy=False)

    lone = tmp_path / "lone.pt"
    lone.write_bytes((aldp_run / "model.pt").read_bytes())
    with pytest.raises(FileNotFoundError, match="config=PATH"):
        common.load_run(lone, with_energy=False)

    res = run_script(
        "sample",
        [f"checkpoint={lone}", f"config={other}", f"out={tmp_path / 'x'}", "n_samples=10"],
        tmp_path,
        ok=False,
    )
    assert "does not match" in res.stderr
    assert not (tmp_path / "x" / "summary.json").exists()


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
