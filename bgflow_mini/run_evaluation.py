"""Evaluation of a trained generator against its target's reference (no Hydra).

:func:`evaluate` samples the generator, weights the samples with the real energy and
compares with the reference: the exact ΔF of a toy, or the target's MD (block bootstrap
over one or several independent runs, :class:`~bgflow_mini.md_reference.MDReference`). It
returns the metrics of ``metrics.json`` (ESS, test NLL, ΔF of every state pair, state
populations, Ramachandran KL, chirality, ring bonds, finite and capped energies).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from . import cv as cvmod
from . import free_energy as fe
from .ais import annealed_importance_sampling
from .ais import settings as ais_settings
from .coordinates import InternalCoordinates
from .evaluation import generator_samples, largest_weights, ramachandran_kl
from .pareto import pareto_k
from .reweighting import block_ess, effective_sample_size
from .weight_drivers import energy_slope, weight_drivers

if TYPE_CHECKING:
    from .pipeline import DataSplit

__all__ = ["evaluate", "test_nll", "ic_domain_stats"]


@torch.no_grad()
def test_nll(generator, x: Tensor, batch_size: int = 4096) -> float:
    """Mean ``-log q(x)`` over ``x`` (evaluated in batches, model dtype/device)."""
    p = next(generator.parameters())
    total = 0.0
    for chunk in x.split(batch_size):
        total += float(-generator.log_prob(chunk.to(p.device, p.dtype)).sum())
    return total / x.shape[0]


def _ic_layers(generator) -> list[InternalCoordinates]:
    return [m for m in generator.modules() if isinstance(m, InternalCoordinates)]


def ic_domain_stats(generator, reset: bool = False) -> dict[str, int]:
    """Rows given to the generator's internal-coordinate layers and rows with a bond
    <= 0 or an angle outside (0, pi) among them (all zero for toy generators)."""
    out = {"evaluated": 0, "out_of_domain": 0}
    for layer in _ic_layers(generator):
        for k, v in layer.domain_stats.items():
            out[k] += int(v)
        if reset:
            layer.reset_domain_stats()
    return out


def evaluate(
    generator,
    target,
    data: DataSplit,
    energy: Callable | None = None,
    n_samples: int = 100_000,
    batch_size: int = 4096,
    state_a: str | None = None,
    state_b: str | None = None,
    bins: int = 64,
    n_bootstrap: int = 200,
    n_blocks: int = 20,
    cap: float | None = None,
    seed: int = 0,
    progress: bool = True,
    shards: int | None = None,
    ais: Mapping | None = None,
) -> tuple[dict, dict]:
    """Sample the generator, weight the samples with ``energy`` and compare with the
    reference: the exact ΔF of a toy, or the target's MD (block bootstrap).

    Arguments:
        generator, target, data: the model, its :class:`~bgflow_mini.targets.Target` and
            the data it was trained on (test frames for NLL and Ramachandran KL).
        energy: the real target energy (kT) for the weights; default the generator's.
            Pass the unregularised one: weights of a LinLogCut energy are not the
            Boltzmann weights.
        state_a, state_b: ΔF = F_b - F_a in kT (default: the target's default states).
        cap: count sample energies above this (kT), e.g. the regularisation threshold.
        seed, shards: the samples' random streams (see
            :func:`~bgflow_mini.evaluation.generator_samples`); under ``torchrun`` every
            process draws its shards and computes the metrics on the union.
        ais: ``{"steps": K, "leapfrog": L, "target_acceptance": a}`` with ``K >= 1``: the
            samples are annealed importance samples (:mod:`bgflow_mini.ais`, torch's
            global RNG seeded with ``seed``; one process) and ``metrics["sampler"]`` holds
            the sampler's settings and acceptance; ``log_q`` is then ``-u - log_w``.

    Metrics besides ESS, NLL and the main ΔF (all free energies in kT):

    * ``ess_blocks``: the ESS of 5 disjoint blocks of the samples (min / median / max);
    * ``pareto_k``: the Pareto shape of the largest weights (:mod:`bgflow_mini.pareto`;
      above 0.7 the ESS and reweighted free energies of this set are unreliable);
    * ``largest_weights``: the 5 largest weights, their share, energy and CV values
      (:func:`~bgflow_mini.evaluation.largest_weights`): where the flow is too thin;
    * ``energy_slope``: the line of ``log w`` on ``u`` and the temperature (relative to
      the target's) it makes the generator resemble
      (:func:`~bgflow_mini.weight_drivers.energy_slope`): above 1, too hot;
    * ``state_populations``: per state the raw and reweighted fraction of samples, its
      share of the squared weights (``weight2_share``) and the ESS/n of its own samples
      (``ess_within``): which state holds the ESS down, and whether by its weight or
      by its shape;
    * ``state_delta_f``: for every pair of states ``<cv>_negative`` / ``<cv>_positive``
      (e.g. each residue's phi > 0 state), ``{cv: {"state_a", "state_b",
      "dF_reweighted", "stderr", "dF_reference", "reference_stderr", "reference_kind",
      "error"}}`` computed like the main ΔF;
    * Ramachandran KL (:func:`~bgflow_mini.evaluation.ramachandran_kl`, MD test frames
      vs samples) for every pair from :func:`bgflow_mini.cv.ramachandran_pairs`:
      ``ramachandran_kl_<k>``, ``ramachandran_kl_unweighted_<k>`` and the MD-train
      floor ``ramachandran_kl_md_train_<k>`` for residue ``k``; the unsuffixed keys
      hold the plain ``phi``/``psi`` pair when there is one, else the mean over the
      residues (``ramachandran_kl_kind`` says which);
    * ``chirality_kept_fraction`` (molecules with chiral alpha carbons): fraction of
      samples in which every alpha carbon keeps the hand of the target's reference
      structure (:mod:`bgflow_mini.chirality`), with ``..._per_centre`` and the share
      of the importance weight on such samples (``..._reweighted``);
    * ``weight_drivers`` (molecules): the Z-matrix bonds, angles and torsions along
      which ``log w`` varies most (binned R^2, :mod:`bgflow_mini.weight_drivers`), over
      all samples and inside each state that carries >= 10 % of the squared weights;
    * ``ring_bonds`` (molecules with rings): every ring bond's length distribution in
      the finite-energy samples against the MD test frames
      (:func:`~bgflow_mini.ring_geometry.ring_bond_stats`: ``max_std_ratio``,
      ``max_mean_rel_error``, per bond mean/std/fraction more than 5 % off).

    States are checked against the CVs before sampling: a state on an undefined CV
    raises ``KeyError``. Returns ``(metrics, samples)``; ``samples`` holds numpy ``x``,
    ``log_q``, ``u`` (kT) and ``log_w``. Generator errors are i.i.d. bootstrap errors of
    the weights.
    """
    generator.eval()
    energy = generator.energy if energy is None else energy
    cvs, states = target.cvs, target.states
    default_a, default_b = target.default_states
    state_a, state_b = state_a or default_a, state_b or default_b
    fe.check_state_names([state_a, state_b], states)
    needed = _needed_cvs(cvs, states)  # KeyError now, not after sampling
    ic_domain_stats(generator, reset=True)
    sampler, ais = None, ais_settings(ais)
    if ais is not None:
        x, log_q, u, log_w, sampler = _ais_samples(
            generator, energy, n_samples, batch_size, ais, seed, progress
        )
    else:
        x, log_q, u, log_w = generator_samples(
            generator, n_samples, batch_size, progress, energy, seed=seed, shards=shards
        )
    domain = ic_domain_stats(generator)
    finite = np.isfinite(u)
    values = cvmod.compute_cvs(x, cvs, needed)
    ref_values = None
    pairs = [(state_a, state_b), *fe.sign_state_pairs(states).values()]
    if any(target.reference_delta_f(a, b) is None for a, b in pairs):
        ref_values = _md_references(data, cvs, needed)
    args = (states, cvs, state_a, state_b)
    rw = fe.state_delta_f(values, *args, log_w, n_bootstrap, seed)
    raw = fe.state_delta_f({k: v[finite] for k, v in values.items()}, *args, None, n_bootstrap)
    ref, ref_err, ref_kind, ref_extra = _reference_delta_f(
        target, ref_values, states, cvs, state_a, state_b, n_blocks, n_bootstrap, seed
    )
    metrics = {
        "n_samples": int(n_samples),
        "ess": effective_sample_size(log_w),
        "ess_blocks": block_ess(log_w, 5) if len(log_w) >= 5 else None,
        "pareto_k": pareto_k(log_w)["k"],
        "largest_weights": largest_weights(log_w, u, values, cvs, k=5),
        "energy_slope": energy_slope(log_w, u),
        "finite_energy_fraction": float(finite.mean()),
        "n_nonfinite_energies": int((~finite).sum()),
        "test_nll": test_nll(generator, data.test),
        "state_a": state_a,
        "state_b": state_b,
        "dF_reweighted": rw["dF"],
        "dF_reweighted_stderr": rw["stderr"],
        "dF_unweighted": raw["dF"],
        "dF_unweighted_stderr": raw["stderr"],
        "dF_reference": ref,
        "dF_reference_stderr": ref_err,
        "dF_reference_kind": ref_kind,
        **ref_extra,
        "dF_error": rw["dF"] - ref if math.isfinite(rw["dF"]) else math.inf,
        "state_populations": _populations(values, states, cvs, log_w, finite),
        "state_delta_f": _state_delta_fs(
            target, values, ref_values, log_w, n_blocks, n_bootstrap, seed
        ),
    }
    if sampler is not None:
        metrics["sampler"] = sampler
    if cap is not None:
        metrics["n_energies_above_cap"] = int((u[finite] > cap).sum())
        metrics["energy_cap"] = float(cap)
    if domain["evaluated"]:
        metrics["ic_out_of_domain_fraction"] = domain["out_of_domain"] / domain["evaluated"]
    metrics.update(_ramachandran(values, log_w, finite, data, cvs, bins))
    metrics.update(_chirality(target, x, log_w))
    metrics.update(_weight_drivers(generator, target, x, log_w, values, states, cvs))
    topology = getattr(target, "topology", None)
    if topology is not None:
        from .ring_geometry import ring_bond_stats

        rings = ring_bond_stats(x, data.test.numpy(), topology, finite)
        if rings:
            metrics["ring_bonds"] = rings
    return metrics, {"x": x, "log_q": log_q, "u": u, "log_w": log_w}


def _ais_samples(generator, energy, n: int, batch_size: int, ais: Mapping, seed, progress):
    """Numpy ``(x, log_q, u, log_w)`` of ``n`` AIS samples and the sampler's summary."""
    torch.manual_seed(int(seed))
    res = annealed_importance_sampling(
        generator, int(n), batch_size=int(batch_size), energy=energy, progress=progress, **ais
    )
    x = res.x.detach().cpu().double().numpy()
    u = res.u.detach().cpu().double().numpy()
    log_w = res.log_w.detach().cpu().numpy()
    log_w = np.where(np.isfinite(u), log_w, -np.inf)
    return x, -u - log_w, u, log_w, res.summary()


