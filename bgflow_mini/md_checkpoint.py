"""Crash-safe MD: the frames on disk as they are made, the run's state every few minutes,
and a resume from there (:func:`bgflow_mini.replica.run_replicas` with ``checkpoint=``).

A checkpoint folder holds the run's output arrays as ``.npy`` memory maps
(``positions.npy``, ``potential.npy``, ``kinetic.npy``, ``walkers.npy``, filled frame by
frame) and ``state.npz``: the chunk the run goes on from, the frames written, the swap
counters, the swap generator's state and every replica's positions and velocities (nm,
nm/ps). The arrays are flushed before the state is written, and the state is written to a
temporary file and renamed, so a crash at any moment leaves the last complete state.

A resumed run keeps the frames and the swap random stream; the Langevin noise goes on from
new seeds drawn from (seed, chunk), so the trajectory after the resume point is a
statistically equivalent continuation, not the bit-identical one of an uninterrupted run.

The folder is locked (:class:`~bgflow_mini.file_lock.FileLock`) from :meth:`MDCheckpoint.open`
until :meth:`MDCheckpoint.close` or :meth:`MDCheckpoint.remove`, so two processes never write
into one checkpoint; a folder that holds anything but a checkpoint is refused, and removing a
checkpoint deletes only its own files.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .file_lock import NO_LOCKS, FileLock

__all__ = ["CheckpointMismatch", "MDCheckpoint", "remove_checkpoint"]

_STATE = "state.npz"
_STATE_TMP = f".{_STATE}.tmp"
_SIGNATURE = "signature.json"
_LOCK = ".lock"
_HINT = "delete the folder to start afresh"
_CANNOT_RESERVE = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS}


class CheckpointMismatch(ValueError):
    """A checkpoint folder that this run cannot resume: another run's, or damaged."""


