"""Time to build the internal-coordinate transform of a peptide, by size.

For capped peptides of about 22, 62, 250 and 1,000 atoms (made with the package's
builder, ``bgflow_mini.system_builder.build_system``, without minimisation; residues
cycle through ``--residues`` so that the long ones hold Pro, Phe, Trp, Tyr and His
rings), prints the wall time of ``build_zmatrix`` (with the reference positions, so
collinearity is checked), ``ring_zmatrix`` and ``InternalCoordinates``, plus the
number of Cartesian ring rows. The goal (issue #11) is under 5 s at 1,000 atoms.

Usage::

    python benchmarks/zmatrix_build.py
    python benchmarks/zmatrix_build.py --lengths 1 5 24 100 --residues AFPWYH
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time

import mdtraj as md
from _machine import cpu_model  # benchmarks/_machine.py

from bgflow_mini.coordinates import InternalCoordinates, build_zmatrix, ring_zmatrix

__all__ = ["main"]


def _peptide(n_residues: int, residues: str, folder: str) -> md.Trajectory:
    from bgflow_mini.system_builder import build_system

    seq = "".join(residues[k % len(residues)] for k in range(n_residues))
    path = build_system(f"{folder}/p{n_residues}", sequence=seq, minimize=False)
    pdb = next(path.glob("*.pdb"))
    return md.load(str(pdb))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1, 5, 24, 100])
    ap.add_argument("--residues", default="A", help="one-letter codes, cycled (default A)")
    ap.add_argument("--ring-residues", default="AFPWYH", help="second series, with rings")
    args = ap.parse_args(argv)
    print(f"# {datetime.date.today()}  {cpu_model()}")
    head = ("sequence", "atoms", "zmatrix s", "rings s", "IC s", "ring rows")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (10, 6, 10, 8, 7, 9), strict=True)))
    with tempfile.TemporaryDirectory() as tmp:
        for residues in (args.residues, args.ring_residues):
            for n in args.lengths:
                traj = _peptide(n, residues, f"{tmp}/{residues}")
                top, pos = traj.topology, traj.xyz[0]
                t0 = time.perf_counter()
                z = build_zmatrix(top, positions=pos)
                t1 = time.perf_counter()
                z, cart = ring_zmatrix(z, top, pos)
                t2 = time.perf_counter()
                InternalCoordinates(z, cart)
                t3 = time.perf_counter()
                label = f"{residues[:6]}x{n}"
                print(
                    f"{label:>10} {top.n_atoms:>6} {t1 - t0:>10.3f} {t2 - t1:>8.3f} "
                    f"{t3 - t2:>7.3f} {int(cart.sum()):>9}"
                )


if __name__ == "__main__":
    main()
