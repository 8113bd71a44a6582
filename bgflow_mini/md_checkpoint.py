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
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MDCheckpoint"]

_STATE = "state.npz"
_SIGNATURE = "signature.json"


class MDCheckpoint:
    """The checkpoint folder of one MD run.

    Arguments:
        folder: where the arrays and the state live (created when needed).
        signature: JSON-able settings that fix what the run computes (temperatures, frames,
            steps, seed, ...); a folder written with another signature is refused.
        arrays: ``{name: (shape, dtype)}`` of the output arrays.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        signature: Mapping[str, Any],
        arrays: Mapping[str, tuple[tuple[int, ...], Any]],
    ) -> None:
        self.folder = Path(folder)
        self.signature = json.loads(json.dumps(dict(signature), sort_keys=True))
        self.specs = {k: (tuple(int(n) for n in s), np.dtype(d)) for k, (s, d) in arrays.items()}
        self.arrays: dict[str, np.memmap] = {}

    def open(self) -> dict[str, Any] | None:
        """Open the arrays (memory maps, writable) and return the saved state to resume from,
        or ``None`` for a fresh run (the arrays created empty). ``ValueError`` when the
        folder holds a run with another signature or arrays of other shapes."""
        state_file = self.folder / _STATE
        if state_file.exists():
            saved = json.loads((self.folder / _SIGNATURE).read_text())
            if saved != self.signature:
                diff = sorted(k for k in {*saved, *self.signature}
                              if saved.get(k) != self.signature.get(k))  # fmt: skip
                raise ValueError(
                    f"MD checkpoint {self.folder} belongs to another run (differs in {diff}); "
                    "delete the folder to start afresh"
                )
            for name, (shape, dtype) in self.specs.items():
                arr = np.load(self.folder / f"{name}.npy", mmap_mode="r+")
                if arr.shape != shape or arr.dtype != dtype:
                    raise ValueError(
                        f"MD checkpoint {self.folder}: {name}.npy is {arr.shape} {arr.dtype}, "
                        f"expected {shape} {dtype}; delete the folder to start afresh"
                    )
                self.arrays[name] = arr
            with np.load(state_file, allow_pickle=False) as data:
                state = {k: data[k] for k in data.files}
            state["rng"] = json.loads(str(state["rng"]))
            return state
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / _SIGNATURE).write_text(json.dumps(self.signature, sort_keys=True))
        for name, (shape, dtype) in self.specs.items():
            self.arrays[name] = np.lib.format.open_memmap(
                self.folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape
            )
        return None

    def save(self, state: Mapping[str, Any], rng_state: Mapping[str, Any]) -> None:
        """Flush the arrays, then write ``state`` (arrays and numbers) and the swap
        generator's ``rng_state`` atomically."""
        for arr in self.arrays.values():
            arr.flush()
        tmp = self.folder / f".{_STATE}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, rng=np.asarray(json.dumps(rng_state)), **dict(state))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / _STATE)

    def load_arrays(self) -> dict[str, np.ndarray]:
        """The arrays as ordinary in-memory copies (for after :meth:`remove`)."""
        return {k: np.array(v) for k, v in self.arrays.items()}

    def remove(self) -> None:
        """Close the memory maps and delete the folder (the run has finished)."""
        self.arrays.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
