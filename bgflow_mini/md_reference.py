"""MD reference frames for the free-energy analysis, and independent MD runs pooled into one.

A reference is one or more *series* of frames of equal length sampled at the same times:
one trajectory, the replicas of a replica exchange (MBAR-weighted to the target
temperature), or several independent runs of either. The analysis resamples blocks of
time in every series at once (:func:`bgflow_mini.free_energy.md_delta_f`), which is a valid
block bootstrap for independent runs too: their blocks at the same times are independent.

Pooling independent runs is how a user narrows a reference whose error comes from few slow
transitions (e.g. phi > 0 of alanine peptides at 300 K): two runs of equal length halve the
variance of the state populations that one run gives.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import logsumexp

__all__ = ["MDReference", "pool_runs", "load_reference"]


@dataclass
class MDReference:
    """MD reference frames for :func:`bgflow_mini.analysis.analyse`.

    ``positions``: ``(n, dim)`` nm, ``n_series`` series of equal length sampled at the same
    times, series after series, every run's target-temperature series first (for one run:
    the replicas of a replica exchange, the target temperature first). ``log_w`` ``(n,)``
    weights the frames to the target temperature (MBAR:
    :func:`bgflow_mini.replica_pool.series_log_weights`; None: equal weights).
    ``n_runs``: independent runs pooled (:func:`pool_runs`); ``n_series / n_runs``
    replica temperatures per run. ``temperatures``: K per temperature, for the record."""

    positions: np.ndarray
    path: str
    log_w: np.ndarray | None = None
    n_series: int = 1
    temperatures: Sequence[float] | None = None
    n_runs: int = 1

    def __post_init__(self) -> None:
        n = len(self.positions)
        if self.n_series < 1 or n % self.n_series:
            raise ValueError(f"{n} MD frames do not split into {self.n_series} equal series")
        if self.n_runs < 1 or self.n_series % self.n_runs:
            raise ValueError(f"{self.n_series} MD series do not split into {self.n_runs} runs")
        if self.log_w is not None and np.shape(self.log_w) != (n,):
            raise ValueError(f"log_w has shape {np.shape(self.log_w)}, expected ({n},)")

    @property
    def n_replicas(self) -> int:
        """Replica temperatures per run (1: the target temperature's frames alone)."""
        return self.n_series // self.n_runs

    @property
    def kind(self) -> str:
        """``"md_mbar"`` for MBAR-weighted replicas, ``"md"`` for target-temperature frames."""
        return "md_mbar" if self.n_replicas > 1 else "md"

    @property
    def n_target(self) -> int:
        """Frames at the target temperature: the first ``n_runs`` series."""
        return len(self.positions) // self.n_series * self.n_runs

    def run_frames(self, run: int) -> np.ndarray:
        """Indices of run ``run``'s frames (its replicas, target temperature first, each in
        time order): ``positions[run_frames(r)]`` is that run's own reference."""
        if not 0 <= run < self.n_runs:
            raise IndexError(f"run {run} of a reference with {self.n_runs} run(s)")
        length = len(self.positions) // self.n_series
        series = np.arange(self.n_replicas) * self.n_runs + run  # temperature-major order
        return (series[:, None] * length + np.arange(length)).reshape(-1)

    @property
    def label(self) -> str:
        """Column title, e.g. ``MD``, ``MD (3 replicas, MBAR)``, ``MD (2 runs x 3 replicas,
        MBAR)``."""
        runs = f"{self.n_runs} runs" if self.n_runs > 1 else ""
        reps = f"{self.n_replicas} replicas, MBAR" if self.n_replicas > 1 else ""
        inner = f"{runs} x {reps}" if runs and reps else runs or reps
        return f"MD ({inner})" if inner else "MD"


def pool_runs(runs: Sequence[MDReference]) -> MDReference:
    """Independent MD runs of one system as one reference, each run weighted equally.

    Every run must have the same replica temperatures and the same number of frames per
    series (equal-length runs: the block bootstrap resamples the same times in all). The
    pooled series are ordered temperature by temperature (every run's target-temperature
    series first); MBAR weights are normalised within each run, so each run carries the
    same total weight, as equal-length runs should.

    Raises:
        ValueError: no runs, runs already pooled, or runs that differ in replicas, frames
            per series or dimension.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("pool_runs needs at least one MD run")
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    for r in runs:
        if r.n_runs != 1:
            raise ValueError(f"{r.path}: already a pool of {r.n_runs} runs")
    shapes = [(r.n_replicas, r.n_target, r.positions.shape[1]) for r in runs]
    if len(set(shapes)) > 1:
        listing = "; ".join(
            f"{r.path}: {k} replica(s) x {n} frames, {d // 3} atoms"
            for r, (k, n, d) in zip(runs, shapes)
        )
        raise ValueError(
            "MD runs pooled as one reference need the same replicas, atoms and frames per "
            f"replica (equal-length runs): {listing}"
        )
    k, n_t, dim = shapes[0]
    temps = [None if r.temperatures is None else list(map(float, r.temperatures)) for r in runs]
    if any(t != temps[0] for t in temps):
        raise ValueError(f"MD runs pooled as one reference need the same temperatures: {temps}")
    pos = np.stack([r.positions.reshape(k, n_t, dim) for r in runs], axis=1)
    log_w = None
    if any(r.log_w is not None for r in runs):
        lws = []
        for r in runs:
            lw = np.zeros(k * n_t) if r.log_w is None else np.asarray(r.log_w, dtype=np.float64)
            lws.append((lw - logsumexp(lw) - np.log(len(runs))).reshape(k, n_t))  # 1 / runs
        log_w = np.stack(lws, axis=1).reshape(-1)
    return MDReference(
        pos.reshape(-1, dim),
        ", ".join(r.path for r in runs),
        log_w,
        k * len(runs),
        first.temperatures,
        len(runs),
    )


def load_reference(source: Any, replicas: int = 1, stride: int = 1) -> MDReference:
    """One MD run's reference from its cache entry, cache folder or trajectory file.

    ``replicas = 1``: the target temperature's frames in time order (counted, no weights).
    ``replicas = k > 1``: every frame of the k lowest temperatures of a replica-exchange
    cache folder made with ``md.keep_replicas >= k``, MBAR-weighted to the target
    temperature (:func:`bgflow_mini.replica_pool.series_log_weights`, needs pymbar).
    ``stride``: every stride-th frame. Positions are float64 nm ``(n, n_atoms * 3)``.

    Raises:
        ValueError: ``replicas > 1`` for a single trajectory file.
        bgflow_mini.data.CacheError: a folder that kept fewer replicas.
    """
    import torch

    from .data import CacheEntry, load_replica_frames, load_trajectory
    from .replica_pool import series_log_weights

    path = source.path if isinstance(source, CacheEntry) else Path(os.fspath(source))
    if replicas == 1:
        traj = load_trajectory(source)[::stride]
        if isinstance(source, CacheEntry):
            path = source.traj_path
        return MDReference(traj.xyz.reshape(traj.n_frames, -1).astype(np.float64), str(path))
    if not path.is_dir():
        raise ValueError(
            f"{replicas} replicas are pooled from a replica-exchange cache folder, but {path} "
            "is one trajectory file: give its cache folder, or one replica (md_replicas=1)"
        )
    positions, energies, temps = load_replica_frames(source, replicas, stride, torch.float64)
    xyz = positions.reshape(-1, positions.shape[-1]).numpy()
    return MDReference(
        xyz, str(path), series_log_weights(energies, temps), replicas, temps.tolist()
    )
