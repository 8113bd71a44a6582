"""MD throughput and replica-exchange benchmark.

1. Plain Langevin MD throughput (ns/day, 1 fs steps) for aldp_vacuum and aldp_implicit
   on the Reference and CPU platforms.
2. Replica exchange on aldp_vacuum: phi > 0 population at the target temperature with a
   block-bootstrap standard error, swap acceptance, wall time and ns per replica per minute.

Usage::

    python benchmarks/md.py                         # quick: 5000 steps, 0.2 ns REMD
    python benchmarks/md.py --steps 20000 --remd-ns 2 --replicas 8 --t-max 1000
    python benchmarks/md.py --skip-remd
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bgflow_mini.md import geometric_ladder, simulate
from bgflow_mini.systems import load_system

__all__ = ["block_bootstrap", "main", "remd_benchmark", "throughput"]


def block_bootstrap(
    values: np.ndarray, n_blocks: int = 20, n_resamples: int = 2000, seed: int = 0
) -> float:
    """Standard error of the mean of a correlated series by resampling contiguous blocks."""
    blocks = np.array([b.mean() for b in np.array_split(np.asarray(values, float), n_blocks)])
    rng = np.random.default_rng(seed)
    means = blocks[rng.integers(0, n_blocks, size=(n_resamples, n_blocks))].mean(axis=1)
    return float(means.std(ddof=1))


def throughput(name: str, platform: str, steps: int) -> float:
    """ns/day of plain MD (1 fs) for ``steps`` steps after 500 warm-up steps."""
    system = load_system(name)
    res = simulate(
        system,
        n_frames=10,
        save_every=max(steps // 10, 1),
        platform=platform,
        equilibration_steps=500,
        progress=False,
    )
    return float(res.info["ns_per_day"])


def remd_benchmark(
    ns_per_replica: float,
    n_replicas: int,
    t_max: float,
    save_every: int,
    swap_every: int,
    n_workers: int | None,
    platform: str,
    progress: bool,
) -> dict[str, object]:
    """Replica exchange on aldp_vacuum; returns a summary dict."""
    system = load_system("aldp_vacuum")
    temps = geometric_ladder(system.temperature, t_max, n_replicas)
    n_frames = max(int(round(ns_per_replica * 1e6 / save_every)), 20)
    res = simulate(
        system,
        n_frames,
        save_every=save_every,
        temperatures=temps,
        swap_every=swap_every,
        platform=platform,
        equilibration_steps=20000,
        n_workers=n_workers,
        progress=progress,
    )
    phi = system.compute_cvs(res.trajectory.xyz.reshape(n_frames, -1))["phi"]
    positive = (phi > 0).astype(float)
    info = res.info
    return {
        "temperatures": [round(float(t), 1) for t in temps],
        "ns_per_replica": info["ns_per_replica"],
        "wall_time_s": round(info["wall_time_s"], 1),
        "ns_per_replica_per_minute": info["ns_per_replica"] / info["production_time_s"] * 60,
        "swap_acceptance": [round(a, 3) for a in info["swap_acceptance"]],
        "round_trips": info["round_trips"],
        "phi_transitions_target": info["phi_transitions"],
        "phi_positive_fraction": float(positive.mean()),
        "phi_positive_se_block_bootstrap": block_bootstrap(positive),
        "cis_peptide_fraction": info.get("cis_peptide_fraction"),
        "n_workers": info["n_workers"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=5000, help="steps per throughput run")
    p.add_argument("--systems", nargs="+", default=["aldp_vacuum", "aldp_implicit"])
    p.add_argument("--platforms", nargs="+", default=["Reference", "CPU"])
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-remd", action="store_true")
    p.add_argument("--remd-ns", type=float, default=0.2, help="ns per replica")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--t-max", type=float, default=1000.0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--swap-every", type=int, default=100)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--remd-platform", default="Reference")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    args = p.parse_args(argv)

    if not args.skip_throughput:
        print(f"plain MD throughput, {args.steps} steps of 1 fs (ns/day):")
        for name in args.systems:
            for plat in args.platforms:
                t0 = time.perf_counter()
                rate = throughput(name, plat, args.steps)
                print(f"  {name:15s} {plat:10s} {rate:10.1f}   ({time.perf_counter() - t0:.1f} s)")
    if not args.skip_remd:
        print(f"replica exchange, aldp_vacuum, {args.replicas} replicas to {args.t_max} K:")
        out = remd_benchmark(
            args.remd_ns,
            args.replicas,
            args.t_max,
            args.save_every,
            args.swap_every,
            args.workers,
            args.remd_platform,
            args.progress,
        )
        print(json.dumps(out, indent=2))
        print(
            f"phi > 0 at {out['temperatures'][0]} K: {out['phi_positive_fraction']:.4f} "
            f"+- {out['phi_positive_se_block_bootstrap']:.4f} (block bootstrap)"
        )


if __name__ == "__main__":
    main()
