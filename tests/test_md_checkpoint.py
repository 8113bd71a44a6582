"""MD checkpoints: a run killed part way resumes from its last state, keeps every frame
written before it, and ends with a complete, consistent result."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_md import double_well

import bgflow_mini.data as data
import bgflow_mini.replica as replica
import bgflow_mini.replica_workers as workers
from bgflow_mini.data import generate_or_load, load_trajectory
from bgflow_mini.file_lock import FileLock
from bgflow_mini.md_checkpoint import CheckpointMismatch, MDCheckpoint, remove_checkpoint
from bgflow_mini.replica import replica_seeds, run_replicas


class _Crash(RuntimeError):
    pass


def _crash_after(monkeypatch: pytest.MonkeyPatch, n_calls: int) -> None:
    """Make the in-process replicas fail on their ``n_calls``-th chunk (a crash or kill)."""
    real = workers.ReplicaGroup.advance
    count = {"n": 0}

    def advance(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] >= n_calls:
            raise _Crash("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(workers.ReplicaGroup, "advance", advance)


RUN = dict(
    temperatures=[300.0, 450.0],
    n_frames=60,
    save_every=10,
    swap_every=20,
    timestep=0.005,
    seed=3,
    equilibration_steps=40,
    n_workers=1,
    keep_all=True,
    progress=False,
)


def _run(checkpoint=None, dw=None, **kwargs):
    dw = dw or double_well()
    args = {**RUN, **kwargs}
    return run_replicas(dw.system, dw.positions, checkpoint=checkpoint, **args)


class _Clock:
    """A stand-in for ``time`` in :mod:`bgflow_mini.replica`: each call is one second."""

    def __init__(self) -> None:
        self.t = 0.0

    def perf_counter(self) -> float:
        self.t += 1.0
        return self.t


@pytest.mark.parametrize("every", [0.0, 7.0])
def test_killed_run_resumes_and_keeps_its_frames(tmp_path, monkeypatch, every) -> None:
    """``every = 0``: the state saved after every chunk; 7 (a clock that ticks once per
    call): every few chunks, so frames written after the last save are redone."""
    whole = _run()
    folder = tmp_path / "ckpt"
    _crash_after(monkeypatch, 40)  # 4 equilibration + 60 production chunks: dies at frame ~35
    monkeypatch.setattr(replica, "time", _Clock())
    with pytest.raises(_Crash):
        _run(folder, checkpoint_every=every)
    with np.load(folder / "state.npz") as state:
        chunk, frame = int(state["chunk"]), int(state["frame"])
    assert 4 < chunk < 40 and 0 < frame < 36
    written = int((np.load(folder / "potential.npy")[0] != 0).sum())
    assert written == 35 if every == 0 else frame < written == 35
    monkeypatch.undo()

    resumed = _run(folder)
    assert not folder.exists()  # removed once complete
    assert resumed["resumed_at_steps"] == [chunk * 10]
    assert whole["resumed_at_steps"] == []
    # the frames before the checkpoint are the uninterrupted run's, bit for bit
    for key in ("positions", "potential", "kinetic", "walkers"):
        a, b = whole[key], resumed[key]
        assert a.shape == b.shape
        np.testing.assert_array_equal(a[:, :frame], b[:, :frame])
    # the rest is a new continuation: filled, and not the same noise
    assert np.all(resumed["potential"][:, frame:] != 0.0)
    assert not np.array_equal(whole["positions"][:, frame:], resumed["positions"][:, frame:])
    # swap counters go on from the saved ones: every swap round counted once
    assert resumed["swap_attempts"].sum() == whole["swap_attempts"].sum()


def test_resume_starts_from_the_saved_state(tmp_path, monkeypatch) -> None:
    """The first chunk after a resume starts where the checkpoint left each replica (not
    from the starting structure): a free particle with almost no friction drifts away
    before the crash, and the first new frame lies one 20 fs chunk from the last saved one."""
    free = double_well(a=0.0, b=0.0, k=0.0)
    folder = tmp_path / "ckpt"
    kw = dict(friction=1e-6, timestep=0.002, save_every=10, swap_every=None, n_frames=60,
              temperatures=[300.0], equilibration_steps=0, keep_all=False)  # fmt: skip
    _crash_after(monkeypatch, 40)
    with pytest.raises(_Crash):
        _run(folder, dw=free, checkpoint_every=0.0, **kw)
    with np.load(folder / "state.npz") as state:
        frame, xyz = int(state["frame"]), state["xyz"]
    monkeypatch.undo()
    with np.load(folder / "state.npz") as state:
        vel = state["vel"][0, 0]  # nm/ps
    out = _run(folder, dw=free, **kw)
    path = out["positions"][:, 0]  # (n_frames, 3) nm
    np.testing.assert_allclose(path[frame - 1], xyz[0, 0], atol=1e-6)
    step = np.linalg.norm(np.diff(path[:frame], axis=0), axis=1).max()  # largest 20 fs move
    start = np.array([-1.0, 0.0, 0.0])
    assert np.linalg.norm(path[frame - 1] - start) > 5 * step  # far from the start
    # and with the saved velocity: no force, almost no friction, so 20 fs of free flight
    np.testing.assert_allclose(path[frame] - path[frame - 1], vel * 0.02, rtol=1e-3, atol=1e-6)


def test_state_and_swap_stream_round_trip(tmp_path) -> None:
    """What :meth:`MDCheckpoint.save` writes, :meth:`MDCheckpoint.open` gives back exactly,
    the swap generator's state included (its next draws are the same)."""
    ck = MDCheckpoint(tmp_path, {"seed": 1}, {"walkers": ((2, 3), np.int64)})
    assert ck.open() is None
    ck.arrays["walkers"][:, :2] = [[0, 1], [1, 0]]
    rng = np.random.default_rng(5)
    rng.random(7)
    xyz = np.random.default_rng(0).normal(size=(2, 1, 3))
    ck.save({"chunk": 4, "frame": 2, "xyz": xyz}, rng.bit_generator.state)
    expected = rng.random(5)
    with pytest.raises(RuntimeError, match="in use by another process"):
        MDCheckpoint(tmp_path, {"seed": 1}, {"walkers": ((2, 3), np.int64)}).open()
    ck.close()

    again = MDCheckpoint(tmp_path, {"seed": 1}, {"walkers": ((2, 3), np.int64)})
    state = again.open()
    assert int(state["chunk"]) == 4 and int(state["frame"]) == 2
    np.testing.assert_array_equal(state["xyz"], xyz)
    np.testing.assert_array_equal(again.arrays["walkers"], [[0, 1, 0], [1, 0, 0]])
    restored = np.random.default_rng(0)
    restored.bit_generator.state = state["rng"]
    np.testing.assert_array_equal(restored.random(5), expected)


