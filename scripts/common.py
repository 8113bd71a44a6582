"""Helpers shared by the scripts: rebuild a trained generator, draw and read samples.

* :func:`load_run` rebuilds a generator from a training run folder (``config.yaml`` +
  ``model.pt``) or a checkpoint file, without the MD data;
* :func:`write_samples` draws samples in batches and writes them to disk with bounded
  memory (trajectory written batch by batch);
* :class:`SampleSet` reads such a folder back; :func:`find_md_cache` finds the MD data
  a run was trained on.

Positions are in nm, energies reduced (u/kT), log weights ``-u - log q``.
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
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bgflow_mini import pipeline
from bgflow_mini.energies import Energy
from bgflow_mini.reweighting import effective_sample_size

__all__ = [
    "CONFIGS",
    "RUN_CONFIG",
    "pick_device",
    "pick_dtype",
    "find_run",
    "run_config",
    "load_run",
    "make_energy",
    "close_energy",
    "is_toy",
    "write_samples",
    "SampleSet",
    "find_md_cache",
    "reduced_energies",
    "ess_or_zero",
]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIG = "run_config.yaml"  # the training run's config, copied into a sample folder
TRAJ_FORMATS = ("h5", "dcd", "pdb")


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda requested but torch.cuda.is_available() is False")
    return dev


def pick_dtype(name: str) -> torch.dtype:
    """``float32`` or ``float64`` as a torch dtype."""
    table = {"float32": torch.float32, "float64": torch.float64}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def is_toy(system: Any) -> bool:
    """True for an analytic toy energy (no atoms, topology or CVs)."""
    return isinstance(system, Energy)


def find_run(path: str | os.PathLike) -> tuple[Path | None, Path]:
    """``(run folder or None, weights file)`` for a run folder or a checkpoint file.

    A folder gives its ``model.pt`` (or ``checkpoints/latest.pt`` if training did not
    finish); a file gives itself, and the run folder is the first of its parent and
    grandparent that holds ``config.yaml``.
    """
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        for name in ("model.pt", "checkpoints/latest.pt", "checkpoints/best.pt"):
            if (p / name).is_file():
                return p, p / name
        raise FileNotFoundError(f"{p} holds no model.pt or checkpoints/*.pt: not a run folder")
    if not p.is_file():
        raise FileNotFoundError(f"no run folder or checkpoint at {p}")
    for folder in (p.parent, p.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder, p
    return None, p


def _read_weights(path: Path) -> tuple[dict, dict]:
    """``(state_dict, extra)`` of a ``model.pt`` or a Trainer checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - pickle/zip errors of many kinds
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} is not a state dict or checkpoint ({type(state).__name__})")
    if "model" in state and isinstance(state["model"], Mapping):
        return dict(state["model"]), dict(state.get("extra") or {})
    if all(isinstance(v, torch.Tensor) for v in state.values()):
        return dict(state), {}
    raise ValueError(f"{path} is neither a generator state dict nor a training checkpoint")


def _flow_differences(a: Any, b: Any, prefix: str = "flow") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _flow_differences(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [f"{prefix}: checkpoint {a!r} vs config {b!r}"]


def make_energy(
    run_cfg: DictConfig, system: Any, energy: str | Mapping | None = None, regularize: bool = False
):
    """Target energy (reduced, kT) for ``system``.

    ``energy``: None for the run's ``energy`` config, a name of ``configs/energy/``
    (``openmm``, ``torchff``) or a config mapping with ``_target_``. ``regularize``
    wraps it in the run's ``training.regularization`` (for reweighting the plain
    energy is the right one, so the scripts default to False). Toy systems are their
    own energy.
    """
    if is_toy(system):
        return system
    if energy is None:
        e_cfg = run_cfg.energy
    elif isinstance(energy, str):
        path = CONFIGS / "energy" / f"{energy}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (CONFIGS / "energy").glob("*.yaml"))
            raise ValueError(f"unknown energy {energy!r}; choose one of {known} or null")
        e_cfg = OmegaConf.load(path)
    else:
        e_cfg = OmegaConf.create(dict(energy))
    u = instantiate(e_cfg)(system)
    reg = run_cfg.training.get("regularization") if "training" in run_cfg else None
    if regularize and reg is not None:
        u = instantiate(reg)(u)
    return u


def close_energy(energy: Any) -> None:
    """Stop worker processes of an energy (OpenMM pool), also inside a wrapper."""
    for e in (energy, getattr(energy, "energy", None), getattr(energy, "base", None)):
        if e is not None and callable(getattr(e, "close", None)):
            e.close()


def run_config(
    run_or_checkpoint: str | os.PathLike, config: str | os.PathLike | None = None
) -> tuple[Path, Path, DictConfig]:
    """``(weights file, config path, config)`` of a run folder or checkpoint (see
    :func:`find_run`); ``config`` overrides the ``config.yaml`` found next to it."""
    run_dir, weights = find_run(run_or_checkpoint)
    if config is not None:
        cfg_path = Path(config).expanduser().resolve()
    elif run_dir is None:
        raise FileNotFoundError(
            f"no config.yaml next to {weights}; pass config=PATH (the run's config.yaml)"
        )
    else:
        cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"config {cfg_path} does not exist")
    cfg = OmegaConf.load(cfg_path)
    for key in ("system", "flow"):
        if key not in cfg:
            raise ValueError(f"{cfg_path} is not a training config (no {key!r} section)")
    return weights, cfg_path, cfg


