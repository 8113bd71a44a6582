"""Throughput of energy + force evaluation for alanine dipeptide, in configurations/s.

Compares, at several batch sizes:

* a plain loop of ``setPositions`` / ``getState(energy, forces)`` on OpenMM's Reference
  and CPU platforms;
* ``OpenMMEnergy`` (Reference platform) with 1 and 2 worker processes;
* ``TorchForceField`` in float32 and float64 on the CPU (forward + backward for forces;
  one torch thread unless ``--torch-threads`` says otherwise);
* ``TorchForceField`` on CUDA when available (inputs already on the GPU).

Configurations are the reference structure plus 0.01 nm Gaussian noise. Each entry is
the median over ``--repeats`` timed runs (wall clock) after one warm-up run.

Usage::

    python benchmarks/energy.py                       # aldp_vacuum, batches 64..4096
    python benchmarks/energy.py --implicit            # also aldp_implicit
    python benchmarks/energy.py --batch-sizes 1024 --repeats 5 --torch-threads 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from collections.abc import Callable

import numpy as np
import openmm
import torch
from _machine import cpu_model  # benchmarks/_machine.py
from openmm import unit

from bgflow_mini.energies.torchff import TorchForceField
from bgflow_mini.systems import load_system

__all__ = ["main", "openmm_loop", "time_call"]

KJ = unit.kilojoule_per_mole
NM = unit.nanometer


def openmm_loop(context: openmm.Context, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies (batch,) kJ/mol and forces (batch, n, 3) kJ/mol/nm, one call per frame."""
    energies = np.empty(len(xs))
    forces = np.empty_like(xs)
    for i, x in enumerate(xs):
        context.setPositions(x)
        state = context.getState(getEnergy=True, getForces=True)
        energies[i] = state.getPotentialEnergy().value_in_unit(KJ)
        forces[i] = state.getForces(asNumpy=True).value_in_unit(KJ / NM)
    return energies, forces


def energy_and_grad(energy: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """u (batch,) and du/dx of an Energy (the forces' work: backward pass included)."""
    x = x.detach().requires_grad_(True)
    u = energy(x)
    (grad,) = torch.autograd.grad(u.sum(), x)
    return u, grad


def time_call(fn: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None):
    """Median wall time (s) over ``repeats`` runs after one warm-up run."""
    fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


Setup = Callable[[np.ndarray], Callable[[], object]]


def methods(mol, args) -> list[tuple[str, Callable[[], tuple[Setup, Callable[[], None]]]]]:
    """(label, make) pairs; make() returns (setup, close), setup(xs) the callable to time."""
    out = []
    for name in ("Reference", "CPU"):

        def make(name=name):
            platform_ = openmm.Platform.getPlatformByName(name)
            ctx = openmm.Context(mol.system, openmm.VerletIntegrator(0.001), platform_)
            return (lambda xs: lambda: openmm_loop(ctx, xs)), (lambda: None)

        out.append((f"OpenMM loop, {name} platform", make))
    try:
        from bgflow_mini.energies.openmm import OpenMMEnergy
    except ImportError as err:
        print(f"(skipping OpenMMEnergy: {err})")
    else:
        for n_workers in (1, 2):

            def make(n_workers=n_workers):
                bridge = OpenMMEnergy(mol, platform="Reference", n_workers=n_workers).start()

                def setup(xs):
                    x = torch.from_numpy(xs.reshape(len(xs), -1))
                    return lambda: energy_and_grad(bridge, x)

                return setup, bridge.close

            out.append((f"OpenMMEnergy, Reference, {n_workers} worker(s)", make))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.no_cuda else [])
    for device in devices:
        for dtype in (torch.float32, torch.float64):

            def make(device=device, dtype=dtype):
                ff = TorchForceField.from_openmm(mol).to(device, dtype)

                def setup(xs):
                    x = torch.from_numpy(xs.reshape(len(xs), -1))
                    if device == "cpu":  # conversion from numpy included in the timing
                        return lambda: energy_and_grad(ff, x.to(dtype))
                    x = x.to(device, dtype)  # CUDA: inputs already on the GPU
                    return lambda: energy_and_grad(ff, x)

                return setup, lambda: None

            out.append((f"TorchForceField {device.upper()} {str(dtype)[6:]}", make))
    return out


def run_system(name: str, args) -> None:
    mol = load_system(name)
    rng = np.random.default_rng(0)
    table: dict[str, list[float]] = {}
    frames = {
        batch: mol.positions[None] + 0.01 * rng.standard_normal((batch, mol.n_atoms, 3))
        for batch in args.batch_sizes
    }
    for label, make in methods(mol, args):
        setup, close = make()
        try:
            row = []
            for batch in args.batch_sizes:
                sync = torch.cuda.synchronize if "CUDA" in label else None
                seconds = time_call(setup(frames[batch]), args.repeats, sync)
                row.append(batch / seconds)
        finally:
            close()
        table[label] = row
        print(f"  done: {label}", flush=True)

    head = "| method | " + " | ".join(f"batch {b}" for b in args.batch_sizes) + " |"
    rule = "|---|" + "---:|" * len(args.batch_sizes)
    print(f"\n### {name}: energy + forces, configurations/s (median of {args.repeats})\n")
    print(head)
    print(rule)
    for label, row in table.items():
        print(f"| {label} | " + " | ".join(f"{v:,.0f}" for v in row) + " |")
    ref = table.get("OpenMM loop, Reference platform")
    if ref is not None:
        print("\nspeed relative to the Reference-platform loop:\n")
        print(head)
        print(rule)
        for label, row in table.items():
            cells = " | ".join(f"{v / r:.2f}x" for v, r in zip(row, ref, strict=True))
            print(f"| {label} | {cells} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", default="aldp_vacuum", help="system name (load_system)")
    parser.add_argument("--implicit", action="store_true", help="also run aldp_implicit")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: one core, like the Reference loop); 0 = torch's",
    )
    parser.add_argument("--no-cuda", action="store_true", help="skip CUDA even if available")
    args = parser.parse_args(argv)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical cores, load average {load}")
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"OpenMM {openmm.__version__}, numpy {np.__version__}"
    )
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name()}")
    names = [args.system] + (["aldp_implicit"] if args.implicit else [])
    for name in dict.fromkeys(names):
        run_system(name, args)


if __name__ == "__main__":
    main()