def test_checkpoint_of_another_run_is_refused(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "ckpt"
    _crash_after(monkeypatch, 20)
    with pytest.raises(_Crash):
        _run(folder, checkpoint_every=0.0)
    monkeypatch.undo()
    with pytest.raises(CheckpointMismatch, match=r"differs in \['seed'\]: seed: 3 there, 4 here"):
        _run(folder, seed=4)
    assert (folder / "state.npz").exists()  # left for the run it belongs to
    # another force field (or starting structure) under the same settings: refused too
    with pytest.raises(CheckpointMismatch, match=r"differs in \['system_sha256'\]"):
        _run(folder, dw=double_well(k=500.0))
    _run(folder)  # the run it belongs to resumes
    assert not folder.exists()


def test_checkpoint_arrays_must_match(tmp_path) -> None:
    sig = {"seed": 0}
    MDCheckpoint(tmp_path, sig, {"potential": ((2, 5), np.float64)}).open()
    ck = MDCheckpoint(tmp_path, sig, {"potential": ((2, 5), np.float64)})
    ck.open()
    ck.save({"chunk": 1}, {"state": 1})
    ck.close()
    with pytest.raises(CheckpointMismatch, match="potential.npy is"):
        MDCheckpoint(tmp_path, sig, {"potential": ((2, 6), np.float64)}).open()
    (tmp_path / "potential.npy").unlink()  # a kill while it was deleted, or a stray rm
    with pytest.raises(CheckpointMismatch, match="is damaged .* delete the folder"):
        MDCheckpoint(tmp_path, sig, {"potential": ((2, 5), np.float64)}).open()


def test_a_state_without_an_entry_is_damaged_and_the_folder_freed(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "ckpt"
    _crash_after(monkeypatch, 20)
    with pytest.raises(_Crash):
        _run(folder, checkpoint_every=0.0)
    monkeypatch.undo()
    with np.load(folder / "state.npz") as saved:
        state = {k: saved[k] for k in saved.files if k != "walker"}
    np.savez(folder / "state.npz", **state)
    with pytest.raises(CheckpointMismatch, match="damaged .*no 'walker'"):
        _run(folder)
    state["walker"] = np.arange(3)  # three replicas' worth in a two-replica run
    np.savez(folder / "state.npz", **state)
    with pytest.raises(CheckpointMismatch, match=r"walker is \(3,\), not \(2,\)"):
        _run(folder)
    lock = FileLock(folder / ".lock")  # released after each refusal
    assert lock.acquire(blocking=False)
    lock.release()


def test_only_a_file_system_without_reservations_is_passed_over(tmp_path, monkeypatch) -> None:
    import errno

    import bgflow_mini.md_checkpoint as mc

    def refuse(code):
        def fallocate(*args):
            raise OSError(code, "refused")

        return fallocate

    path = tmp_path / "a.npy"
    np.save(path, np.zeros(4))
    monkeypatch.setattr(mc.os, "posix_fallocate", refuse(errno.EOPNOTSUPP))
    mc._reserve(path)  # cannot reserve here: goes on
    monkeypatch.setattr(mc.os, "posix_fallocate", refuse(errno.EDQUOT))
    with pytest.raises(OSError, match="refused"):
        mc._reserve(path)
    monkeypatch.setattr(mc.os, "posix_fallocate", refuse(errno.ENOSPC))
    with pytest.raises(OSError, match="no room for the MD checkpoint"):
        mc._reserve(path)


def test_a_folder_of_other_files_is_refused_and_kept(tmp_path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "thesis_data.npy").write_bytes(b"precious")
    with pytest.raises(ValueError, match="holds other files"):
        _run(folder)
    assert (folder / "thesis_data.npy").read_bytes() == b"precious"
    # removing a checkpoint deletes its own files only
    ck = MDCheckpoint(tmp_path / "ck", {"seed": 0}, {"walkers": ((2, 3), np.int64)})
    ck.open()
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    ck.remove()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["notes.txt"]


def test_a_kept_checkpoint_returns_the_finished_run(tmp_path) -> None:
    """With ``keep_checkpoint`` the folder holds the finished run: the same call returns
    it again without MD (every counter as saved), until it is removed."""
    folder = tmp_path / "ckpt"
    first = _run(folder, keep_checkpoint=True)
    with np.load(folder / "state.npz") as state:
        assert int(state["frame"]) == 60 and int(state["chunk"]) == 64
    again = _run(folder, keep_checkpoint=True)
    assert again["resumed_at_steps"] == [640] and first["resumed_at_steps"] == []
    for key in ("positions", "potential", "kinetic", "walkers", "swap_attempts",
                "swap_accepts", "round_trips", "production_steps"):  # fmt: skip
        np.testing.assert_array_equal(again[key], first[key])
    assert again["production_time_s"] > 0
    remove_checkpoint(folder)
    assert not folder.exists()


def test_resume_seeds_are_new_and_valid() -> None:
    a, b = replica_seeds(0, 4, resumed_at=10), replica_seeds(0, 4, resumed_at=11)
    assert a.shape == (4, 2) and np.all((a > 0) & (a < 2**31))
    assert not np.array_equal(a, b) and not np.array_equal(a, replica_seeds(0, 4))


def test_data_cache_resumes_a_killed_md(tmp_path, monkeypatch, caplog) -> None:
    dw = double_well()
    dw.name = "double_well_md"
    settings = dict(n_frames=40, save_every=10, timestep=0.005, n_replicas=2, t_max=450.0,
                    swap_every=20, equilibration_steps=0, seed=1)  # fmt: skip
    monkeypatch.setattr(data, "MD_CHECKPOINT_EVERY_S", 0.0)
    _crash_after(monkeypatch, 30)
    messages: list[str] = []
    with pytest.raises(_Crash):
        generate_or_load(dw, settings, tmp_path, n_workers=1, progress=False, log=messages.append)
    root = tmp_path / "double_well_md"
    partial = [p for p in root.iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and (partial[0] / "state.npz").exists()
    assert not [p for p in root.iterdir() if not p.name.startswith(".")]  # nothing complete
    monkeypatch.undo()

    with caplog.at_level(logging.INFO, logger="bgflow_mini.replica"):
        entry = generate_or_load(dw, settings, tmp_path, n_workers=1, progress=False,
                                 log=messages.append)  # fmt: skip
    assert "resuming the MD checkpointed" in messages[-1]
    assert any("MD: resuming" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in root.iterdir()) == [entry.key]  # no partial, no lock left
    meta = json.loads((entry.path / "meta.json").read_text())
    assert meta["info"]["resumed_at_steps"] and len(load_trajectory(entry)) == 40


def _dw_md():
    dw = double_well()
    dw.name = "double_well_md"
    settings = dict(n_frames=40, save_every=10, timestep=0.005, n_replicas=2, t_max=450.0,
                    swap_every=20, equilibration_steps=0, seed=1)  # fmt: skip
    return dw, settings


def test_data_cache_keeps_the_md_until_the_entry_is_stored(tmp_path, monkeypatch) -> None:
    """A crash while the entry is written loses no MD: the next call stores the
    checkpointed run without running MD again."""
    dw, settings = _dw_md()

    def broken_store(*args, **kwargs):
        raise _Crash("killed while writing the entry")

    monkeypatch.setattr(data, "_store", broken_store)
    with pytest.raises(_Crash):
        generate_or_load(dw, settings, tmp_path, n_workers=1, progress=False, log=None)
    monkeypatch.undo()
    root = tmp_path / "double_well_md"
    (partial,) = [p for p in root.iterdir() if p.name.endswith(".partial")]
    with np.load(partial / "state.npz") as state:
        assert int(state["frame"]) == 40  # the whole run
    entry = generate_or_load(dw, settings, tmp_path, n_workers=1, progress=False, log=None)
    assert entry.meta["info"]["resumed_at_steps"] == [400]  # at its end: no new MD
    assert sorted(p.name for p in root.iterdir()) == [entry.key]


def test_a_stored_entry_drops_a_checkpoint_left_beside_it(tmp_path, monkeypatch) -> None:
    """A crash after the entry was stored but before its checkpoint was removed: the next
    call hits the entry and removes the leftover checkpoint."""
    dw, settings = _dw_md()
    monkeypatch.setattr(data, "remove_checkpoint", lambda folder: None)  # "killed" there
    key = generate_or_load(dw, settings, tmp_path, n_workers=1, progress=False, log=None).key
    monkeypatch.undo()
    root = tmp_path / "double_well_md"
    assert (root / f".{key}.partial" / "state.npz").exists()
    entry = generate_or_load(dw, settings, tmp_path, n_workers=1, progress=False, log=None)
    assert entry.hit and sorted(p.name for p in root.iterdir()) == [key]


def test_data_cache_replaces_a_checkpoint_of_another_version(tmp_path) -> None:
    dw, settings = _dw_md()
    key = generate_or_load(dw, settings, tmp_path, n_workers=1, progress=False, log=None).key
    root = tmp_path / "double_well_md"
    shutil.rmtree(root / key)
    old = MDCheckpoint(root / f".{key}.partial", {"version": 0}, {"x": ((2,), np.float64)})
    old.open()
    old.save({"chunk": 1}, {})
    old.close()
    messages: list[str] = []
    entry = generate_or_load(dw, settings, tmp_path, n_workers=1, progress=False,
                             log=messages.append)  # fmt: skip
    assert any("belongs to another run" in m and "MD from the start" in m for m in messages)
    assert not entry.meta["info"].get("resumed_at_steps")
    assert sorted(p.name for p in root.iterdir()) == [key]


def test_a_second_process_waits_for_the_md_instead_of_repeating_it(tmp_path) -> None:
    dw, settings = _dw_md()
    entry = generate_or_load(dw, settings, tmp_path, n_workers=1, progress=False, log=None)
    root, aside = entry.path.parent, tmp_path / "aside"
    shutil.move(entry.path, aside)
    holder = FileLock(root / f".{entry.key}.lock")  # "another process" making the MD
    assert holder.acquire(blocking=False)
    messages: list[str] = []
    waiter = threading.Thread(target=lambda: messages.append(generate_or_load(
        dw, settings, tmp_path, n_workers=1, progress=False, log=messages.append)),
        daemon=True)  # fmt: skip
    try:
        waiter.start()
        deadline = time.monotonic() + 30
        while not messages and time.monotonic() < deadline:
            time.sleep(0.01)
        assert messages and "another process is making this MD" in messages[0]
        shutil.move(aside, entry.path)  # the other process stores its entry, then unlocks
    finally:
        holder.release(remove=True)
    waiter.join(timeout=60)
    hit = messages[-1]
    assert hit.hit and hit.path == entry.path
    assert not any("generating" in str(m) for m in messages)


def test_resume_with_worker_processes(tmp_path, monkeypatch) -> None:
    """The same with the replicas in two worker processes (the parent dies part way)."""
    whole = _run(n_workers=2)
    folder = tmp_path / "ckpt"
    real, count = workers.ProcessHandle.result, {"n": 0}

    def result(self):
        count["n"] += 1
        if count["n"] >= 2 * 30:  # two handles: the 30th chunk
            raise _Crash("killed")
        return real(self)

    monkeypatch.setattr(workers.ProcessHandle, "result", result)
    with pytest.raises(_Crash):
        _run(folder, n_workers=2, checkpoint_every=0.0)
    monkeypatch.undo()
    with np.load(folder / "state.npz") as state:
        frame = int(state["frame"])
    resumed = _run(folder, n_workers=2)
    assert 0 < frame < 60 and resumed["resumed_at_steps"]
    np.testing.assert_array_equal(whole["positions"][:, :frame], resumed["positions"][:, :frame])
    assert np.all(resumed["potential"] != 0.0)


_KILLED_JOB = """
import sys
sys.path.insert(0, {tests!r})
from test_md import double_well
import bgflow_mini.data as data
data.MD_CHECKPOINT_EVERY_S = 0.0
dw = double_well()
dw.name = "double_well_md"
data.generate_or_load(dw, {settings!r}, {root!r}, n_workers=1, progress=False, log=None)
"""


def test_a_process_killed_with_sigkill_resumes(tmp_path) -> None:
    """A real kill -9 of an MD job: the kernel drops its locks, and the next call resumes
    from the checkpoint and completes the entry."""
    _, settings = _dw_md()
    settings = {**settings, "n_frames": 4000}  # long enough to be killed part way
    code = _KILLED_JOB.format(tests=str(Path(__file__).parent), settings=settings,
                              root=str(tmp_path))  # fmt: skip
    job = subprocess.Popen([sys.executable, "-c", code])
    root = tmp_path / "double_well_md"
    try:
        for _ in range(600):
            states = list(root.glob(".*.partial/state.npz")) if root.exists() else []
            if states:
                break
            assert job.poll() is None, "the MD job ended before it could be killed"
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    with np.load(states[0]) as state:
        frame = int(state["frame"])
    assert 0 < frame < 4000
    dw, _ = _dw_md()
    entry = generate_or_load(dw, settings, tmp_path, n_workers=1, progress=False, log=None)
    assert entry.meta["info"]["resumed_at_steps"] and len(load_trajectory(entry)) == 4000
    assert sorted(p.name for p in root.iterdir()) == [entry.key]


@pytest.mark.parametrize("code", ["ENOLCK", "EIO"])
def test_only_a_file_system_without_locks_runs_unlocked(tmp_path, monkeypatch, code) -> None:
    """No locks on the file system: MD without a checkpoint; any other error is raised."""
    import errno

    import bgflow_mini.file_lock as fl

    def flock(*args):
        raise OSError(getattr(errno, code), "flock refused")

    dw, settings = _dw_md()
    monkeypatch.setattr(fl.fcntl, "flock", flock)
    messages: list[str] = []
    run = dict(n_workers=1, progress=False, log=messages.append)
    if code == "EIO":
        with pytest.raises(OSError, match="flock refused"):
            generate_or_load(dw, settings, tmp_path, **run)
        return
    entry = generate_or_load(dw, settings, tmp_path, **run)
    assert any("no file locks" in m and "MD without a checkpoint" in m for m in messages)
    assert len(load_trajectory(entry)) == 40
