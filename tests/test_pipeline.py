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


# ---- evaluation with many named CVs, several residues and chirality -----------------------


def test_molecular_data_pools_replicas_with_their_weights(tmp_path):
    """``replicas=2``: the ML rows are both temperatures' training frames, weighted by MBAR
    (or equally); validation, test and the reference stay at the target temperature."""
    from test_data import SETTINGS, toy_system

    from bgflow_mini.pipeline import molecular_data
    from bgflow_mini.replica_pool import pool_log_weights

    settings = {**SETTINGS, "n_replicas": 3, "keep_replicas": 2}
    kw = dict(fractions=(0.5, 0.25, 0.25), n_workers=1, progress=False, log=None)
    plain = molecular_data(toy_system(), settings, tmp_path, **kw)
    assert plain.pool is None and "replica_pool" not in plain.info
    rows, weights = plain.ml_data()
    assert rows is plain.train and weights is None
    split = molecular_data(toy_system(), settings, tmp_path, replicas=2, **kw)
    torch.testing.assert_close(split.test, plain.test)
    rows, weights = split.ml_data()
    n = plain.train.shape[0]
    assert rows.shape == (2 * n, 6) and torch.equal(rows[:n], plain.train)
    pool = split.info["replica_pool"]
    assert pool["n_frames"] == 2 * n and pool["target_frames"] == n
    assert sum(pool["weight_share"]) == pytest.approx(1.0)
    assert pool["weight_share"][0] > pool["weight_share"][1] > 0  # the hotter replica counts less
    expect = pool_log_weights(
        np.load(split.info["cache_path"] + "/replica_energies.npy")[:2, :n].reshape(-1),
        np.repeat([0, 1], n),
        np.array(pool["temperatures"]),
    )
    torch.testing.assert_close(weights / weights.sum(), torch.as_tensor(np.exp(expect)))
    # the evaluation's reference: every frame of both temperatures, MBAR-weighted
    n_all = plain.reference.shape[0]
    ref = split.md_reference
    assert ref.positions.shape == (2 * n_all, 6) and (ref.kind, ref.n_series) == ("md_mbar", 2)
    np.testing.assert_array_equal(ref.positions[:n_all], plain.reference.numpy())
    u_all = np.load(split.info["cache_path"] + "/replica_energies.npy")[:2]
    expect_all = pool_log_weights(
        u_all.reshape(-1), np.repeat([0, 1], n_all), np.array(pool["temperatures"])
    )
    np.testing.assert_allclose(ref.log_w, expect_all, rtol=1e-12)
    assert plain.md_reference.kind == "md" and plain.md_reference.log_w is None
    np.testing.assert_array_equal(plain.md_reference.positions, plain.reference.numpy())
    assert n_all < pool["reference_kish_frames"] < 2 * n_all
    equal = molecular_data(
        toy_system(), settings, tmp_path, replicas=2, replica_weights="equal", **kw
    )
    _, w_eq = equal.ml_data()
    assert torch.all(w_eq == w_eq[0]) and equal.info["replica_pool"][
        "kish_frames"
    ] == pytest.approx(2 * n)
    with pytest.raises(ValueError, match="replica_weights"):
        molecular_data(toy_system(), settings, tmp_path, replicas=2, replica_weights="kish", **kw)
    # a phase's own weighting: the same pool drawn equally beside the run's MBAR weights
    both = molecular_data(
        toy_system(), settings, tmp_path, replicas=2, extra_weightings=["equal"], **kw
    )
    torch.testing.assert_close(both.ml_data()[1], weights)
    torch.testing.assert_close(both.ml_data("mbar")[1], weights)
    rows_eq, w_both = both.ml_data("equal")
    assert torch.equal(rows_eq, rows) and torch.equal(w_both, w_eq)
    extra = both.info["replica_pool"]["phase_weightings"]["equal"]
    assert extra["kish_frames"] == pytest.approx(2 * n)
    assert extra["weight_share"] == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="no ML draw weights for replica weighting 'equal'"):
        split.ml_data("equal")
    with pytest.raises(ValueError, match="no replica pool"):
        plain.ml_data("mbar")
    with pytest.raises(ValueError, match=r"need a replica pool \(replicas > 1\)"):
        molecular_data(toy_system(), settings, tmp_path, extra_weightings=["equal"], **kw)


def test_molecular_data_pools_reference_runs_of_other_md_seeds(tmp_path):
    """``reference_seeds``: further MD runs of the same settings join the evaluation's
    reference, each run with its own MBAR weights; the training data stays the run's own."""
    from test_data import SETTINGS, toy_system

    from bgflow_mini.pipeline import molecular_data

    settings = {**SETTINGS, "n_replicas": 3, "keep_replicas": 2}
    kw = dict(fractions=(0.5, 0.25, 0.25), n_workers=1, progress=False, log=None, replicas=2)
    own = molecular_data(toy_system(), settings, tmp_path, **kw)
    other = molecular_data(toy_system(), {**settings, "seed": 1}, tmp_path, **kw)
    both = molecular_data(toy_system(), settings, tmp_path, reference_seeds=[1], **kw)
    ref = both.md_reference
    assert (ref.n_runs, ref.n_replicas, ref.kind) == (2, 2, "md_mbar")
    for r, single in enumerate((own, other)):
        one = single.md_reference
        np.testing.assert_array_equal(ref.positions[ref.run_frames(r)], one.positions)
        w = np.exp(ref.log_w[ref.run_frames(r)])
        np.testing.assert_allclose(w / w.sum(), np.exp(one.log_w) / np.exp(one.log_w).sum())
    assert not np.array_equal(own.md_reference.positions, other.md_reference.positions)
    assert torch.equal(both.train, own.train) and torch.equal(both.pool, own.pool)
    runs = both.info["md_reference"]["runs"]
    assert [r["md_seed"] for r in runs] == [0, 1]
    assert [r["cache_key"] for r in runs] == [own.info["cache_key"], other.info["cache_key"]]
    assert both.info["md_reference"]["label"] == "MD (2 runs x 2 replicas, MBAR)"
    # the seeds are checked before any MD: none is run into an empty folder
    empty = tmp_path / "empty"
    for bad in ([0], [1, 1]):
        with pytest.raises(ValueError, match="understate the reference's error"):
            molecular_data(toy_system(), settings, empty, reference_seeds=bad, **kw)
    assert not empty.exists() or not any(empty.iterdir())
