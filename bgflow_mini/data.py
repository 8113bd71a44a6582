"""MD data cache and data module.

Cache layout (one folder per settings hash)::

    <data_dir>/<system name>/<key>/traj.h5              # target-temperature frames (mdtraj HDF5)
                                   energies.npy         # kJ/mol, (n_frames,)
                                   replica_energies.npy # kJ/mol, (n_replicas, n_frames)
                                   replica_traj.h5      # only with keep_replicas = k > 1: the
                                                        # frames of replicas 1..k-1, replica-major
                                   meta.json            # settings, MD info, file checksums

``key`` is a SHA-256 prefix of the canonical JSON of: the system name, a fingerprint of
the OpenMM System (serialised XML) and starting positions, the resolved MD settings
(:func:`bgflow_mini.md.resolve_settings`) and :data:`DATA_VERSION`. Runtime options that
do not change the trajectory (``n_workers``, ``progress``) are not part of it.

Entries are written to a hidden temporary folder and renamed into place, so an
interrupted run never leaves a folder that looks complete. While the MD runs, its frames and
state are checkpointed in ``<data_dir>/<system name>/.<key>.partial/`` (every minute;
:mod:`bgflow_mini.md_checkpoint`): the same call after a crash or a kill resumes the MD from
there instead of starting again. The entry's lock (``.<key>.lock``, held from the cache miss
until the entry is stored) makes a second process that asks for the same data wait for the
first and then load its entry instead of running the same MD; the checkpoint is removed
only once the entry is in place, so a crash while it is written loses no MD. On load, file sizes and
SHA-256 checksums are compared with ``meta.json``; a truncated or corrupt file raises
:class:`CorruptDataError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mdtraj
import numpy as np
import openmm
import torch

import bgflow_mini
from bgflow_mini.file_lock import NO_LOCKS, FileLock
from bgflow_mini.md import resolve_settings, simulate_from_settings
from bgflow_mini.md_checkpoint import CheckpointMismatch, remove_checkpoint

__all__ = [
    "DATA_VERSION",
    "CacheEntry",
    "CacheError",
    "CorruptDataError",
    "MDDataset",
    "cache_key",
    "find_cached",
    "generate_or_load",
    "load_dataset",
    "load_replica_frames",
    "load_trajectory",
    "split_indices",
    "system_fingerprint",
    "trajectory_to_tensor",
]

DATA_VERSION = 1
MD_CHECKPOINT_EVERY_S = 60.0  # seconds between two saves of a running MD's state (~20 ms each)
FILES = ("traj.h5", "energies.npy", "replica_energies.npy")
REPLICA_TRAJ = "replica_traj.h5"


class CacheError(RuntimeError):
    """The data directory cannot be used (e.g. not writable)."""


class CorruptDataError(CacheError):
    """A cached file is missing, truncated or corrupt."""


@dataclass
class CacheEntry:
    """A cached MD data set. ``hit`` is True when it was found rather than generated."""

    path: Path
    key: str
    hit: bool
    meta: dict[str, Any]

    @property
    def traj_path(self) -> Path:
        return self.path / "traj.h5"

    @property
    def energies_path(self) -> Path:
        return self.path / "energies.npy"

    @property
    def settings(self) -> dict[str, Any]:
        return self.meta["settings"]

    @property
    def info(self) -> dict[str, Any]:
        return self.meta["info"]


def system_fingerprint(system: Any) -> str:
    """SHA-256 of the System XML (OpenMM version stripped) and positions rounded to 1e-6 nm."""
    xml = openmm.XmlSerializer.serialize(system.system)
    xml = re.sub(r'openmmVersion="[^"]*"', "", xml)
    pos = system.positions
    if hasattr(pos, "value_in_unit"):
        pos = pos.value_in_unit(openmm.unit.nanometer)
    pos = np.round(np.asarray(pos, dtype=np.float64), 6)
    h = hashlib.sha256(xml.encode())
    h.update(pos.tobytes())
    return h.hexdigest()[:16]


def cache_key(system_name: str, settings: dict[str, Any], fingerprint: str = "") -> str:
    """16-hex-digit hash of name, resolved settings, system fingerprint and data version."""
    payload = {
        "system": system_name,
        "settings": settings,
        "fingerprint": fingerprint,
        "data_version": DATA_VERSION,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _ensure_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        raise CacheError(
            f"data directory {directory} is not writable ({err.strerror or err}); "
            "choose another data_dir (or set BGFLOW_DATA)"
        ) from err


def _verify(path: Path, meta: dict[str, Any]) -> None:
    for name, expect in meta.get("files", {}).items():
        f = path / name
        hint = f"delete {path} to regenerate it"
        if not f.is_file():
            raise CorruptDataError(f"cached file {f} is missing; {hint}")
        size = f.stat().st_size
        if size != expect["bytes"]:
            raise CorruptDataError(
                f"cached file {f} is truncated or corrupt ({size} bytes, expected "
                f"{expect['bytes']}); {hint}"
            )
        if _sha256(f) != expect["sha256"]:
            raise CorruptDataError(f"cached file {f} is corrupt (checksum mismatch); {hint}")


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / "meta.json"
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise CorruptDataError(
            f"cannot read {meta_path} ({err}); delete {path} to regenerate it"
        ) from err


def _load_system(system: Any) -> tuple[str, Any]:
    if isinstance(system, str | os.PathLike):
        from bgflow_mini.systems import load_system

        system = load_system(system)
    return str(getattr(system, "name", "custom")), system


def generate_or_load(
    system: Any,
    settings: dict[str, Any],
    data_dir: str | os.PathLike,
    n_workers: int | None = None,
    progress: bool = True,
    verify: bool = True,
    log: Any = print,
) -> CacheEntry:
    """Return the cached data set for ``(system, settings)``, running MD on a miss.

    Arguments:
        system: system name / folder (loaded with ``load_system``) or a system object.
        settings: MD settings (keys of :data:`bgflow_mini.md.MD_DEFAULTS`).
        data_dir: cache root; created if needed; must be writable on a miss.
        n_workers, progress: passed to the MD run; not part of the key.
        verify: check file sizes and checksums of a cache hit.
        log: callable for one-line messages (``None`` for silence).
    """
    name, system = _load_system(system)
    resolved = resolve_settings(settings, system.temperature)
    key = cache_key(name, resolved, system_fingerprint(system))
    root = Path(data_dir).expanduser().resolve() / name
    final = root / key
    partial = root / f".{key}.partial"
    lock = FileLock(root / f".{key}.lock")
    say = log or (lambda *_: None)
    if final.exists():
        if partial.exists():  # a crash between storing the entry and removing its checkpoint
            _drop_checkpoint(partial, lock)
        return _hit(final, key, verify, say)

    _ensure_writable(root)
    try:
        if not lock.acquire(blocking=False):
            say(f"[bgflow_mini.data] another process is making this MD ({partial}): waiting")
            lock.acquire(blocking=True)
    except OSError as exc:
        if exc.errno not in NO_LOCKS:
            raise
        say(f"[bgflow_mini.data] no file locks in {root} ({exc}): MD without a checkpoint")
    try:
        if final.exists():  # made by the process we waited for
            if lock.held:  # a checkpoint left by a crash after the store: no longer needed
                remove_checkpoint(partial)
            return _hit(final, key, verify, say)
        if lock.held and (partial / "state.npz").exists():
            say(f"[bgflow_mini.data] cache miss: resuming the MD checkpointed in {partial}")
        else:
            say(f"[bgflow_mini.data] cache miss: generating {final}")
        run = dict(n_workers=n_workers, progress=progress, keep_checkpoint=True,
                   checkpoint=partial if lock.held else None,
                   checkpoint_every=MD_CHECKPOINT_EVERY_S)  # fmt: skip
        try:
            result = simulate_from_settings(system, resolved, **run)
        except CheckpointMismatch as exc:  # same key: another version's or a damaged one
            say(f"[bgflow_mini.data] {exc}: removed, MD from the start")
            remove_checkpoint(partial)
            if partial.exists():  # damaged beyond a checkpoint's files; the folder is ours
                shutil.rmtree(partial)
            result = simulate_from_settings(system, resolved, **run)
        meta = _store(result, final, root, key, name, resolved, system)
        if lock.held:  # the entry is stored: the checkpoint of its MD can go
            remove_checkpoint(partial)
    finally:
        lock.release(remove=True)
    return CacheEntry(final, key, False, meta)


def _drop_checkpoint(partial: Path, lock: FileLock) -> None:
    """Remove the MD checkpoint of a stored entry, unless a process holds it (or the
    cache is read-only): it is then left for that process."""
    try:
        if not lock.acquire(blocking=False):
            return
        try:
            remove_checkpoint(partial)
        finally:
            lock.release(remove=True)
    except OSError:
        pass  # a read-only cache or no locks: harmless, the entry is complete


def _hit(final: Path, key: str, verify: bool, say: Any) -> CacheEntry:
    meta = _read_meta(final)
    if verify:
        _verify(final, meta)
    say(f"[bgflow_mini.data] cache hit: {final}")
    return CacheEntry(final, key, True, meta)


def _store(result, final: Path, root: Path, key: str, name: str, resolved, system) -> dict:
    """Write an MD result as the cache entry ``final`` (a temporary folder renamed, so a
    crash never leaves a partial entry); returns its metadata."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    try:
        result.trajectory.save_hdf5(str(tmp / "traj.h5"))
        np.save(tmp / "energies.npy", result.energies)
        np.save(tmp / "replica_energies.npy", result.replica_energies)
        files = FILES
        keep = int(resolved.get("keep_replicas", 1))
        if keep > 1:  # the hotter kept replicas, one trajectory of (keep - 1) * n_frames frames
            xyz = result.replica_positions[1:keep]
            hot = mdtraj.Trajectory(xyz.reshape(-1, *xyz.shape[2:]), result.trajectory.topology)
            hot.save_hdf5(str(tmp / REPLICA_TRAJ))
            files = (*FILES, REPLICA_TRAJ)
        meta = {
            "data_version": DATA_VERSION,
            "key": key,
            "system": name,
            "settings": resolved,
            "fingerprint": system_fingerprint(system),
            "info": result.info,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": {"bgflow_mini": bgflow_mini.__version__, "openmm": openmm.__version__},
            "files": {
                f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files
            },
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
            meta = _read_meta(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def find_cached(
    system: Any, settings: dict[str, Any], data_dir: str | os.PathLike, verify: bool = True
) -> CacheEntry | None:
    """The cache entry for ``(system, settings)`` if it is on disk, else None (never runs MD)."""
    name, system = _load_system(system)
    resolved = resolve_settings(settings, system.temperature)
    key = cache_key(name, resolved, system_fingerprint(system))
    folder = Path(data_dir).expanduser().resolve() / name / key
    if not (folder / "meta.json").is_file():
        return None
    meta = _read_meta(folder)
    if verify:
        _verify(folder, meta)
    return CacheEntry(folder, key, True, meta)


def load_trajectory(
    source: CacheEntry | str | os.PathLike, verify: bool = True
) -> mdtraj.Trajectory:
    """Load ``traj.h5`` of a cache entry (or an HDF5 file path) with a clear error if broken."""
    if isinstance(source, CacheEntry):
        path = source.traj_path
        if verify:
            _verify(source.path, source.meta)
    else:
        path = Path(source)
        if path.is_dir():
            if verify:
                _verify(path, _read_meta(path))
            path = path / "traj.h5"
    try:
        return mdtraj.load_hdf5(str(path))
    except Exception as err:  # tables and HDF5 raise many error types
        raise CorruptDataError(
            f"cannot read trajectory {path} ({type(err).__name__}: {err}); the file is "
            "truncated or corrupt, delete it (and its cache folder) to regenerate"
        ) from err


def trajectory_to_tensor(
    traj: mdtraj.Trajectory, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Flatten positions to ``(n_frames, n_atoms * 3)`` nm."""
    return torch.as_tensor(traj.xyz.reshape(traj.n_frames, -1), dtype=dtype)


def split_indices(
    n: int,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    shuffle: bool = False,
    n_series: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint train/val/test indices covering ``range(n)``.

    ``fractions`` are normalised. By default the split is in contiguous blocks of time
    (train first, then validation, then test), because neighbouring frames of a
    trajectory are correlated: random frames would put near-copies of training frames
    into the validation and test sets and make their NLL optimistic. ``n_series``
    interleaved time series (frame ``i`` belongs to series ``i % n_series``, e.g. parallel
    sampler chains) are each split into blocks. ``shuffle=True`` (with ``seed``) gives a
    random split instead, for i.i.d. samples only.
    """
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or np.any(f < 0) or f.sum() <= 0:
        raise ValueError(f"fractions must be 3 non-negative numbers, got {fractions}")
    f = f / f.sum()
    if shuffle:
        order = np.random.default_rng(seed).permutation(n)
        n_val, n_test = int(f[1] * n), int(f[2] * n)
        n_train = n - n_val - n_test
        return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    if n_series < 1 or n % n_series:
        raise ValueError(f"n={n} frames do not split into n_series={n_series} equal series")
    length = n // n_series
    n_val, n_test = int(f[1] * length), int(f[2] * length)
    n_train = length - n_val - n_test
    t = np.arange(n).reshape(length, n_series)  # time x series
    return t[:n_train].ravel(), t[n_train : n_train + n_val].ravel(), t[n_train + n_val :].ravel()


@dataclass
class MDDataset:
    """Train/val/test positions ``(n, n_atoms * 3)`` nm with their frame indices and energies."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    energies: np.ndarray | None
    topology: mdtraj.Topology
    stride: int = 1
    positions: torch.Tensor | None = None  # all (strided) frames in time order
    # replicas > 1 (load_dataset): the training-time frames of the k lowest temperatures,
    # replica-major (replica 0's are ``train``), with each frame's replica index, the
    # ladder (K) and each frame's potential energy (kJ/mol)
    pool: torch.Tensor | None = None
    pool_replica: np.ndarray | None = None
    pool_energies: np.ndarray | None = None
    temperatures: np.ndarray | None = None
    # ... and every (strided) frame of those replicas in time order, (k, n, n_atoms * 3) nm,
    # with their potential energies (k, n) kJ/mol (replica 0's are ``positions``)
    replica_positions: torch.Tensor | None = None
    replica_energies: np.ndarray | None = None

    @property
    def n_atoms(self) -> int:
        return self.topology.n_atoms

    @property
    def dim(self) -> int:
        return 3 * self.topology.n_atoms


def load_dataset(
    source: CacheEntry | str | os.PathLike,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    stride: int = 1,
    dtype: torch.dtype = torch.float32,
    shuffle: bool = False,
    verify: bool = True,
    replicas: int = 1,
) -> MDDataset:
    """Load cached MD data (entry, cache folder or ``.h5`` file) and split it.

    Every ``stride``-th frame is kept before splitting; indices refer to the strided
    frames. The split is in contiguous time blocks (see :func:`split_indices`).
    ``energies`` (kJ/mol, strided) is None for a bare ``.h5`` without a sidecar.

    ``replicas = k > 1`` (a replica-exchange entry made with ``keep_replicas >= k``) also
    fills ``pool``: the frames of the k lowest temperatures at the training times (the
    same time block in every replica, so validation and test stay later than any pooled
    frame), with their replica index and potential energy, for
    :func:`bgflow_mini.replica_pool.pool_log_weights`.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive int, got {replicas!r}")
    traj = load_trajectory(source, verify=verify)[::stride]
    folder = source.path if isinstance(source, CacheEntry) else Path(source)
    e_path = (folder if folder.is_dir() else folder.parent) / "energies.npy"
    energies = np.load(e_path)[::stride] if e_path.is_file() else None
    if energies is not None and len(energies) != traj.n_frames:
        energies = None  # sidecar belongs to another file
    x = trajectory_to_tensor(traj, dtype)
    tr, va, te = split_indices(traj.n_frames, fractions, seed, shuffle)
    ds = MDDataset(x[tr], x[va], x[te], tr, va, te, energies, traj.topology, stride, x)
    if replicas > 1:
        entry = source if isinstance(source, CacheEntry) else folder  # meta.json read once
        _load_pool(ds, entry, replicas, stride, dtype)
    return ds


def load_replica_frames(
    source: CacheEntry | str | os.PathLike,
    replicas: int,
    stride: int = 1,
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    target_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Every frame of the ``replicas`` lowest temperatures of a replica-exchange cache entry.

    Returns ``(positions, energies, temperatures)``: ``(k, n_frames, n_atoms * 3)`` nm in
    time order (every ``stride``-th frame; replica 0 is ``traj.h5``), their potential
    energies ``(k, n_frames)`` kJ/mol and the ``(k,)`` temperatures in K. The entry must
    have been made with ``md.keep_replicas >= replicas``. ``target_positions``: replica 0's
    strided frames ``(n_frames, n_atoms * 3)`` if already loaded (``traj.h5`` is not read).
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive int, got {replicas!r}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    folder = source.path if isinstance(source, CacheEntry) else Path(source)
    if not (folder / "meta.json").is_file():
        raise CacheError(
            f"{folder} is not an MD cache folder (no meta.json): the frames of several "
            "replicas come from a replica-exchange cache entry"
        )
    meta = source.meta if isinstance(source, CacheEntry) else _read_meta(folder)
    if verify:
        _verify(folder, meta)
    kept = int(meta.get("settings", {}).get("keep_replicas", 1))
    if kept < replicas:
        raise CacheError(
            f"replicas={replicas} needs the positions of {replicas} replicas, but {folder} "
            f"kept {kept} (MD setting keep_replicas); set md.keep_replicas={replicas} "
            "(a new MD run)"
        )
    temps = np.asarray(meta["settings"]["temperatures"], dtype=float)[:replicas]
    u_all = np.load(folder / "replica_energies.npy")
    n = u_all.shape[1]
    if target_positions is None:
        first = load_trajectory(folder / "traj.h5", verify=False).xyz[::stride]
        target_positions = torch.as_tensor(first.reshape(len(first), -1), dtype=dtype)
    xyz = [target_positions.to(dtype)[None]]
    if replicas > 1:
        hot = load_trajectory(folder / REPLICA_TRAJ, verify=False)
        hot_xyz = hot.xyz.reshape(kept - 1, n, -1)[: replicas - 1, ::stride]
        xyz.append(torch.as_tensor(hot_xyz, dtype=dtype))
    positions = torch.cat(xyz)
    if positions.shape[1] != u_all[:, ::stride].shape[1]:
        raise CacheError(f"{folder}: trajectories and replica_energies.npy differ in length")
    return positions, u_all[:replicas, ::stride], temps


def _load_pool(
    ds: MDDataset, source: CacheEntry | Path, k: int, stride: int, dtype: torch.dtype
) -> None:
    """Fill ``ds.pool*`` from a cache entry's ``replica_traj.h5`` (see :func:`load_dataset`)."""
    positions, energies, temps = load_replica_frames(
        source, k, stride, dtype, verify=False, target_positions=ds.positions
    )
    tr = ds.train_idx  # indices of the strided frames, the same times in every replica
    ds.replica_positions = positions
    ds.replica_energies = energies
    ds.pool = positions[:, tr].reshape(k * len(tr), -1)
    ds.pool_replica = np.repeat(np.arange(k), len(tr))
    ds.pool_energies = energies[:, tr].reshape(-1)
    ds.temperatures = temps