def _needed_cvs(cvs: Mapping, states: Mapping) -> list[str]:
    """Every CV that a state or a Ramachandran pair uses (``KeyError`` for an undefined one)."""
    names = dict.fromkeys(cvmod.state_cvs(states, cvs))
    for _, phi, psi in cvmod.ramachandran_pairs(cvs):
        names.update(dict.fromkeys((phi, psi)))
    return list(names)


def _md_references(data: DataSplit, cvs: Mapping, needed: list[str]) -> list[tuple]:
    """MD references ``(kind, cv values, log weights, n_series)``, the main one first:
    ``"md_mbar"`` (every frame of the pooled replicas, MBAR-weighted) when the data has a
    replica pool, else ``"md"``; then ``"md"`` (the target temperature's frames) after
    ``"md_mbar"``; with several independent runs pooled, each run's own as
    ``"<kind>_run<i>"`` (run 0: the run's own MD; seeds in ``info["md_reference"]``)."""
    ref = data.md_reference
    if ref is None:
        return [("md", cvmod.compute_cvs(data.reference.numpy(), cvs, needed), None, 1)]
    # the first series are the target temperature's: one CV computation for all
    values = cvmod.compute_cvs(ref.positions, cvs, needed)
    out = [(ref.kind, values, ref.log_w, ref.n_series)]
    if ref.n_replicas > 1:
        target_only = {name: v[: ref.n_target] for name, v in values.items()}
        out.append(("md", target_only, None, ref.n_runs))
    if ref.n_runs > 1:
        for r in range(ref.n_runs):
            idx = ref.run_frames(r)
            lw = None if ref.log_w is None else ref.log_w[idx]
            one = {name: v[idx] for name, v in values.items()}
            out.append((f"{ref.kind}_run{r}", one, lw, ref.n_replicas))
    return out


