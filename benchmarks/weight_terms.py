"""Which force-field terms carry a trained generator's importance weights?

For the first ``n`` saved samples of a run (``samples.h5``, with their log weights) and
``n`` MD test frames of the same system, evaluates every force of the OpenMM System
separately (Reference platform, in kT) and prints, per force: the MD and sample mean and
spread, the reweighted sample mean, and the correlation of ``-E`` with ``log w``. Then the
same without steric clashes (nonbonded energy above MD's maximum + 5 kT), the weight share of
the clashes, and where the largest weights sit: their energy ``u`` and model density
``log q`` against the medians (large weights with ordinary ``u`` and low ``log q`` are thin
flow tails; with high ``u`` they are a missing region of the target).

Usage::

    python benchmarks/weight_terms.py RUN_FOLDER SYSTEM_NAME [N]
    python benchmarks/weight_terms.py outputs/2026-11-30/08-00-00 phe_dipeptide_vacuum 5000
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import openmm
import openmm.unit as unit
import yaml

from bgflow_mini.reweighting import effective_sample_size
from bgflow_mini.samples import SampleSet
from bgflow_mini.systems import load_system
from bgflow_mini.targets import as_target

__all__ = ["force_energies", "main"]


def force_energies(system: openmm.System, temperature_k: float, x: np.ndarray) -> dict:
    """``{force name: (n,) energies in kT}`` of every force, for ``x`` of shape (n, 3 atoms) nm."""
    system = copy.deepcopy(system)
    names = []
    for i, force in enumerate(system.getForces()):
        force.setForceGroup(i)
        names.append(type(force).__name__)
    platform = openmm.Platform.getPlatformByName("Reference")
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), platform)
    kt = (unit.MOLAR_GAS_CONSTANT_R * temperature_k * unit.kelvin).value_in_unit(
        unit.kilojoule_per_mole
    )
    out = np.zeros((len(names), x.shape[0]))
    for k, xi in enumerate(x):
        ctx.setPositions(xi.reshape(-1, 3))
        for g in range(len(names)):
            state = ctx.getState(getEnergy=True, groups={g})
            out[g, k] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / kt
    return {name: out[g] for g, name in enumerate(names) if out[g].std() > 0 or out[g].any()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a bgflow-train run folder (with samples.h5 and config.yaml)")
    ap.add_argument("system", help="the run's system name (load_system)")
    ap.add_argument("n", type=int, nargs="?", default=5000, help="samples and MD frames")
    args = ap.parse_args()

    samples = SampleSet.open(args.run)
    x = np.concatenate(list(samples.chunks()))[: args.n]
    lw, u = samples.log_w[: args.n], samples.u[: args.n]
    molecule = load_system(args.system)
    cfg = yaml.safe_load(open(f"{args.run}/config.yaml"))
    data = as_target(molecule).data(
        md=cfg["md"], data_dir=cfg["data_dir"], fractions=cfg["data"]["fractions"], progress=False
    )
    md = data.test.numpy()[: args.n]
    temperature = float(molecule.temperature)
    es, em = (
        force_energies(molecule.system, temperature, x),
        force_energies(molecule.system, temperature, md),
    )
    w = np.exp(lw - lw.max())
    w /= w.sum()
    print(f"{args.system}: {len(x)} samples, {len(md)} MD test frames; var(log w) {lw.var():.2f}")
    print(
        "\n| force | MD mean | MD std | sample mean | sample std | reweighted mean | r(-E, log w) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, e in es.items():
        r = np.corrcoef(-e, lw)[0, 1] if e.std() > 0 else 0.0
        m = em[name]
        print(
            f"| {name} | {m.mean():.2f} | {m.std():.2f} | {e.mean():.2f} | {e.std():.2f} "
            f"| {np.sum(w * e):.2f} | {r:+.2f} |"
        )
    if "NonbondedForce" in es:
        clash = es["NonbondedForce"] > em["NonbondedForce"].max() + 5.0
        ok = ~clash
        print(f"\nclashes: {clash.mean():.4f} of the samples, weight share {w[clash].sum():.2e}")
        ess = effective_sample_size(lw[ok])
        print(f"without them: var(log w) {lw[ok].var():.2f}, ESS {ess:.4f}")
        for name, e in es.items():
            if e[ok].std() > 0:
                r = np.corrcoef(-e[ok], lw[ok])[0, 1]
                spread = f"std {e[ok].std():.2f} vs MD {em[name].std():.2f}"
                print(f"  {name}: r(-E, log w) {r:+.2f}, {spread}")
    else:
        ok = np.ones(len(x), bool)
    top = np.argsort(lw)[::-1][:10]
    log_q = -(lw + u)
    print(f"\nten largest weights: shares {np.round(w[top], 3).tolist()}")
    print(f"  u - median u:         {np.round(u[top] - np.median(u[ok]), 1).tolist()}")
    print(f"  log q - median log q: {np.round(log_q[top] - np.median(log_q[ok]), 1).tolist()}")


if __name__ == "__main__":
    main()
