"""TorchForceField scaling with molecule size: throughput and peak memory (issue 13).

Capped poly-alanine peptides (``A`` x 1, 5, 24, 99: 22, 62, 252 and 1,002 atoms) are built
with :func:`bgflow_mini.system_builder.build_system` (amber99sbildn, in vacuum and with
OBC implicit solvent, not minimised) and evaluated at one batch size (default 256; the
configurations are the built structure plus 0.01 nm Gaussian noise) by

* the OpenMM Reference platform in a plain ``setPositions`` / ``getState`` loop
  (``energy.py``'s ``openmm_loop``);
* ``TorchForceField`` on the CPU in float32 and float64, energy + forces (forward and
  backward pass);
* with ``--baseline REV``, the ``TorchForceField`` of git revision REV as well (its
  energy modules extracted with ``git show`` into a temporary package), for before/after.

Every case runs in a fresh subprocess, so its peak memory is its own: ``peak RSS`` is the
process's maximum resident set size (``ru_maxrss``: Python, torch, OpenMM, loading the
system and the configurations included), ``growth`` the peak while building and
evaluating the force field (or the OpenMM context) over the resident size just before
(the kernel's VmHWM reset through /proc/self/clear_refs; where that is unsupported, the
growth of ``ru_maxrss``, which can read 0). Throughput is the median over at least
``--repeats`` timed calls after one warm-up call, more until they add up to
``--min-seconds`` (so that the first calls or a moment of contention on a shared machine
do not decide the figure), fewer when the calls take longer than ``--max-seconds``.
The accuracy columns compare the first 8 configurations with OpenMM Reference: the
largest energy difference and the largest per-configuration RMS force difference.
``--memory-limit-gb`` caps each subprocess's address space (``RLIMIT_AS``), so a baseline
whose dense matrices do not fit fails alone, reported as such, instead of exhausting the
machine.

Usage::

    python benchmarks/torchff_scaling.py                          # new code only
    python benchmarks/torchff_scaling.py --baseline 7289c60      # with the old code
    python benchmarks/torchff_scaling.py --residues 1 5 --batch 64 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main", "run_case"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the modules the old TorchForceField needs (units.py and base.py import nothing else)
BASELINE_FILES = [
    "bgflow_mini/units.py",
    "bgflow_mini/energies/base.py",
    "bgflow_mini/energies/torchff.py",
    "bgflow_mini/energies/_torchff_terms.py",
    "bgflow_mini/energies/_torchff_gbsa.py",
]
N_CHECK = 8  # configurations compared with OpenMM Reference


def extract_baseline(rev: str, out: Path) -> Path:
    """Write ``BASELINE_FILES`` at git revision ``rev`` as package ``bgflow_baseline``
    under ``out``; returns ``out`` (to put on ``sys.path``)."""
    for rel in BASELINE_FILES:
        text = subprocess.run(
            ["git", "show", f"{rev}:{rel}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        target = out / rel.replace("bgflow_mini", "bgflow_baseline", 1)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for pkg in ("bgflow_baseline", "bgflow_baseline/energies"):
        (out / pkg / "__init__.py").touch()
    return out


def _peak_mb() -> float:
    """Peak resident set size of this process so far, MB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _status_mb(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of /proc/self/status in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024.0
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset the kernel's peak RSS (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_case(case: dict) -> dict:
    """One measurement in this (fresh) process; see the module docstring."""
    import numpy as np
    import openmm
    import torch
    from energy import energy_and_grad, openmm_loop  # benchmarks/energy.py

    from bgflow_mini.systems import load_system

    torch.set_num_threads(case["threads"])
    mol = load_system(case["folder"])
    rng = np.random.default_rng(0)
    xs = mol.positions[None] + 0.01 * rng.standard_normal((case["batch"], mol.n_atoms, 3))
    platform = openmm.Platform.getPlatformByName("Reference")
    out: dict = {"atoms": mol.n_atoms}
    # growth: the peak from here on (VmHWM reset) over the resident size now
    reset = _reset_peak()
    before = _status_mb("VmRSS") if reset else _peak_mb()
    start = time.perf_counter()
    if case["method"] == "openmm":
        context = openmm.Context(mol.system, openmm.VerletIntegrator(0.001), platform)
        call = lambda: openmm_loop(context, xs)  # noqa: E731
    else:
        if case["method"] == "baseline":
            sys.path.insert(0, case["baseline_dir"])
            from bgflow_baseline.energies.torchff import TorchForceField
        else:
            from bgflow_mini.energies.torchff import TorchForceField
        dtype = getattr(torch, case["dtype"])
        ff = TorchForceField.from_openmm(mol).to(dtype)
        x = torch.from_numpy(xs.reshape(len(xs), -1))
        call = lambda: energy_and_grad(ff, x.to(dtype))  # noqa: E731
    out["build_s"] = time.perf_counter() - start
    times: list[float] = []
    start = time.perf_counter()
    result = call()  # warm-up
    warm = time.perf_counter() - start
    spent = warm
    while not times or (
        (len(times) < case["repeats"] or sum(times) < case["min_seconds"])
        and spent < case["max_seconds"]
    ):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    out["per_s"] = case["batch"] / float(np.median(times))
    out["timed_calls"] = len(times)
    out["peak_mb"] = _peak_mb()
    out["growth_mb"] = (_status_mb("VmHWM") if reset else _peak_mb()) - before
    if case["method"] != "openmm":  # accuracy against OpenMM Reference
        u, grad = result
        kt = ff.kT
        e = u.detach().double().numpy()[:N_CHECK] * kt
        f = -grad.double().numpy().reshape(xs.shape)[:N_CHECK] * kt
        context = openmm.Context(mol.system, openmm.VerletIntegrator(0.001), platform)
        e_ref, f_ref = openmm_loop(context, xs[:N_CHECK])
        out["max_de"] = float(np.abs(e - e_ref).max())
        out["max_f_rms"] = float(np.sqrt(((f - f_ref) ** 2).mean(axis=(1, 2))).max())
    return out


def spawn(case: dict, limit_gb: float | None) -> dict:
    """``run_case(case)`` in a fresh interpreter (address space capped at ``limit_gb``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(case)]
    if limit_gb:
        cmd += ["--memory-limit-gb", str(limit_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {err[:160]}"}


def build_peptides(residues: list[int], solvents: list[str], workdir: Path) -> dict:
    """Build (or reuse) the peptide system folders; returns {(residues, solvent): path}."""
    from bgflow_mini.system_builder import build_system

    folders = {}
    for n in residues:
        for solvent in solvents:
            folder = workdir / f"ala{n}_{solvent}"
            if not (folder / "system.yaml").is_file():
                build_system(folder, sequence="A" * n, solvent=solvent, minimize=False)
            folders[n, solvent] = folder
    return folders


def _fmt(row: dict) -> list[str]:
    if "error" in row:
        return ["failed"] + ["-"] * 5 + [row["error"]]
    acc = ["-", "-"]
    if "max_de" in row:
        acc = [f"{row['max_de']:.2g}", f"{row['max_f_rms']:.2g}"]
    note = f"{row['timed_calls']} timed call(s)"
    return [
        f"{row['per_s']:,.1f}" if row["per_s"] < 100 else f"{row['per_s']:,.0f}",
        f"{row['peak_mb']:,.0f}",
        f"{row['growth_mb']:,.0f}",
        f"{row['build_s']:.2f}",
        *acc,
        note,
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--residues", type=int, nargs="+", default=[1, 5, 24, 99])
    parser.add_argument("--solvents", nargs="+", default=["vacuum", "obc"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--min-seconds", type=float, default=2.0, help="time more calls until this much"
    )
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per case, timed calls")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--baseline", default=None, help="git revision of the old code")
    parser.add_argument("--memory-limit-gb", type=float, default=12.0, help="0: no cap")
    parser.add_argument("--workdir", default=None, help="where the peptides are built")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    if args.case is not None:
        if args.memory_limit_gb:
            import resource

            limit = int(args.memory_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            print(json.dumps(run_case(json.loads(args.case))))
        except MemoryError as err:
            print(json.dumps({"error": f"out of memory under the cap: {err!r}"[:200]}))
        except RuntimeError as err:  # torch's allocator
            if "memory" not in str(err):
                raise
            print(json.dumps({"error": f"out of memory under the cap: {err}"[:200]}))
        return

    import numpy as np
    import openmm
    import torch
    from _machine import cpu_model

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical cores, load average {load}")
    print(
        f"torch {torch.__version__} ({args.threads} thread(s)), OpenMM {openmm.__version__}, "
        f"numpy {np.__version__}; batch {args.batch}, median of >= {args.repeats} calls "
        f"and >= {args.min_seconds} s after a warm-up; subprocess address space cap "
        f"{args.memory_limit_gb or 'none'} GB"
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp) / "peptides"
        folders = build_peptides(args.residues, args.solvents, workdir)
        methods = [("OpenMM Reference loop", "openmm", None)]
        impls = [("new", "new")]
        if args.baseline:
            base_dir = extract_baseline(args.baseline, Path(tmp) / "baseline")
            impls.append((f"old ({args.baseline})", "baseline"))
        for label, method in impls:
            for dtype in args.dtypes:
                methods.append((f"TorchForceField {label} {dtype}", method, dtype))
        head = (
            "| atoms | solvent | method | conf/s | peak RSS MB | growth MB | build s "
            "| max dE kJ/mol | max F RMS err kJ/mol/nm | note |"
        )
        print(f"\n{head}\n|---:|---|---|---:|---:|---:|---:|---:|---:|---|", flush=True)
        atoms: dict[Path, int] = {}
        for (n, solvent), folder in folders.items():
            for label, method, dtype in methods:
                case = {
                    "folder": str(folder),
                    "method": method,
                    "dtype": dtype,
                    "batch": args.batch,
                    "repeats": args.repeats,
                    "min_seconds": args.min_seconds,
                    "max_seconds": args.max_seconds,
                    "threads": args.threads,
                    "baseline_dir": str(base_dir) if method == "baseline" else None,
                }
                row = spawn(case, args.memory_limit_gb)
                atoms.setdefault(folder, row.get("atoms"))
                cells = " | ".join(_fmt(row))
                print(f"| {atoms[folder] or f'A{n}'} | {solvent} | {label} | {cells} |", flush=True)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\nend: {datetime.datetime.now().isoformat(timespec='seconds')}, load average {load}")


if __name__ == "__main__":
    main()
