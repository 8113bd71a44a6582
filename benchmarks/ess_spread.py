"""How much one ESS figure varies: fresh sample sets of trained molecular models.

For every run folder given (its ``model.pt``), draws ``--draws`` independent sets of ``--n``
samples at each latent temperature ``--temperatures`` (``log q`` is that of the tempered
model, so the weights stay exact), weights them with ``TorchForceField`` (float32, the run's
own system), and prints one row per model and temperature with the normalised Kish ESS of
every set and the median over the sets of the generator's temperature relative to the
target's, from the line of ``log w`` on ``u`` (:func:`bgflow_mini.weight_drivers.energy_slope`;
above 1: too hot). With heavy-tailed weights the ESS of one set is a noisy statistic. With
``--symmetrize`` each model is also measured as the mixture over its side-chain flips
(:func:`bgflow_mini.symmetry.symmetrize`; a row per variant, ``sym`` marks the mixture).
With ``--ais-steps K`` every set is also drawn by annealed importance sampling
(:mod:`bgflow_mini.ais`, K HMC steps per sample, step sizes tuned once per model; a row
marked ``AIS K``), the exact weights of the final points. With ``--weights saved ema
best_ess`` each run is measured with each of those weights of its training checkpoint
(:func:`bgflow_mini.load_generator`'s ``weights``; ``saved`` is ``model.pt``, what
``training.select`` chose), on the same seeded latent draws.

Usage::

    python benchmarks/ess_spread.py outputs/run_a outputs/run_b --temperatures 1.0 1.1
    python benchmarks/ess_spread.py outputs/phe_run --temperatures 1.0 --symmetrize
    python benchmarks/ess_spread.py outputs/ala4_run --temperatures 1.0 --ais-steps 16
    python benchmarks/ess_spread.py outputs/phe_run --temperatures 1.0 --weights ema best_ess
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import statistics
from pathlib import Path

import torch
from _machine import cpu_model  # benchmarks/_machine.py

from bgflow_mini import load_generator
from bgflow_mini.checkpoint import WEIGHTS
from bgflow_mini.energies import TorchForceField
from bgflow_mini.pareto import pareto_k
from bgflow_mini.reweighting import effective_sample_size
from bgflow_mini.systems import load_system
from bgflow_mini.weight_drivers import energy_slope

__all__ = ["main", "spread"]


def spread(
    run: Path,
    temperature: float,
    draws: int,
    n: int,
    symmetrized: bool = False,
    ais_steps: int = 0,
    weights: str = "saved",
) -> list[tuple[float, float, float]]:
    """``(ESS/N, Pareto k, generator temperature / target's)`` of ``draws`` fresh sets of
    ``n`` samples of ``run``'s model at ``temperature`` (with ``symmetrized``, of the
    model's mixture over its side-chain flips; with ``ais_steps``, annealed importance
    samples at temperature 1; ``weights``: which weights of the run, see
    :func:`bgflow_mini.load_generator`)."""
    from bgflow_mini.ais import annealed_importance_sampling, tune_step_sizes
    from bgflow_mini.symmetry import symmetrize

    gen = load_generator(run / "model.pt" if weights == "saved" else run, weights=weights)
    name = gen.spec["target"]["name"]
    system = load_system(name)
    if symmetrized:
        gen = symmetrize(gen, system.mdtraj_topology)
    gen.energy = TorchForceField.from_openmm(system).float()
    out = []
    if ais_steps:
        torch.manual_seed(10_000)
        eps = tune_step_sizes(gen, steps=ais_steps)
    for draw in range(draws):
        torch.manual_seed(draw)
        if ais_steps:
            res = annealed_importance_sampling(gen, n, steps=ais_steps, step_sizes=eps)
            log_w, u = res.log_w, res.u
        else:
            _, log_q, u = gen.sample_weighted(n, batch_size=4096, temperature=temperature)
            log_w = (-u - log_q).double()
        ratio = energy_slope(log_w, u.double())["temperature_ratio"]
        out.append((effective_sample_size(log_w), pareto_k(log_w)["k"], ratio))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders with a model.pt")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 1.1])
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--symmetrize", action="store_true", help="also the mixture over flips")
    ap.add_argument("--ais-steps", type=int, default=0, help="also AIS sets with K steps")
    ap.add_argument(
        "--weights",
        nargs="+",
        default=["saved"],
        choices=WEIGHTS,
        help="which weights of each run (saved: model.pt; others: checkpoints/latest.pt)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    print(f"## ESS of fresh sample sets ({datetime.date.today()}, {cpu_model()})\n")
    print(f"{args.draws} sets of {args.n:,} samples per model and latent temperature\n")
    print("| run | T | ESS of each set | min | median | Pareto k of each set | T_q / T |")
    print("| --- | ---: | --- | ---: | ---: | --- | ---: |")
    variants = (
        [(False, 0)]
        + [(True, 0)] * args.symmetrize
        + [(False, args.ais_steps)] * (args.ais_steps > 0)
    )
    for run in args.runs:
        for t, (sym, ais), w in itertools.product(args.temperatures, variants, args.weights):
            if ais and t != 1.0:
                continue
            sets = spread(run, t, args.draws, args.n, sym, ais, weights=w)
            ess = [e for e, _, _ in sets]
            each = " / ".join(f"{e:.4f}" for e in ess)
            ks = " / ".join(f"{k:.2f}" for _, k, _ in sets)
            tq = statistics.median(r for _, _, r in sets)
            med = statistics.median(ess)
            name = f"{run.name}{' (sym)' if sym else ''}{f' (AIS {ais})' if ais else ''}"
            name += f" ({w} weights)" if w != "saved" else ""
            row = f"| {name} | {t:g} | {each} | {min(ess):.4f} | {med:.4f} | {ks} | {tq:.3f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
