"""Building blocks of the training pipeline (used by ``scripts/train.py``; no Hydra here).

* data: :func:`molecular_data` (cached OpenMM MD / replica exchange) and
  :func:`toy_data` (Metropolis on a toy energy), both split into train/val/test;
* models: :func:`molecular_generator` (internal coordinates + coupling flow on
  torsion-aware features) and :func:`toy_generator`;
* evaluation: :func:`evaluate_molecular` and :func:`evaluate_toy` return a metrics
  dict (ESS, test NLL, ΔF vs the reference, Ramachandran KL, finite fraction).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from . import cv as cvmod
from .coordinates import build_zmatrix, ic_transform
from .distributions import DiagonalNormal, NormalUniform
from .evaluation import (
    block_free_energy,
    generator_samples,
    ramachandran_kl,
    state_free_energy,
    state_masks,
)
from .flows import Sequential
from .generator import BoltzmannGenerator
from .reweighting import effective_sample_size, free_energy_difference

__all__ = [
    "DataSplit",
    "molecular_data",
    "toy_data",
    "molecular_generator",
    "toy_generator",
    "test_nll",
    "evaluate_molecular",
    "evaluate_toy",
]


@dataclass
class DataSplit:
    """Train/val/test configurations ``(n, dim)`` plus the full reference in time order."""

    train: Tensor
    val: Tensor
    test: Tensor
    reference: Tensor
    info: dict = field(default_factory=dict)


def molecular_data(
    system,
    md_settings: Mapping,
    data_dir: str | os.PathLike,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    stride: int = 1,
    n_workers: int | None = None,
    progress: bool = True,
    log: Callable | None = print,
) -> DataSplit:
    """MD data of ``system`` from the cache in ``data_dir`` (generated on a miss).

    Positions are float64 nm ``(n, n_atoms*3)``; ``reference`` holds all (strided)
    frames in time order for block-bootstrap reference values.
    """
    from .data import generate_or_load, load_dataset

    entry = generate_or_load(
        system, dict(md_settings), data_dir, n_workers=n_workers, progress=progress, log=log
    )
    ds = load_dataset(
        entry, fractions=tuple(fractions), seed=seed, stride=stride, dtype=torch.float64
    )
    info = {
        "cache_path": str(entry.path),
        "cache_key": entry.key,
        **dict(entry.meta.get("info", {})),
    }
    return DataSplit(ds.train, ds.val, ds.test, ds.positions, info)


def toy_data(
    energy,
    n_chains: int = 128,
    n_steps: int = 2000,
    step_size: float = 0.5,
    burn_in: int = 500,
    thin: int = 10,
    init_scale: float = 2.0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> DataSplit:
    """Metropolis samples of a toy energy, split reproducibly from ``seed``.

    Chains start from ``init_scale * N(0, 1)`` so that every basin can be reached.
    """
    from .data import split_indices
    from .sampling import metropolis

    g = torch.Generator().manual_seed(seed)
    x0 = init_scale * torch.randn(n_chains, energy.dim, generator=g, dtype=torch.float64)
    x, acc = metropolis(energy, x0, n_steps, step_size, thin=thin, burn_in=burn_in, seed=seed)
    tr, va, te = split_indices(x.shape[0], tuple(fractions), seed)
    return DataSplit(x[tr], x[va], x[te], x, {"acceptance": float(acc), "n_samples": x.shape[0]})


def molecular_generator(
    system,
    train_x: Tensor,
    flow_factory: Callable,
    energy=None,
    zmatrix=None,
    circular="auto",
) -> BoltzmannGenerator:
    """IC transform fitted to ``train_x`` + ``flow_factory(dim=, circular=)`` + prior.

    The prior is Gaussian on bonds, angles and narrow torsions and uniform on the
    other torsions (:class:`NormalUniform`), which stay angles through the circular
    couplings. ``circular`` chooses those torsions (see
    :func:`~bgflow_mini.coordinates.ic_transform`); a trained model's
    ``prior.circular`` buffer rebuilds the same architecture.
    """
    if zmatrix is None:
        zmatrix = build_zmatrix(system.mdtraj_topology, positions=system.positions)
    ic, circular = ic_transform(zmatrix, train_x, circular=circular)
    coupling = flow_factory(dim=ic.dim, circular=circular)
    prior = NormalUniform(ic.dim, circular)
    return BoltzmannGenerator(prior, Sequential(coupling, ic), energy)


def toy_generator(energy, train_x: Tensor, flow_factory: Callable) -> BoltzmannGenerator:
    """A learnable diagonal Gaussian prior at the data mean/std + ``flow_factory(dim=)``."""
    prior = DiagonalNormal(
        energy.dim, loc=train_x.mean(0).float(), scale=train_x.std(0).float(), learnable=True
    )
    return BoltzmannGenerator(prior, flow_factory(dim=energy.dim), energy)


@torch.no_grad()
def test_nll(generator, x: Tensor, batch_size: int = 4096) -> float:
    """Mean ``-log q(x)`` over ``x`` (evaluated in batches, model dtype/device)."""
    p = next(generator.parameters())
    total = 0.0
    for chunk in x.split(batch_size):
        total += float(-generator.log_prob(chunk.to(p.device, p.dtype)).sum())
    return total / x.shape[0]


def evaluate_molecular(
    generator,
    system,
    data: DataSplit,
    n_samples: int = 100_000,
    batch_size: int = 4096,
    state_a: str = "phi_negative",
    state_b: str = "phi_positive",
    bins: int = 64,
    n_bootstrap: int = 200,
    n_blocks: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Sample the generator and compare with the MD reference.

    Returns ``(metrics, samples)``; ``samples`` holds numpy ``x`` (nm), ``log_q``,
    ``u`` (kT) and ``log_w``. ΔF values are ``F_b - F_a`` in kT; the MD error is a
    block bootstrap over the time-ordered reference, the generator errors an
    i.i.d. bootstrap of the (self-normalised) weights.
    """
    generator.eval()
    x, log_q, u, log_w = generator_samples(generator, n_samples, batch_size, progress)
    finite = np.isfinite(u)
    cvs, states = system.cvs, system.states
    rw = state_free_energy(x, cvs, states, state_a, state_b, log_w, n_bootstrap, seed)
    raw = state_free_energy(x[finite], cvs, states, state_a, state_b, None, n_bootstrap, seed)
    ref = data.reference.numpy()
    names = sorted({n for s in (state_a, state_b) for n in states[s]})
    ref_cv = cvmod.compute_cvs(ref, cvs, names)
    a, b = state_masks(ref_cv, states, cvs, state_a, state_b)
    md_dF, md_err = block_free_energy(a, b, n_blocks=n_blocks, seed=seed)
    metrics = {
        "n_samples": int(n_samples),
        "ess": effective_sample_size(log_w),
        "finite_energy_fraction": float(finite.mean()),
        "test_nll": test_nll(generator, data.test),
        "dF_reweighted": rw["dF"],
        "dF_reweighted_stderr": rw["stderr"],
        "dF_unweighted": raw["dF"],
        "dF_unweighted_stderr": raw["stderr"],
        "dF_md": md_dF,
        "dF_md_stderr": md_err,
        "dF_error": rw["dF"] - md_dF,
        "n_state_b_samples": rw["n_b"],
        "states": [state_a, state_b],
    }
    if "phi" in cvs and "psi" in cvs:
        gen_cv = cvmod.compute_cvs(x, cvs, ["phi", "psi"])
        test_cv = cvmod.compute_cvs(data.test.numpy(), cvs, ["phi", "psi"])
        args = (test_cv["phi"], test_cv["psi"], gen_cv["phi"], gen_cv["psi"])
        metrics["ramachandran_kl"] = ramachandran_kl(*args, log_w=log_w, bins=bins)
        metrics["ramachandran_kl_unweighted"] = ramachandran_kl(
            *(v[finite] if i > 1 else v for i, v in enumerate(args)), bins=bins
        )
        # the same estimator between MD test and MD training frames: its finite-sample
        # floor (sparse bins), to read the generator's value against
        train_cv = cvmod.compute_cvs(data.train.numpy(), cvs, ["phi", "psi"])
        metrics["ramachandran_kl_md_train"] = ramachandran_kl(
            test_cv["phi"], test_cv["psi"], train_cv["phi"], train_cv["psi"], bins=bins
        )
        w_b = _state_weight(log_w, gen_cv, states[state_b], cvs)
        metrics["reweighted_population_b"] = w_b
    samples = {"x": x, "log_q": log_q, "u": u, "log_w": log_w}
    return metrics, samples


