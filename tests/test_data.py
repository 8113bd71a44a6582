"""Tests of the MD data cache and the data module (bgflow_mini.data)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import openmm
import pytest
import torch
from openmm import app

import bgflow_mini.data as data
from bgflow_mini.data import (
    CacheError,
    CorruptDataError,
    generate_or_load,
    load_dataset,
    load_trajectory,
    split_indices,
)

SETTINGS = {
    "n_frames": 40,
    "save_every": 10,
    "timestep": 0.005,
    "equilibration_steps": 50,
    "n_replicas": 2,
    "t_max": 600.0,
    "swap_every": 10,
}


def toy_system() -> SimpleNamespace:
    """Two particles in a harmonic well (kJ/mol, nm); enough to exercise the cache."""
    system = openmm.System()
    top = app.Topology()
    res = top.addResidue("TOY", top.addChain())
    force = openmm.CustomExternalForce("10*(x^2+y^2+z^2)")
    for i in range(2):
        system.addParticle(12.0)
        force.addParticle(i, [])
        top.addAtom(f"C{i}", app.element.carbon, res)
    system.addForce(force)
    pos = np.array([[0.1, 0.0, 0.0], [-0.1, 0.0, 0.0]])
    return SimpleNamespace(
        system=system, topology=top, positions=pos, temperature=300.0, name="toy"
    )


def run(tmp: Path, **changes: object) -> data.CacheEntry:
    return generate_or_load(
        toy_system(), {**SETTINGS, **changes}, tmp, n_workers=1, progress=False, log=None
    )


def test_cache_hit_and_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = run(tmp_path)
    assert not first.hit and first.traj_path.is_file() and first.energies_path.is_file()
    assert first.path.parent == tmp_path.resolve() / "toy"
    assert first.settings["temperatures"] == [300.0, 600.0]
    mtime = first.traj_path.stat().st_mtime_ns

    def no_md(*args: object, **kwargs: object) -> None:
        raise AssertionError("MD must not run on a cache hit")

    monkeypatch.setattr(data, "simulate_from_settings", no_md)
    second = run(tmp_path)
    assert second.hit and second.path == first.path and second.key == first.key
    assert second.traj_path.stat().st_mtime_ns == mtime
    # explicit defaults and runtime options do not change the key
    assert run(tmp_path, minimize=True).hit
    monkeypatch.undo()
    third = run(tmp_path, seed=1)
    assert not third.hit and third.key != first.key
    assert len([p for p in (tmp_path / "toy").iterdir() if not p.name.startswith(".")]) == 2
    traj = load_trajectory(first)
    assert traj.n_frames == 40 and traj.n_atoms == 2
    assert np.load(first.energies_path).shape == (40,)
    assert len(first.info["swap_acceptance"]) == 1


def test_changed_system_misses(tmp_path: Path) -> None:
    a = run(tmp_path)
    other = toy_system()
    other.system.setParticleMass(0, 13.0)
    b = generate_or_load(other, SETTINGS, tmp_path, n_workers=1, progress=False, log=None)
    assert not b.hit and b.key != a.key


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    entry = run(tmp_path)
    raw = entry.traj_path.read_bytes()
    entry.traj_path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptDataError, match="traj.h5.*truncated"):
        run(tmp_path)
    # without checksums, the HDF5 reader itself fails; the error still names the file
    with pytest.raises(CorruptDataError, match=r"traj\.h5.*delete"):
        load_trajectory(entry.traj_path, verify=False)
    # same size, flipped bytes -> checksum mismatch
    bad = bytearray(raw)
    mid = len(raw) // 2
    bad[mid : mid + 64] = bytes(b ^ 0xFF for b in raw[mid : mid + 64])
    entry.traj_path.write_bytes(bytes(bad))
    with pytest.raises(CorruptDataError, match="checksum"):
        run(tmp_path)


def test_crash_leaves_no_valid_looking_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(data.np, "save", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path)
    # nothing that looks like an entry; the finished MD is kept in its hidden checkpoint
    (left,) = (tmp_path / "toy").iterdir()
    assert left.name.endswith(".partial") and (left / "state.npz").exists()
    monkeypatch.undo()
    entry = run(tmp_path)
    assert not entry.hit and entry.meta["info"]["resumed_at_steps"]
    assert [p.name for p in (tmp_path / "toy").iterdir()] == [entry.key]


def test_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match="not writable"):
        run(blocker / "data")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_data_dir(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(CacheError, match="not writable"):
            run(ro)
    finally:
        ro.chmod(0o700)


def test_split_indices() -> None:
    tr, va, te = split_indices(103, (0.7, 0.2, 0.1), seed=4, shuffle=True)
    assert (len(tr), len(va), len(te)) == (73, 20, 10)
    allidx = np.concatenate([tr, va, te])
    assert np.array_equal(np.sort(allidx), np.arange(103))
    again = split_indices(103, (0.7, 0.2, 0.1), seed=4, shuffle=True)
    assert all(np.array_equal(x, y) for x, y in zip((tr, va, te), again, strict=True))
    assert not np.array_equal(tr, split_indices(103, (0.7, 0.2, 0.1), seed=5, shuffle=True)[0])
    blocks = split_indices(10, (0.6, 0.2, 0.2), shuffle=False)
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3, 4, 5], [6, 7], [8, 9]]
    assert [b.tolist() for b in split_indices(10, (0.6, 0.2, 0.2))] == [
        [0, 1, 2, 3, 4, 5],
        [6, 7],
        [8, 9],
    ]  # contiguous time blocks by default
    # two interleaved series (chains): each is split in time, frames 2t and 2t+1 share t
    tr, va, te = split_indices(12, (0.5, 0.25, 0.25), n_series=2)
    assert tr.tolist() == list(range(8)) and va.tolist() == [8, 9] and te.tolist() == [10, 11]
    with pytest.raises(ValueError, match="n_series"):
        split_indices(11, (0.5, 0.25, 0.25), n_series=2)
    with pytest.raises(ValueError):
        split_indices(10, (0.5, 0.5))  # type: ignore[arg-type]


def test_load_dataset(tmp_path: Path) -> None:
    entry = run(tmp_path)
    ds = load_dataset(entry, fractions=(0.5, 0.25, 0.25), seed=1, stride=2, dtype=torch.float64)
    assert ds.dim == 6 and ds.n_atoms == 2
    assert ds.train.shape == (10, 6) and ds.val.shape == (5, 6) and ds.test.shape == (5, 6)
    assert ds.train.dtype == torch.float64
    xyz = load_trajectory(entry).xyz[::2].reshape(20, 6)
    assert np.allclose(ds.val.numpy(), xyz[ds.val_idx])
    assert ds.energies is not None and ds.energies.shape == (20,)
    same = load_dataset(entry.path, fractions=(0.5, 0.25, 0.25), seed=1, stride=2)
    assert np.array_equal(same.test_idx, ds.test_idx)
    assert ds.train_idx.tolist() == list(range(10))  # time blocks: train, val, test
    assert ds.test_idx.tolist() == list(range(15, 20))


def test_remd_1fs_config_keeps_the_cache_key_of_the_earlier_default() -> None:
    """``md=remd_1fs`` must find MD caches made before hydrogen mass repartitioning became
    the default: its resolved settings hash to the key of that 5 ns alanine-dipeptide cache."""
    import yaml

    from bgflow_mini.md import resolve_settings
    from bgflow_mini.systems import load_system

    root = Path(__file__).resolve().parents[1]
    settings = yaml.safe_load((root / "configs" / "md" / "remd_1fs.yaml").read_text())
    aldp = load_system("aldp_vacuum")
    resolved = resolve_settings(settings, aldp.temperature)
    key = data.cache_key("aldp_vacuum", resolved, data.system_fingerprint(aldp))
    assert key == "b482787ea09c6e2c"
    default = yaml.safe_load((root / "configs" / "md" / "remd.yaml").read_text())
    assert (
        data.cache_key(
            "aldp_vacuum", resolve_settings(default, 300.0), data.system_fingerprint(aldp)
        )
        != key
    )


def test_kept_replicas_are_cached_and_pooled(tmp_path: Path) -> None:
    """``keep_replicas = k`` saves the positions of the k lowest temperatures (a new cache
    key; k = 1 keeps the old one); ``load_dataset(replicas=k)`` pools their training-time
    frames with each frame's replica index and energy."""
    from bgflow_mini.md import resolve_settings, simulate_from_settings

    settings = {**SETTINGS, "n_replicas": 3}
    plain = resolve_settings(settings, 300.0)
    assert resolve_settings({**settings, "keep_replicas": 1}, 300.0) == plain
    assert resolve_settings({**settings, "keep_replicas": 2}, 300.0)["keep_replicas"] == 2
    for bad in (0, 4, True, 1.5):
        with pytest.raises(ValueError, match="keep_replicas"):
            resolve_settings({**settings, "keep_replicas": bad}, 300.0)

    entry = run(tmp_path, n_replicas=3, keep_replicas=2)
    assert (entry.path / "replica_traj.h5").is_file()
    assert "replica_traj.h5" in entry.meta["files"]
    assert run(tmp_path, n_replicas=3).key != entry.key  # keep_replicas = 1: another entry
    assert not (run(tmp_path, n_replicas=3).path / "replica_traj.h5").exists()

    # the saved hot frames are the MD's replica 1 (same seed and workers: same trajectory)
    md = simulate_from_settings(
        toy_system(), {**settings, "keep_replicas": 2}, n_workers=1, progress=False
    )
    assert md.replica_positions.shape == (3, 40, 2, 3)
    ds = load_dataset(entry, fractions=(0.5, 0.25, 0.25), stride=2, replicas=2)
    n_tr = len(ds.train_idx)
    assert ds.pool.shape == (2 * n_tr, 6)
    assert torch.equal(ds.pool[:n_tr], ds.train)
    hot = md.replica_positions[1, ::2][ds.train_idx].reshape(n_tr, 6)
    np.testing.assert_allclose(ds.pool[n_tr:].numpy(), hot, atol=1e-6)
    assert ds.pool_replica.tolist() == [0] * n_tr + [1] * n_tr
    np.testing.assert_allclose(ds.pool_energies[n_tr:], md.replica_energies[1, ::2][ds.train_idx])
    np.testing.assert_allclose(ds.temperatures, entry.meta["settings"]["temperatures"][:2])
    assert load_dataset(entry).pool is None  # replicas = 1: the target's frames only
    with pytest.raises(CacheError, match="keep_replicas=3"):
        load_dataset(entry, replicas=3)
    with pytest.raises(ValueError, match="replicas"):
        load_dataset(entry, replicas=0)