def load_run(
    run_or_checkpoint: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    config: str | os.PathLike | None = None,
    energy: str | Mapping | None = None,
    with_energy: bool = True,
    regularize: bool = False,
) -> tuple[DictConfig, Any, Any]:
    """Rebuild a trained generator: ``(run config, system, generator)`` in eval mode.

    Arguments:
        run_or_checkpoint: a run folder of ``scripts/train.py`` (uses ``model.pt``) or a
            checkpoint file (``model.pt``, ``checkpoints/{latest,best}.pt``).
        device, dtype: where the generator lives; ``dtype=None`` is the run's dtype.
        config: the run's ``config.yaml`` (default: found next to the checkpoint).
        energy, regularize: see :func:`make_energy`; ``with_energy=False`` attaches none.

    The internal-coordinate transform is fitted to the reference structure (plus tiny
    noise) and then overwritten by the checkpoint, so no MD data are needed.

    Raises:
        FileNotFoundError: no checkpoint or no config.
        ValueError: the checkpoint belongs to another system or flow than the config.
    """
    weights, cfg_path, cfg = run_config(run_or_checkpoint, config)
    state, extra = _read_weights(weights)
    name = str(cfg.system.name)
    if "system" in extra and extra["system"] != name:
        raise ValueError(
            f"checkpoint {weights} was trained on system {extra['system']!r}, but config "
            f"{cfg_path} is for system {name!r}"
        )
    if "flow" in extra:
        diff = _flow_differences(extra["flow"], OmegaConf.to_container(cfg.flow, resolve=True))
        if diff:
            raise ValueError(
                f"checkpoint {weights} does not match the flow in {cfg_path}: " + "; ".join(diff)
            )
    device = pick_device(device) if isinstance(device, str) else device
    if dtype is None:
        dtype = str(cfg.get("dtype", "float32"))
    dtype = pick_dtype(dtype) if isinstance(dtype, str) else dtype

    system = instantiate(cfg.system.load)
    flow_factory = instantiate(cfg.flow)
    g = torch.Generator().manual_seed(0)
    if is_toy(system):
        placeholder = torch.randn(16, system.dim, generator=g, dtype=torch.float64)
        generator = pipeline.toy_generator(system, placeholder, flow_factory)
    else:
        ref = torch.as_tensor(system.positions, dtype=torch.float64).reshape(1, -1)
        noise = 1e-3 * torch.randn(8, ref.shape[1], generator=g, dtype=torch.float64)
        # the latent angle mask is data-dependent; the checkpoint's prior records it
        circ = state.get("prior.circular", "all")
        try:
            generator = pipeline.molecular_generator(
                system, ref + noise, flow_factory, circular=circ
            )
        except ValueError:  # a mask of another molecule: load_state_dict below says so
            generator = pipeline.molecular_generator(system, ref + noise, flow_factory)
    generator = generator.to(device=device, dtype=dtype)
    try:
        generator.load_state_dict(state)
    except RuntimeError as err:
        lines = [ln.strip().rstrip(".") for ln in str(err).splitlines()[1:] if ln.strip()]
        detail = (lines[0] if lines else str(err)) + (
            f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        )
        flow = ", ".join(
            f"{k}={cfg.flow[k]}" for k in ("kind", "n_blocks", "hidden") if k in cfg.flow
        )
        raise ValueError(
            f"checkpoint {weights} does not match the generator built from {cfg_path} "
            f"(system {name!r}, flow {flow}); trained with another system or flow? {detail}"
        ) from err
    if with_energy:
        generator.energy = make_energy(cfg, system, energy, regularize)
        if isinstance(generator.energy, torch.nn.Module):
            generator.energy.to(device=device, dtype=dtype)
    generator.eval()
    return cfg, system, generator