def _reference_delta_f(
    target, refs, states, cvs, state_a, state_b, n_blocks, n_bootstrap, seed
) -> tuple[float, float, str, dict]:
    """``(dF, stderr, kind, extra)``: the target's exact ΔF, else that of the main MD
    reference (:func:`_md_references`); ``extra`` holds the others as
    ``dF_reference_<kind>`` and ``dF_reference_<kind>_stderr``."""
    exact = target.reference_delta_f(state_a, state_b)
    if exact is not None:
        return float(exact), 0.0, "exact", {}
    out = []
    for kind, values, lw, n_series in refs:
        md = fe.md_delta_f(
            values, states, cvs, state_a, state_b, n_blocks, n_bootstrap, seed, lw, n_series
        )
        out.append((md["dF"], md["stderr"], kind))
    extra = {}
    for dF, err, kind in out[1:]:
        extra[f"dF_reference_{kind}"], extra[f"dF_reference_{kind}_stderr"] = dF, err
    return (*out[0], extra)


def _state_delta_fs(target, values, ref_values, log_w, n_blocks, n_bootstrap, seed) -> dict:
    """Reweighted and reference ΔF of every ``<cv>_negative`` / ``<cv>_positive`` pair.

    A pair whose states overlap (ΔF undefined) gets ``{"state_a", "state_b", "skipped"}``
    instead of failing the whole evaluation.
    """
    cvs, states = target.cvs, target.states
    out = {}
    for name, (a, b) in fe.sign_state_pairs(states).items():
        try:
            rw = fe.state_delta_f(values, states, cvs, a, b, log_w, n_bootstrap, seed)
            ref, ref_err, kind, extra = _reference_delta_f(
                target, ref_values, states, cvs, a, b, n_blocks, n_bootstrap, seed
            )
        except ValueError as err:
            out[name] = {"state_a": a, "state_b": b, "skipped": str(err)}
            continue
        out[name] = {
            "state_a": a,
            "state_b": b,
            "dF_reweighted": rw["dF"],
            "stderr": rw["stderr"],
            "dF_reference": ref,
            "reference_stderr": ref_err,
            "reference_kind": kind,
            **{k.replace("dF_reference", "reference"): v for k, v in extra.items()},
            "error": rw["dF"] - ref if math.isfinite(rw["dF"]) else math.inf,
        }
    return out


