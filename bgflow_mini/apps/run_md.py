"""``bgflow-md``: generate (or find cached) MD data for a system and print a summary.

    bgflow-md                                  # aldp_vacuum, replica exchange
    bgflow-md md=plain system=aldp_implicit
    bgflow-md md.n_frames=1000 md.n_replicas=4 data_dir=/tmp/data

Data go to ``<data_dir>/<system>/<settings hash>/`` (see :mod:`bgflow_mini.data`); a
second run with the same settings reuses them.
"""

from __future__ import annotations

import time

import hydra
import numpy as np
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig

from bgflow_mini.data import CacheEntry, generate_or_load
from bgflow_mini.targets import as_target

from ._common import CONFIG_PATH, plain, run_app
from .validation import validate_run_md_config

__all__ = ["main", "run_md", "summary"]


def summary(entry: CacheEntry, elapsed: float) -> str:
    """Multi-line human-readable summary of a cache entry."""
    info, s = entry.info, entry.settings
    temps = np.asarray(s["temperatures"])
    lines = [
        f"data:            {entry.path} ({'cache hit' if entry.hit else 'generated'})",
        f"trajectory:      {entry.traj_path}",
        f"frames:          {info['n_frames']} every {s['save_every'] * s['timestep']:.3g} ps "
        f"({info['ns_per_replica']:.3g} ns per replica)",
        f"temperatures:    {', '.join(f'{t:.0f}' for t in temps)} K",
        f"timestep:        {s['timestep'] * 1000:g} fs, hydrogens "
        + (f"{s['hydrogen_mass']:g} amu" if s.get("hydrogen_mass") else "of the force field"),
        f"MD wall time:    {info['wall_time_s']:.1f} s "
        f"({info['ns_per_day']:.0f} ns/day per replica, {info['n_workers']} worker(s), "
        f"{info['platform']})",
        f"this call:       {elapsed:.1f} s",
    ]
    if len(temps) > 1:
        acc = ", ".join(
            f"{temps[i]:.0f}-{temps[i + 1]:.0f} K: {a:.2f}"
            for i, a in enumerate(info["swap_acceptance"])
        )
        lines.append(f"swap acceptance: {acc}")
        lines.append(f"round trips:     {info['round_trips']}")
    if "phi_transitions" in info:
        lines.append(f"phi transitions: {info['phi_transitions']} at {temps[0]:.0f} K")
        lines.append(f"phi > 0:         {info['phi_positive_fraction']:.4f} of frames")
    if "cis_peptide_fraction" in info:
        lines.append(f"cis peptide:     {info['cis_peptide_fraction']:.4f} of frames")
    return "\n".join(lines)


def run_md(cfg: DictConfig) -> CacheEntry:
    """Validate, then generate or find the data; prints the summary."""
    t0 = time.perf_counter()
    validate_run_md_config(cfg)
    target = as_target(instantiate(cfg.system.load))
    if target.kind != "molecular":
        raise ValueError(f"bgflow-md runs molecular dynamics; {target.name!r} is a toy energy")
    entry = generate_or_load(
        target.system,
        plain(cfg.md),
        to_absolute_path(cfg.data_dir),
        n_workers=cfg.n_workers,
        progress=cfg.progress,
    )
    print(summary(entry, time.perf_counter() - t0), flush=True)
    return entry


@hydra.main(config_path=CONFIG_PATH, config_name="run_md", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_app(lambda: run_md(cfg))


if __name__ == "__main__":
    main()
