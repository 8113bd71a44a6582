"""Ring dipeptides with the default recipe: closed rings, kept chirality, ESS, ΔF vs MD.

Trains the default recipe (``bgflow-train`` with only ``system=...`` and this script's
overrides) on each capped ring dipeptide shipped with the package, then prints one row
per run from its ``metrics.json``: ESS over the evaluation samples, finite-energy
fraction, chirality kept, the largest ring-bond std ratio (samples / MD test frames) and
mean error, the ΔF of the system's first two states (Pro: ring pucker; the aromatics:
phi > 0) against MD, and the wall time. Issue #11's goals: every ring bond's std within
1.3 x MD's and mean within 0.5 %; chirality kept; >= 99 % finite energies; ESS not
below alanine dipeptide's with the same recipe by more than a third.

Usage::

    python benchmarks/ring_dipeptides.py --out runs/rings            # all five, ~15 min each
    python benchmarks/ring_dipeptides.py --systems pro phe --set ring_coordinates=internal
    python benchmarks/ring_dipeptides.py --summarize runs/rings/*    # table of finished runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from _machine import cpu_model  # benchmarks/_machine.py

__all__ = ["main", "row"]

SYSTEMS = ("pro", "phe", "tyr", "trp", "his")


def row(run: Path) -> str:
    """One Markdown table row from a finished run folder."""
    m = json.loads((run / "metrics.json").read_text())
    cfg = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else ""
    rc = "internal" if "ring_coordinates: internal" in cfg else "cartesian"
    rings = m.get("ring_bonds") or {}
    ev = m.get("energy_evaluations") or {}
    nan = float("nan")
    std = f"{rings.get('min_std_ratio', nan):.2f}-{rings.get('max_std_ratio', nan):.2f}"
    df = (
        f"{m['state_a']}->{m['state_b']}: {m['dF_reweighted']:.2f} ± "
        f"{m['dF_reweighted_stderr']:.2f} vs {m['dF_reference']:.2f} ± "
        f"{m['dF_reference_stderr']:.2f}"
    )
    cells = [
        run.name,
        rc,
        f"{m['ess']:.3f}",
        f"{m['finite_energy_fraction']:.4f}",
        f"{m.get('chirality_kept_fraction', nan):.4f}",
        std,
        f"{100 * rings.get('max_mean_rel_error', nan):.2f}",
        df,
        f"{ev.get('training', 0):,}",
        f"{m.get('wall_time_s', nan) / 60:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| run | rings | ESS | finite | chirality kept | ring bond std / MD | max mean err % | "
    "ΔF reweighted vs MD (kT) | energy evals (train) | train+eval min |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--out", default="runs/ring_dipeptides")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides")
    ap.add_argument("--summarize", nargs="*", help="only print the table of these run folders")
    args = ap.parse_args(argv)
    print(f"# {datetime.date.today()}  {cpu_model()}")
    if args.summarize is not None:
        runs = [Path(p) for p in args.summarize if (Path(p) / "metrics.json").exists()]
    else:
        runs = []
        for name in args.systems:
            run = Path(args.out) / f"{name}_dipeptide_vacuum"
            cmd = [sys.executable, "-m", "bgflow_mini.apps.train"]
            cmd += [f"system={name}_dipeptide_vacuum", "progress=false"]
            cmd += [f"data_dir={args.data_dir}", f"hydra.run.dir={run}", *args.set]
            t0 = time.perf_counter()
            run.parent.mkdir(parents=True, exist_ok=True)
            with open(f"{run}.log", "w") as log:
                done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
            took = (time.perf_counter() - t0) / 60
            print(f"# {name}: exit {done.returncode}, {took:.1f} min including MD", flush=True)
            runs.append(run)
    print(HEADER)
    for run in runs:
        if (run / "metrics.json").exists():
            print(row(run))


if __name__ == "__main__":
    main()