def _populations(values, states, cvs, log_w, finite) -> dict[str, dict[str, float]]:
    """Per state: the raw (finite-energy samples) and reweighted fraction of samples, the
    state's share of the squared weights and the ESS/n of its own samples' weights.

    ``weight2_share`` = sum_S w^2 / sum w^2 says how much of ``1 / ESS`` the state's
    samples make (a state with a larger share than its reweighted population is where the
    flow is too thin); ``ess_within`` = Kish ESS / n_S of the weights of the n_S samples
    in the state (1 when the flow's density inside the state is proportional to the
    target's; NaN for an empty state): a low value with a matching population means the
    shape inside the state is off, not its weight. Over disjoint states covering the samples,
    ``1 / ESS = sum_S p_S^2 / (q_S ess_within_S)`` with p the reweighted population and q_S =
    n_S / n over all n samples (non-finite ones have zero weight); ``raw`` counts the
    finite-energy samples only, so it differs from q_S by the non-finite share.
    """
    lw = np.asarray(log_w, dtype=np.float64)
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    w = np.exp(lw - lw.max()) if np.isfinite(lw).any() else np.zeros_like(lw)
    w_sum, w2_sum = w.sum(), np.square(w).sum()
    out = {}
    for name, state in states.items():
        m = np.asarray(cvmod.in_state(values, state, cvs))
        raw = float(m[finite].mean()) if finite.any() else math.nan
        out[name] = {
            "raw": raw,
            "reweighted": float(w[m].sum() / w_sum) if w_sum else 0.0,
            "weight2_share": float(np.square(w[m]).sum() / w2_sum) if w2_sum else 0.0,
            "ess_within": effective_sample_size(lw[m]) if m.any() else math.nan,
        }
    return out


