"""Sample sets on disk: draw from a generator in batches, write, read back.

:func:`write_samples` writes a folder with bounded memory (positions batch by batch):
``samples.h5`` (mdtraj HDF5, nm; optionally ``samples.dcd`` + ``samples.pdb``) or
``samples.npy`` for targets without atoms, ``log_q.npy``, ``energies.npy`` (reduced,
kT), ``log_weights.npy`` (``-u - log q``, ``-inf`` where either is not finite) and
``summary.json`` (counts, ESS, the target's spec, and whatever the caller adds, e.g.
the checkpoint and its MD settings). With ``ais=`` the samples are annealed importance
samples (:mod:`bgflow_mini.ais`): ``log_weights.npy`` holds their exact AIS weights,
``log_q.npy`` the log-density ``-u - log w`` that would give the same weights (AIS has no
tractable proposal density), and ``summary.json`` the sampler's settings and acceptance
under ``sampler``. :class:`SampleSet` reads such a folder back and
rebuilds its target. Every file is complete or absent: arrays and JSON are written
atomically, the trajectory under a temporary name that is renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_path, save_json, save_npy
from .reweighting import effective_sample_size
from .targets import Target, as_target, load_target

__all__ = ["TRAJ_FORMATS", "write_samples", "save_sample_set", "SampleSet", "reduced_energies"]

TRAJ_FORMATS = ("h5", "dcd", "pdb")


def _partial(path: Path) -> Path:
    """Where ``path`` is written before it is complete (same suffix: mdtraj checks it)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


class _Writer:
    """Writes position batches (nm) to ``samples.h5`` / ``.dcd`` / ``.pdb`` (molecules) or
    ``samples.npy`` (no atoms) under temporary names; :meth:`finish` renames them."""

    def __init__(self, out: Path, target: Target, n: int, formats: list[str]) -> None:
        self.out, self.target, self.n = out, target, 0
        self.formats = formats if target.topology is not None else ["npy"]
        self.files: dict[str, Any] = {}
        if target.topology is None:
            self.files["npy"] = np.lib.format.open_memmap(
                _partial(out / "samples.npy"), mode="w+", dtype=np.float64, shape=(n, target.dim)
            )
            return
        from mdtraj.formats import DCDTrajectoryFile, HDF5TrajectoryFile

        if "h5" in formats:
            h5 = HDF5TrajectoryFile(str(_partial(out / "samples.h5")), "w")
            h5.topology = target.topology
            self.files["h5"] = h5
        if "dcd" in formats:
            self.files["dcd"] = DCDTrajectoryFile(str(_partial(out / "samples.dcd")), "w")

    def write(self, x: np.ndarray) -> None:
        m = len(x)
        if "npy" in self.files:
            self.files["npy"][self.n : self.n + m] = x
        else:
            xyz = x.astype(np.float32).reshape(m, -1, 3)
            if "h5" in self.files:
                t = np.arange(self.n, self.n + m, dtype=np.float32)
                self.files["h5"].write(coordinates=xyz, time=t)
            if "dcd" in self.files:
                self.files["dcd"].write(10.0 * xyz)  # DCD stores angstrom
            if self.n == 0 and "pdb" in self.formats:
                import mdtraj

                with atomic_path(self.out / "samples.pdb") as tmp:
                    mdtraj.Trajectory(xyz[:1], self.target.topology).save_pdb(str(tmp))
        self.n += m

    def close(self) -> None:
        for f in self.files.values():
            if isinstance(f, np.memmap):
                f.flush()
            else:
                f.close()
        self.files.clear()

    def finish(self) -> list[str]:
        """Close and rename the files into place; their names."""
        self.close()
        names = [f"samples.{f}" for f in self.formats]
        for name in names:
            if name != "samples.pdb":
                os.replace(_partial(self.out / name), self.out / name)
        return names


def _formats(formats) -> list[str]:
    """Checked trajectory formats, ``h5`` always first: it is what :class:`SampleSet` reads."""
    formats = [str(f).lower() for f in formats]
    bad = sorted(set(formats) - set(TRAJ_FORMATS))
    if bad:
        raise ValueError(f"unknown trajectory format(s) {bad}; choose from {list(TRAJ_FORMATS)}")
    return ["h5"] + [f for f in TRAJ_FORMATS[1:] if f in formats]