class MDCheckpoint:
    """The checkpoint folder of one MD run.

    Arguments:
        folder: where the arrays and the state live (created when needed).
        signature: JSON-able settings that fix what the run computes (temperatures, frames,
            steps, seed, ...); a folder written with another signature is refused.
        arrays: ``{name: (shape, dtype)}`` of the output arrays.
        state: ``{name: shape}`` of the entries a saved state must hold (``None``: any
            shape); a state without one of them, or with another shape, is damaged.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        signature: Mapping[str, Any],
        arrays: Mapping[str, tuple[tuple[int, ...], Any]],
        state: Mapping[str, tuple[int, ...] | None] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.signature = json.loads(json.dumps(dict(signature), sort_keys=True))
        self.specs = {k: (tuple(int(n) for n in s), np.dtype(d)) for k, (s, d) in arrays.items()}
        self.state_specs = {
            k: None if s is None else tuple(int(n) for n in s) for k, s in (state or {}).items()
        }
        self.arrays: dict[str, np.memmap] = {}
        self._lock: FileLock | None = None

    def open(self) -> dict[str, Any] | None:
        """Lock the folder, open the arrays (memory maps, writable) and return the saved
        state to resume from, or ``None`` for a fresh run (the arrays created empty, their
        disk space reserved). :class:`CheckpointMismatch` when the folder holds a run with
        another signature, arrays of other shapes or a damaged checkpoint, ``ValueError``
        when it holds files that are not a checkpoint's, ``RuntimeError`` when another
        process has it open."""
        if self.folder.exists() and not (self.folder / _SIGNATURE).exists():
            foreign = sorted(p.name for p in self.folder.iterdir() if p.name != _LOCK)
            if foreign:
                raise ValueError(
                    f"MD checkpoint folder {self.folder} holds other files ({foreign[:5]}); "
                    "give an empty or new folder"
                )
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.folder / _LOCK)
        try:
            busy = not self._lock.acquire(blocking=False)
        except OSError as exc:
            if exc.errno not in NO_LOCKS:
                raise
            busy = False  # no file locks on this file system: go on unlocked
        if busy:
            raise RuntimeError(f"MD checkpoint {self.folder} is in use by another process")
        try:
            if (self.folder / _STATE).exists():
                return self._resume()
            (self.folder / _SIGNATURE).write_text(json.dumps(self.signature, sort_keys=True))
            for name, (shape, dtype) in self.specs.items():
                path = self.folder / f"{name}.npy"
                self.arrays[name] = np.lib.format.open_memmap(
                    path, mode="w+", dtype=dtype, shape=shape
                )
                _reserve(path)
            return None
        except BaseException:
            self.close()
            raise

    def _resume(self) -> dict[str, Any]:
        try:
            saved = json.loads((self.folder / _SIGNATURE).read_text())
        except (OSError, ValueError) as exc:
            raise self._damaged(exc) from exc
        if saved != self.signature:
            diff = {k: (saved.get(k), self.signature.get(k))
                    for k in sorted({*saved, *self.signature})
                    if saved.get(k) != self.signature.get(k)}  # fmt: skip
            detail = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in diff.items())
            raise CheckpointMismatch(
                f"MD checkpoint {self.folder} belongs to another run (differs in {sorted(diff)}"
                f": {detail}); {_HINT}"
            )
        try:
            for name, (shape, dtype) in self.specs.items():
                arr = np.load(self.folder / f"{name}.npy", mmap_mode="r+")
                if arr.shape != shape or arr.dtype != dtype:
                    raise CheckpointMismatch(
                        f"MD checkpoint {self.folder}: {name}.npy is {arr.shape} {arr.dtype}, "
                        f"expected {shape} {dtype}; {_HINT}"
                    )
                self.arrays[name] = arr
            with np.load(self.folder / _STATE, allow_pickle=False) as data:
                state = {k: data[k] for k in data.files}
            state["rng"] = json.loads(str(state["rng"]))
            for name, shape in self.state_specs.items():
                if name not in state:
                    raise KeyError(f"{_STATE} has no {name!r}")
                if shape is not None and np.shape(state[name]) != shape:
                    raise ValueError(f"{_STATE}: {name} is {np.shape(state[name])}, not {shape}")
        except CheckpointMismatch:
            raise
        except Exception as exc:  # a missing array, a torn or foreign file
            raise self._damaged(exc) from exc
        return state

    def _damaged(self, exc: BaseException) -> CheckpointMismatch:
        return CheckpointMismatch(f"MD checkpoint {self.folder} is damaged ({exc!r}); {_HINT}")

    def save(self, state: Mapping[str, Any], rng_state: Mapping[str, Any]) -> None:
        """Flush the arrays, then write ``state`` (arrays and numbers) and the swap
        generator's ``rng_state`` atomically."""
        for arr in self.arrays.values():
            arr.flush()
        tmp = self.folder / _STATE_TMP
        with open(tmp, "wb") as fh:
            np.savez(fh, rng=np.asarray(json.dumps(rng_state)), **dict(state))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / _STATE)

    def load_arrays(self) -> dict[str, np.ndarray]:
        """The arrays as ordinary in-memory copies (for after :meth:`remove`)."""
        return {k: np.array(v) for k, v in self.arrays.items()}

    def close(self) -> None:
        """Close the memory maps and release the folder (its files stay)."""
        try:
            for arr in self.arrays.values():
                arr.flush()
        finally:
            self.arrays.clear()
            if self._lock is not None:
                self._lock.release()

    def remove(self) -> None:
        """Close the memory maps and delete the checkpoint (the run has finished)."""
        self.arrays.clear()
        remove_checkpoint(self.folder)
        self.close()


def remove_checkpoint(folder: str | os.PathLike) -> None:
    """Delete an MD checkpoint's files, the state first (a kill part way leaves a folder
    that resumes nothing rather than a torn checkpoint), then the folder when nothing else
    is in it. Files that are not a checkpoint's are left alone."""
    folder = Path(folder)
    if not (folder / _SIGNATURE).exists():
        return
    for name in (_STATE, _STATE_TMP):
        (folder / name).unlink(missing_ok=True)
    for path in folder.glob("*.npy"):
        path.unlink(missing_ok=True)
    (folder / _SIGNATURE).unlink(missing_ok=True)
    (folder / _LOCK).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # someone else's files: kept


def _reserve(path: Path) -> None:
    """Allocate a sparse array file's disk space now, so that a full disk is an
    ``OSError`` at the start instead of a bus error part way through the run."""
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - not Linux
        return
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, size)
        except OSError as exc:
            if exc.errno in _CANNOT_RESERVE:
                return  # the file system cannot reserve space: go on without
            if exc.errno == errno.ENOSPC:
                raise OSError(
                    errno.ENOSPC, f"no room for the MD checkpoint's {size / 1e9:.2f} GB", str(path)
                ) from exc
            raise  # a quota, an I/O error: now rather than part way through the run
