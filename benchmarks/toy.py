"""Benchmark: RNVP vs NICE Boltzmann generators on the double well and Müller–Brown.

For each flow kind, toy energy and seed: MCMC data (Metropolis / MALA, chains started in
both states), ML then ML + reverse-KL training with :class:`bgflow_mini.Trainer`, then
``--n-samples`` independent samples. Prints a markdown table with the normalised Kish ESS,
the reweighted ΔF = F_B - F_A against quadrature (value, error, bootstrap stderr), the
ESS upper bound of volume-preserving flows (:mod:`bgflow_mini.bounds`, NICE rows),
training wall time and steps/s, plus machine information and the command line.

    python benchmarks/toy.py                      # 3 seeds, a few minutes on 2 cores
    python benchmarks/toy.py --seeds 0 --kinds rnvp --systems mb --n-samples 500000
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import sys
from dataclasses import replace

import numpy as np
import torch
from _machine import cpu_model  # benchmarks/_machine.py

from bgflow_mini.bounds import volume_preserving_ess_bound
from bgflow_mini.energies import DoubleWell, MuellerBrown
from bgflow_mini.reweighting import effective_sample_size, free_energy_difference
from bgflow_mini.toy_recipes import RECIPES, Recipe, train_toy

__all__ = ["run_case", "main"]

BOXES = {"dw": [(-3.5, 3.5), (-7.0, 7.0)], "mb": [(-3.5, 2.5), (-2.5, 3.5)]}
NAMES = {"dw": "double well", "mb": "Müller–Brown"}


def run_case(kind: str, system: str, seed: int, recipe: Recipe, n_samples: int) -> dict:
    """Train one generator (``bgflow_mini.toy_recipes``) and evaluate it."""
    run = train_toy(kind, system, n_samples, seed=seed, data_seed=seed + 11, recipe=recipe)
    a = run.in_a(run.x)
    df, err = free_energy_difference(run.log_w, a, ~a, n_bootstrap=200, seed=seed)
    return {
        "ess": effective_sample_size(run.log_w),
        "df": df,
        "exact": run.energy.free_energy_difference(),
        "err": err,
        "train_s": run.train_seconds,
        "steps": recipe.ml_steps + recipe.kl_steps,
        "skipped": run.trainer.n_skipped,
    }


def _bound(system: str) -> float:
    energy = DoubleWell() if system == "dw" else MuellerBrown()

    def log_density(x: np.ndarray) -> np.ndarray:
        return -energy(torch.as_tensor(x, dtype=torch.float64)).numpy()

    return volume_preserving_ess_bound(log_density, BOXES[system], 601)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", default=["rnvp", "nice"], choices=["rnvp", "nice"])
    parser.add_argument("--systems", nargs="+", default=["dw", "mb"], choices=["dw", "mb"])
    parser.add_argument("--n-samples", type=int, default=200_000)
    parser.add_argument("--ml-steps", type=int, default=None, help="override the recipes")
    parser.add_argument("--kl-steps", type=int, default=None, help="override the recipes")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    recipes = {}
    for key, r in RECIPES.items():
        if args.ml_steps is not None:
            r = replace(r, ml_steps=args.ml_steps)
        if args.kl_steps is not None:
            r = replace(r, kl_steps=args.kl_steps)
        recipes[key] = r

    cmd = " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv])
    print("## Toy-system benchmark (bgflow_mini)\n")
    print(f"- command: `{cmd}`")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores")
    print(f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    print(f"- load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for (kind, system), r in recipes.items():
        if kind not in args.kinds or system not in args.systems:
            continue
        print(
            f"- {kind.upper()} {NAMES[system]}: {r.n_blocks} blocks, hidden {r.hidden}, "
            f"lr {r.lr:g} (cosine to 1e-5), {r.ml_steps} ML steps + {r.kl_steps} steps of "
            f"{r.w_ml_in_kl:g} ML + {r.w_kl:g} KL, batch {r.batch_size} / KL batch "
            f"{r.kl_batch_size}, learnable {'isotropic' if r.iso_prior else 'diagonal'} prior"
        )
    print(f"- {args.n_samples} samples per model; stderr: bootstrap (200)\n")

    bounds = {s: _bound(s) for s in args.systems}
    print(
        "| system | flow | seed | ESS | VP bound | ΔF (kT) | exact | error | stderr "
        "| train (s) | steps/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows: dict[tuple[str, str], list[dict]] = {}
    for system in args.systems:
        for kind in args.kinds:
            for seed in args.seeds:
                res = run_case(kind, system, seed, recipes[kind, system], args.n_samples)
                rows.setdefault((system, kind), []).append(res)
                bound = f"{bounds[system]:.3f}" if kind == "nice" else "–"
                print(
                    f"| {NAMES[system]} | {kind.upper()} | {seed} | {res['ess']:.3f} | {bound} "
                    f"| {res['df']:.3f} | {res['exact']:.3f} | {res['df'] - res['exact']:+.3f} "
                    f"| {res['err']:.3f} | {res['train_s']:.1f} "
                    f"| {res['steps'] / res['train_s']:.0f} |",
                    flush=True,
                )
    print(
        "\nVP bound: the largest asymptotic ESS (1/E_q[w^2]) any volume-preserving flow "
        "(NICE) on a Gaussian prior can reach (bgflow_mini.bounds); the Kish ESS of a "
        "finite sample can exceed it, as the bound is set by regions of tiny probability."
    )
    print("\nSummary over seeds (mean ± std, worst):\n")
    print("| system | flow | ESS | min ESS | max abs(error) (kT) | train (s) |")
    print("|---|---|---|---|---|---|")
    for (system, kind), res in rows.items():
        ess = np.array([r["ess"] for r in res])
        errs = np.array([abs(r["df"] - r["exact"]) for r in res])
        t = np.array([r["train_s"] for r in res])
        print(
            f"| {NAMES[system]} | {kind.upper()} | {ess.mean():.3f} ± {ess.std():.3f} "
            f"| {ess.min():.3f} | {errs.max():.3f} | {t.mean():.1f} |"
        )
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    print(f"\nload average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