def write_samples(
    generator: Any,
    target: Any,
    out: str | os.PathLike,
    n_samples: int,
    batch_size: int = 4096,
    formats: list[str] | tuple[str, ...] = ("h5",),
    energy: Any = None,
    progress: bool = True,
    extra: Mapping | None = None,
    ais: Mapping | None = None,
) -> dict:
    """Draw ``n_samples`` in batches, write them to ``out`` and return the summary.

    Arguments:
        generator: a :class:`~bgflow_mini.BoltzmannGenerator`.
        target: its :class:`~bgflow_mini.targets.Target` (or system / toy energy).
        formats: trajectory files for molecules, from :data:`TRAJ_FORMATS` (``pdb`` is
            the first sample, the topology for a DCD); ``h5`` is always written (it is
            what :class:`SampleSet` reads); targets without atoms get ``samples.npy``.
        energy: reduced energy (kT) for the weights; default the generator's.
        extra: added to ``summary.json`` (e.g. the checkpoint path, MD settings).
        ais: ``{"steps": K, "leapfrog": L, "target_acceptance": a}`` with ``K >= 1``:
            annealed importance sampling (:func:`bgflow_mini.ais.annealed_importance_sampling`,
            step sizes tuned once before the first batch; ``energy`` must be
            differentiable); ``None`` or ``K = 0``: plain flow samples.

    Memory holds one batch of positions plus three float64 arrays of ``n_samples``.
    """
    from tqdm.auto import tqdm

    target = as_target(target)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_samples, batch_size = int(n_samples), int(batch_size)
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples}, {batch_size}")
    formats = _formats(formats)
    energy = generator.energy if energy is None else energy
    if energy is None:
        raise ValueError("the generator has no energy: cannot compute importance weights")
    log_q, u = np.empty(n_samples), np.empty(n_samples)
    t0, done = time.time(), 0
    draw, sampler = _sampler(generator, energy, ais)
    writer = _Writer(out, target, n_samples, formats)
    try:
        with tqdm(total=n_samples, disable=not progress, desc="sampling", unit="sample") as bar:
            while done < n_samples:
                m = min(batch_size, n_samples - done)
                x, lq, e = draw(m)
                log_q[done : done + m] = lq.detach().cpu().double().numpy()
                u[done : done + m] = e.detach().cpu().double().numpy()
                writer.write(x.detach().cpu().double().numpy())
                done += m
                bar.update(m)
        files = writer.finish()
    finally:
        writer.close()
    if sampler is not None:
        extra = {**dict(extra or {}), "sampler": sampler.summary()}
    return _finish(out, target, log_q, u, files, time.time() - t0, extra)