def _ramachandran(values, log_w, finite, data: DataSplit, cvs, bins: int) -> dict:
    """Forward KL of the MD test (phi, psi) histogram vs the samples, and its floor, for
    every Ramachandran pair (keys in :func:`evaluate`); empty without a pair."""
    pairs = cvmod.ramachandran_pairs(cvs)
    if not pairs:
        return {}
    names = [n for _, phi, psi in pairs for n in (phi, psi)]
    test = cvmod.compute_cvs(data.test.numpy(), cvs, names)
    train = cvmod.compute_cvs(data.train.numpy(), cvs, names)
    kinds = ("", "_unweighted", "_md_train")
    per: dict[str, dict[str, float]] = {}
    for res, phi, psi in pairs:
        ref = (test[phi], test[psi])
        per[res] = {
            "": ramachandran_kl(*ref, values[phi], values[psi], log_w, bins),
            "_unweighted": ramachandran_kl(
                *ref, values[phi][finite], values[psi][finite], bins=bins
            ),
            # the same estimator between MD test and MD training frames: its finite-sample
            # floor (sparse bins), to read the generator's value against
            "_md_train": ramachandran_kl(*ref, train[phi], train[psi], bins=bins),
        }
    out: dict = {"ramachandran_residues": [r for r in per if r]}
    for res, kl in per.items():
        if res:
            out.update({f"ramachandran_kl{k}_{res}": kl[k] for k in kinds})
    if "" in per:
        out.update({f"ramachandran_kl{k}": per[""][k] for k in kinds})
        out["ramachandran_kl_kind"] = "phi, psi"
    else:
        for k in kinds:
            out[f"ramachandran_kl{k}"] = float(np.mean([p[k] for p in per.values()]))
        out["ramachandran_kl_kind"] = "mean over residues " + ", ".join(per)
    return out


def _chirality(target, x: np.ndarray, log_w: np.ndarray) -> dict:
    """Chirality metrics of molecular targets (see :func:`evaluate`); empty for others."""
    system = getattr(target, "system", None)
    topology = getattr(target, "topology", None)
    if topology is None or getattr(system, "positions", None) is None:
        return {}
    from . import chirality

    centres = chirality.chiral_centres(topology)
    if not centres:
        return {"chirality_n_centres": 0}
    ref = chirality.reference_signs(system.positions, centres)
    same = chirality.kept_mask(x, centres, ref)
    kept = same.all(axis=1)
    lw = np.where(np.isfinite(log_w), log_w, -np.inf)
    w = np.exp(lw - lw.max()) if np.isfinite(lw).any() else np.zeros_like(lw)
    return {
        "chirality_n_centres": len(centres),
        "chirality_kept_fraction": float(kept.mean()),
        "chirality_kept_fraction_reweighted": float(w[kept].sum() / w.sum()) if w.sum() else 0.0,
        "chirality_kept_fraction_per_centre": {
            c.residue: float(f) for c, f in zip(centres, same.mean(axis=0))
        },
    }


def _weight_drivers(generator, target, x, log_w, values, states, cvs) -> dict:
    """``weight_drivers`` of molecular targets (see :func:`evaluate`); empty for others."""
    rows = (getattr(generator, "spec", None) or {}).get("zmatrix")
    topology = getattr(target, "topology", None)
    if rows is None or topology is None:
        return {}
    names = [f"{a.residue.name}{a.residue.resSeq}:{a.name}" for a in topology.atoms]
    masks = {s: np.asarray(cvmod.in_state(values, st, cvs)) for s, st in states.items()}
    return {"weight_drivers": weight_drivers(x, log_w, rows, names, masks=masks)}