def _state_weight(log_w: np.ndarray, cv_values: Mapping, state: Mapping, cvs: Mapping) -> float:
    mask = np.asarray(cvmod.in_state(cv_values, state, cvs))
    lw = np.where(np.isfinite(log_w), log_w, -np.inf)
    w = np.exp(lw - lw.max())
    return float(w[mask].sum() / w.sum())


def evaluate_toy(
    generator,
    data: DataSplit,
    n_samples: int = 100_000,
    batch_size: int = 8192,
    n_bootstrap: int = 200,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict, dict]:
    """ESS, test NLL and ΔF(not A vs A) against the energy's exact quadrature value."""
    generator.eval()
    energy = generator.energy
    x, log_q, u, log_w = generator_samples(generator, n_samples, batch_size, progress)
    in_a = np.asarray(energy.in_state_a(x))
    dF, err = free_energy_difference(log_w, in_a, ~in_a, n_bootstrap=n_bootstrap, seed=seed)
    exact = float(energy.free_energy_difference())
    metrics = {
        "n_samples": int(n_samples),
        "ess": effective_sample_size(log_w),
        "finite_energy_fraction": float(np.isfinite(u).mean()),
        "test_nll": test_nll(generator, data.test),
        "dF_reweighted": dF,
        "dF_reweighted_stderr": err,
        "dF_exact": exact,
        "dF_error": dF - exact if math.isfinite(dF) else math.inf,
    }
    return metrics, {"x": x, "log_q": log_q, "u": u, "log_w": log_w}