class _AISDraws:
    """Batches of AIS samples with one set of tuned step sizes; pooled acceptance."""

    def __init__(self, generator: Any, energy: Any, settings: Mapping) -> None:
        from .ais import linear_betas, tune_step_sizes

        self.generator, self.energy = generator, energy
        self.steps, self.leapfrog = settings["steps"], settings["leapfrog"]
        acc = settings["target_acceptance"]
        self.betas = linear_betas(self.steps)
        self.eps = tune_step_sizes(
            generator, leapfrog=self.leapfrog, energy=energy, betas=self.betas,
            target_acceptance=acc,
        )  # fmt: skip
        self.target_acceptance, self.n, self.acc = acc, 0, [0.0] * self.steps

    def __call__(self, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from .ais import annealed_importance_sampling

        res = annealed_importance_sampling(
            self.generator, m, leapfrog=self.leapfrog, step_sizes=self.eps,
            batch_size=m, energy=self.energy, betas=self.betas,
        )  # fmt: skip
        self.acc = [a + m * b for a, b in zip(self.acc, res.acceptance)]
        self.n += m
        return res.x, -res.u.double() - res.log_w, res.u

    def summary(self) -> dict:
        return {
            "kind": "ais",
            "steps": self.steps,
            "leapfrog": self.leapfrog,
            "target_acceptance": self.target_acceptance,
            "step_sizes": self.eps,
            "acceptance": [a / max(self.n, 1) for a in self.acc],
        }


def _sampler(generator: Any, energy: Any, ais: Mapping | None):
    """``(draw(m) -> (x, log_q, u), AIS state or None)``."""
    from .ais import settings

    if (chosen := settings(ais)) is not None:
        draws = _AISDraws(generator, energy, chosen)
        return draws, draws

    def plain(m: int):
        with torch.no_grad():
            x, lq = generator.sample(m, with_log_prob=True)
            return x, lq, energy(x)

    return plain, None


def _finish(out: Path, target: Target, log_q, u, files, elapsed: float | None, extra) -> dict:
    """Write the weight arrays and ``summary.json`` of a sample folder; the summary.

    ``elapsed``: seconds the samples took to draw and weight; ``None`` (not timed) gives
    ``null`` for ``wall_time_s`` and ``samples_per_s``."""
    ok = np.isfinite(u) & np.isfinite(log_q)
    log_w = np.where(ok, -u - log_q, -np.inf)
    for name, arr in (("log_q", log_q), ("energies", u), ("log_weights", log_w)):
        save_npy(arr, out / f"{name}.npy")
    n = len(u)
    summary = {
        "n_samples": n,
        "ess": effective_sample_size(log_w),
        "nonfinite_energy_fraction": float(1.0 - np.isfinite(u).mean()),
        "nonfinite_log_q_fraction": float(1.0 - np.isfinite(log_q).mean()),
        "target": target.spec(),
        "dim": int(target.dim),
        "files": files + ["log_q.npy", "energies.npy", "log_weights.npy"],
        "wall_time_s": elapsed,
        "samples_per_s": None if elapsed is None else n / max(elapsed, 1e-9),
        **dict(extra or {}),
    }
    save_json(summary, out / "summary.json")
    return summary


def save_sample_set(
    out: str | os.PathLike,
    target: Any,
    x: np.ndarray,
    log_q: np.ndarray,
    u: np.ndarray,
    formats: list[str] | tuple[str, ...] = ("h5",),
    extra: Mapping | None = None,
) -> dict:
    """Write samples already in memory (``x`` ``(n, dim)``, ``log_q``, ``u`` in kT) as a
    sample folder, the same layout as :func:`write_samples`; returns the summary (its
    ``wall_time_s`` and ``samples_per_s`` are ``null``: drawing them was not timed here)."""
    target, out = as_target(target), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x = np.asarray(x, dtype=np.float64)
    writer = _Writer(out, target, len(x), _formats(formats))
    try:
        writer.write(x)
        files = writer.finish()
    finally:
        writer.close()
    return _finish(out, target, np.asarray(log_q), np.asarray(u), files, None, extra)


@dataclass
class SampleSet:
    """A folder written by :func:`write_samples`.

    ``positions`` are read in chunks by :meth:`chunks` (float64 ``(m, dim)``); the
    arrays are loaded eagerly and checked for equal lengths.
    """

    folder: Path
    summary: dict
    log_w: np.ndarray
    u: np.ndarray
    log_q: np.ndarray
    path: Path
    n: int

    @classmethod
    def open(cls, folder: str | os.PathLike) -> SampleSet:
        """Read a sample folder; ``FileNotFoundError`` / ``ValueError`` say what is wrong."""
        folder = Path(folder).expanduser().resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"samples={folder}: not a folder (use bgflow-sample's output)")
        need = ["summary.json", "log_weights.npy", "energies.npy", "log_q.npy"]
        missing = [f for f in need if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a sample folder: missing {missing}")
        summary = json.loads((folder / "summary.json").read_text())
        if "target" not in summary:
            raise ValueError(f"{folder}/summary.json names no target: written by an older version")
        path = next(
            (folder / f for f in ("samples.h5", "samples.npy") if (folder / f).is_file()), None
        )
        if path is None:
            raise FileNotFoundError(f"{folder} holds neither samples.h5 nor samples.npy")
        if path.suffix == ".h5":
            from mdtraj.formats import HDF5TrajectoryFile

            with HDF5TrajectoryFile(str(path), "r") as f:
                n = len(f)
        else:
            n = int(np.load(path, mmap_mode="r").shape[0])
        arrays = {k: np.load(folder / f"{k}.npy") for k in ("log_weights", "energies", "log_q")}
        for k, a in arrays.items():
            if a.shape != (n,):
                raise ValueError(
                    f"{folder / (k + '.npy')} has shape {a.shape} but {path.name} has {n} "
                    "samples: the folder mixes files of different runs"
                )
        lw, u, lq = arrays["log_weights"], arrays["energies"], arrays["log_q"]
        return cls(folder, summary, lw, u, lq, path, n)

    def target(self) -> Target:
        """The target the samples were drawn for (fingerprint checked)."""
        target = load_target(self.summary["target"])
        dim = self._dim()
        if dim != target.dim:
            raise ValueError(
                f"{self.path} has {dim} features per sample but target {target.name!r} has "
                f"{target.dim}: these samples are not of this target"
            )
        return target

    def _dim(self) -> int:
        if self.path.suffix == ".h5":
            from mdtraj.formats import HDF5TrajectoryFile

            with HDF5TrajectoryFile(str(self.path), "r") as f:
                return 3 * int(f.topology.n_atoms)
        return int(np.load(self.path, mmap_mode="r").shape[1])

    def chunks(self, chunk: int = 65536) -> Iterator[np.ndarray]:
        """Positions in chunks of ``chunk`` samples, float64 ``(m, dim)``."""
        if self.path.suffix == ".h5":
            from mdtraj.formats import HDF5TrajectoryFile

            with HDF5TrajectoryFile(str(self.path), "r") as f:
                for start in range(0, self.n, chunk):
                    c = f.read(n_frames=min(chunk, self.n - start)).coordinates
                    yield c.reshape(len(c), -1).astype(np.float64)
        else:
            data = np.load(self.path, mmap_mode="r")
            for start in range(0, len(data), chunk):
                yield np.array(data[start : start + chunk], dtype=np.float64)  # writable copy


def reduced_energies(energy: Any, positions: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Reduced energies (kT) of positions ``(n, dim)`` nm, in batches, float64."""
    p = next((b for b in energy.buffers()), None) if isinstance(energy, torch.nn.Module) else None
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float64
    device = p.device if p is not None else torch.device("cpu")
    out = np.empty(len(positions))
    with torch.no_grad():
        for s in range(0, len(positions), batch_size):
            x = torch.as_tensor(positions[s : s + batch_size], dtype=dtype, device=device)
            out[s : s + batch_size] = energy(x).detach().cpu().double().numpy()
    return np.where(np.isfinite(out), out, math.inf)