def ess_or_zero(log_w: np.ndarray) -> float:
    """Normalised Kish ESS, 0 when no sample carries weight."""
    lw = np.asarray(log_w, dtype=np.float64)
    lw = np.where(np.isnan(lw) | (lw == np.inf), -np.inf, lw)
    if lw.size == 0 or not np.isfinite(lw).any():
        return 0.0
    return effective_sample_size(lw)


class _TrajectoryWriter:
    """Writes position batches (nm) to HDF5 / DCD (appending) and the first frame to PDB."""

    def __init__(self, out: Path, topology: Any, formats: list[str]) -> None:
        from mdtraj.formats import DCDTrajectoryFile, HDF5TrajectoryFile

        self.out, self.topology, self.formats = out, topology, formats
        self.files: dict[str, Any] = {}
        if "h5" in formats:
            h5 = HDF5TrajectoryFile(str(out / "samples.h5"), "w")
            h5.topology = topology
            self.files["h5"] = h5
        if "dcd" in formats:
            self.files["dcd"] = DCDTrajectoryFile(str(out / "samples.dcd"), "w")
        self.n = 0

    def write(self, xyz: np.ndarray) -> None:
        if "h5" in self.files:
            t = np.arange(self.n, self.n + len(xyz), dtype=np.float32)
            self.files["h5"].write(coordinates=xyz, time=t)
        if "dcd" in self.files:
            self.files["dcd"].write(10.0 * xyz)  # DCD stores angstrom
        if self.n == 0 and "pdb" in self.formats:
            import mdtraj

            mdtraj.Trajectory(xyz[:1], self.topology).save_pdb(str(self.out / "samples.pdb"))
        self.n += len(xyz)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def write_samples(
    generator: Any,
    system: Any,
    out: str | os.PathLike,
    n_samples: int,
    batch_size: int = 4096,
    formats: list[str] | tuple[str, ...] = ("h5",),
    progress: bool = True,
    extra: Mapping | None = None,
) -> dict:
    """Draw ``n_samples`` in batches and write them to ``out``; returns the summary.

    Files: ``samples.h5`` (mdtraj HDF5, float32 nm; plus ``samples.dcd`` and
    ``samples.pdb`` = the first sample, the topology for the DCD, when in ``formats``)
    or ``samples.npy`` for toy systems; ``log_q.npy``, ``energies.npy`` (reduced, kT),
    ``log_weights.npy`` (``-u - log q``; ``-inf`` where u or log q is not finite) and
    ``summary.json``. Memory holds one batch of positions plus three float64 arrays.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_samples, batch_size = int(n_samples), int(batch_size)
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples}, {batch_size}")
    formats = [str(f).lower() for f in formats]
    bad = sorted(set(formats) - set(TRAJ_FORMATS))
    if bad:
        raise ValueError(f"unknown trajectory format(s) {bad}; choose from {list(TRAJ_FORMATS)}")
    if generator.energy is None:
        raise ValueError("the generator has no energy: cannot compute importance weights")
    toy = is_toy(system)
    if toy:
        store = np.lib.format.open_memmap(
            out / "samples.npy", mode="w+", dtype=np.float64, shape=(n_samples, system.dim)
        )
        writer = None
    else:
        writer = _TrajectoryWriter(out, system.mdtraj_topology, formats or ["h5"])
    log_q = np.empty(n_samples)
    u = np.empty(n_samples)
    t0 = time.time()
    done = 0
    try:
        with tqdm(total=n_samples, disable=not progress, desc="sampling", unit="sample") as bar:
            while done < n_samples:
                m = min(batch_size, n_samples - done)
                with torch.no_grad():
                    x, lq = generator.sample(m, with_log_prob=True)
                    e = generator.reduced_energy(x)
                log_q[done : done + m] = lq.detach().cpu().double().numpy()
                u[done : done + m] = e.detach().cpu().double().numpy()
                xb = x.detach().cpu()
                if toy:
                    store[done : done + m] = xb.double().numpy()
                else:
                    writer.write(xb.float().numpy().reshape(m, -1, 3))
                done += m
                bar.update(m)
    finally:
        if writer is not None:
            writer.close()
        if toy:
            store.flush()
            del store
    elapsed = time.time() - t0
    ok = np.isfinite(u) & np.isfinite(log_q)
    log_w = np.where(ok, -u - log_q, -np.inf)
    np.save(out / "log_q.npy", log_q)
    np.save(out / "energies.npy", u)
    np.save(out / "log_weights.npy", log_w)
    files = ["samples.npy"] if toy else [f"samples.{f}" for f in (formats or ["h5"])]
    summary = {
        "n_samples": n_samples,
        "ess": ess_or_zero(log_w),
        "nonfinite_energy_fraction": float(1.0 - np.isfinite(u).mean()),
        "nonfinite_log_q_fraction": float(1.0 - np.isfinite(log_q).mean()),
        "n_atoms": None if toy else int(system.n_atoms),
        "dim": int(system.dim),
        "files": files + ["log_q.npy", "energies.npy", "log_weights.npy"],
        "wall_time_s": elapsed,
        "samples_per_s": n_samples / max(elapsed, 1e-9),
        **dict(extra or {}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


@dataclass
class SampleSet:
    """A folder written by :func:`write_samples` (plus ``run_config.yaml``).

    ``positions`` are read in chunks by :meth:`chunks` (float64 ``(m, dim)`` nm);
    the arrays are loaded eagerly and checked for equal lengths.
    """

    folder: Path
    summary: dict
    run_cfg: DictConfig
    log_w: np.ndarray
    u: np.ndarray
    log_q: np.ndarray
    path: Path
    n: int

    @classmethod
    def open(cls, folder: str | os.PathLike) -> SampleSet:
        folder = Path(folder).expanduser().resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"samples={folder}: not a folder (use sample.py's output)")
        need = ["summary.json", RUN_CONFIG, "log_weights.npy", "energies.npy", "log_q.npy"]
        missing = [f for f in need if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a sample.py output folder: missing {missing}")
        summary = json.loads((folder / "summary.json").read_text())
        run_cfg = OmegaConf.load(folder / RUN_CONFIG)
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
        return cls(folder, summary, run_cfg, lw, u, lq, path, n)

    def n_atoms(self) -> int | None:
        """Atoms in the trajectory (None for toy ``samples.npy``)."""
        if self.path.suffix != ".h5":
            return None
        from mdtraj.formats import HDF5TrajectoryFile

        with HDF5TrajectoryFile(str(self.path), "r") as f:
            return int(f.topology.n_atoms)

    def check_system(self, system: Any) -> None:
        """``ValueError`` if the samples do not have the system's atom count / dim."""
        n_atoms = self.n_atoms()
        if is_toy(system):
            if n_atoms is not None:
                raise ValueError(f"{self.path} is a trajectory but the system is a toy energy")
            dim = int(np.load(self.path, mmap_mode="r").shape[1])
            if dim != system.dim:
                raise ValueError(f"{self.path} has dimension {dim}, the system {system.dim}")
            return
        if n_atoms is None:
            raise ValueError(f"{self.path} holds toy samples but the system is molecular")
        if n_atoms != system.n_atoms:
            raise ValueError(
                f"{self.path} has {n_atoms} atoms but system {system.name!r} has "
                f"{system.n_atoms}: these samples are not of this system"
            )

    def chunks(self, chunk: int = 65536) -> Iterator[np.ndarray]:
        """Positions in chunks of ``chunk`` frames, float64 ``(m, dim)`` (nm)."""
        if self.path.suffix == ".h5":
            from mdtraj.formats import HDF5TrajectoryFile

            with HDF5TrajectoryFile(str(self.path), "r") as f:
                for start in range(0, self.n, chunk):
                    c = f.read(n_frames=min(chunk, self.n - start)).coordinates
                    yield c.reshape(len(c), -1).astype(np.float64)
        else:
            data = np.load(self.path, mmap_mode="r")
            for start in range(0, len(data), chunk):
                yield np.asarray(data[start : start + chunk], dtype=np.float64)


def find_md_cache(run_cfg: DictConfig, system: Any, data_dir: str | os.PathLike | None = None):
    """The MD cache entry the run was trained on, or None if it is not on disk.

    ``data_dir`` (default: the run's ``data_dir``) is tried as given (relative to the
    current folder). Never generates data.
    """
    from bgflow_mini.data import cache_key, generate_or_load, system_fingerprint
    from bgflow_mini.md import resolve_settings

    if "md" not in run_cfg:
        return None
    root = data_dir if data_dir is not None else run_cfg.get("data_dir", "data")
    settings = OmegaConf.to_container(run_cfg.md, resolve=True)
    resolved = resolve_settings(settings, system.temperature)
    key = cache_key(system.name, resolved, system_fingerprint(system))
    folder = Path(root).expanduser().resolve() / system.name / key
    if not (folder / "meta.json").is_file():
        return None
    return generate_or_load(system, settings, folder.parents[1], progress=False, log=None)


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
