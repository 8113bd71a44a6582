"""A Boltzmann generator for alanine dipeptide from the package's parts (IC flow + RNVP +
prior), trained by maximum likelihood on short MD: its samples are valid molecules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bgflow_mini import pipeline
from bgflow_mini.coordinates import build_zmatrix
from bgflow_mini.energies import OpenMMEnergy
from bgflow_mini.flows import coupling_flow
from bgflow_mini.md import simulate
from bgflow_mini.systems import load_system
from bgflow_mini.training import Trainer, cosine_schedule


@pytest.fixture(scope="module")
def aldp():
    return load_system("aldp_vacuum")


@pytest.fixture(scope="module")
def md_frames(aldp):
    res = simulate(
        aldp, n_frames=1500, save_every=50, seed=1, equilibration_steps=2000, progress=False
    )
    return torch.as_tensor(res.trajectory.xyz.reshape(1500, -1), dtype=torch.float64)


def bond_lengths(x: np.ndarray, bonds: np.ndarray) -> np.ndarray:
    xyz = x.reshape(len(x), -1, 3)
    return np.linalg.norm(xyz[:, bonds[:, 0]] - xyz[:, bonds[:, 1]], axis=-1)


def test_ml_trained_aldp_generator_gives_valid_molecules(aldp, md_frames):
    torch.manual_seed(0)
    train = md_frames[:1200]
    factory = lambda dim, circular: coupling_flow(  # noqa: E731
        dim, 3, hidden=(64, 64), kind="rnvp", circular=circular, seed=0
    )
    with OpenMMEnergy(aldp, n_workers=1) as energy:
        bg = pipeline.molecular_generator(aldp, train, factory, energy)
        bg = bg.to(torch.float32)
        nll0 = pipeline.test_nll(bg, train)
        sched = lambda opt: cosine_schedule(opt, 400, 20, 0.05)  # noqa: E731
        trainer = Trainer(bg, lr=2e-3, batch_size=256, scheduler=sched, progress=False)
        trainer.fit(400, data=train.float())
        nll1 = pipeline.test_nll(bg, train)
        # learning happened (kT per configuration); 1,200 correlated frames of a 60 ps
        # trajectory are too few to generalise, so the held-out NLL is not asserted
        assert nll1 < nll0 - 20.0
        with torch.no_grad():
            x, log_q, u = bg.sample_weighted(1000)
    x = x.double().numpy()
    bonds = np.array([[b.atom1.index, b.atom2.index] for b in aldp.mdtraj_topology.bonds])
    ref = bond_lengths(aldp.positions.reshape(1, -1), bonds)[0]
    rel = np.abs(bond_lengths(x, bonds) / ref - 1.0).max(axis=1)  # worst bond per sample
    md_rel = np.abs(bond_lengths(md_frames.numpy(), bonds) / ref - 1.0).max(axis=1)
    # Thermal C-H stretches at 300 K reach 10% in a few MD frames too (0.07% measured),
    # so "valid" is: >= 97% of samples with every bond within 10%, none beyond 25%.
    assert (md_rel < 0.10).mean() >= 0.99
    assert (rel < 0.10).mean() >= 0.97, f"{(rel >= 0.1).mean():.1%} samples off by > 10%"
    assert rel.max() < 0.25, f"a bond deviates by {rel.max():.1%}"
    assert np.isfinite(u.numpy()).mean() >= 0.99
    assert np.isfinite(log_q.numpy()).all()
    # the reference Z-matrix places every atom exactly once
    z = build_zmatrix(aldp.mdtraj_topology, positions=aldp.positions)
    assert sorted(z[:, 0].tolist()) == list(range(aldp.n_atoms))
