"""Building blocks of the training pipeline (used by :mod:`bgflow_mini.targets`; no Hydra).

* data: :func:`molecular_data` (cached OpenMM MD / replica exchange) and
  :func:`toy_data` (Metropolis on a toy energy), split into train/val/test in
  contiguous blocks of time;
* models: :func:`molecular_generator` (internal coordinates + coupling flow on
  torsion-aware features) and :func:`toy_generator`, each with a ``spec`` from which
  :func:`bgflow_mini.checkpoint.load_generator` rebuilds it;
* evaluation: :func:`evaluate` returns a metrics dict (ESS, test NLL, ΔF vs the
  reference, state populations, Ramachandran KL, finite and capped energies) computed
  with the real (unregularised) energy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from . import cv as cvmod
from . import free_energy as fe
from .coordinates import InternalCoordinates, build_zmatrix, ic_transform
from .distributions import DiagonalNormal, NormalUniform
from .evaluation import generator_samples, largest_weights, ramachandran_kl
from .flows import Sequential
from .generator import BoltzmannGenerator
from .md_reference import MDReference, load_reference, pool_runs
from .reweighting import block_ess, effective_sample_size

__all__ = [
    "DataSplit",
    "molecular_data",
    "toy_data",
    "molecular_generator",
    "toy_generator",
    "test_nll",
    "evaluate",
    "ic_domain_stats",
]


@dataclass
class DataSplit:
    """Train/val/test configurations ``(n, dim)`` plus the full reference in time order.

    ``pool`` / ``pool_log_weights`` (``replicas > 1`` in :func:`molecular_data`): the
    frames the maximum-likelihood term draws from instead of ``train`` (several
    temperatures' training-time frames) and their log weights ``(n_pool,)``;
    ``md_reference`` (molecules): the evaluation's MD reference
    (:class:`~bgflow_mini.md_reference.MDReference`): ``reference`` itself, or with a
    replica pool every frame of those temperatures MBAR-weighted to the target temperature
    (``"md_mbar"``), pooled with further independent MD runs where asked
    (``reference_seeds``). None: ``reference`` alone (toys).
    """

    train: Tensor
    val: Tensor
    test: Tensor
    reference: Tensor
    info: dict = field(default_factory=dict)
    pool: Tensor | None = None
    pool_log_weights: Tensor | None = None
    md_reference: MDReference | None = None

    def ml_data(self) -> tuple[Tensor, Tensor | None]:
        """The maximum-likelihood rows and their draw weights (None: uniform draws)."""
        if self.pool is None:
            return self.train, None
        return self.pool, torch.exp(self.pool_log_weights - self.pool_log_weights.max())


def molecular_data(
    system,
    md_settings: Mapping,
    data_dir: str | os.PathLike,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    stride: int = 1,
    n_workers: int | None = None,
    progress: bool = True,
    log: Callable | None = print,
    replicas: int = 1,
    replica_weights: str = "mbar",
    reference_seeds: Sequence[int] = (),
) -> DataSplit:
    """MD data of ``system`` from the cache in ``data_dir`` (generated on a miss).

    Positions are float64 nm ``(n, n_atoms*3)``. The frames at the target temperature
    form one time series (replica exchange swaps configurations into it); train,
    validation and test are its first, middle and last contiguous blocks, so the
    test frames are not near-copies of training frames. ``reference`` holds all
    (strided) frames in time order for block-bootstrap reference values.

    ``replicas = k > 1`` (replica exchange with ``keep_replicas >= k``) also pools the
    training-time frames of the ``k`` lowest temperatures for the maximum-likelihood term,
    weighted by ``replica_weights`` (:func:`bgflow_mini.replica_pool.pool_log_weights`);
    ``info["replica_pool"]`` records the pool's size, Kish effective size and the weight
    share of each temperature. Validation, test and ``reference`` stay target-temperature
    frames; ``md_reference`` adds every frame of the pooled temperatures with MBAR
    weights for the target temperature (the evaluation's ``"md_mbar"`` reference).

    ``reference_seeds``: ``md.seed`` values of further independent MD runs with the same
    settings (generated or found in the cache, after this run's own), pooled with it into
    ``md_reference`` (:func:`~bgflow_mini.md_reference.pool_runs`) for a reference with a
    smaller error; training data stays this run's. ``info["md_reference"]`` lists the runs.
    """
    from .data import generate_or_load, load_dataset
    from .md import MD_DEFAULTS
    from .replica_pool import WEIGHTINGS, kish_size, pool_log_weights, series_log_weights

    if replica_weights not in WEIGHTINGS:  # before any MD
        raise ValueError(
            f"replica_weights must be one of {list(WEIGHTINGS)}, got {replica_weights!r}"
        )
    own_seed = int(md_settings.get("seed", MD_DEFAULTS["seed"]))
    seeds = [int(x) for x in reference_seeds]
    if own_seed in seeds or len(set(seeds)) < len(seeds):
        raise ValueError(
            f"reference seeds {seeds} must differ from each other and from this run's md.seed "
            f"({own_seed}): a run pooled with itself would understate the reference's error"
        )
    entry = generate_or_load(
        system, dict(md_settings), data_dir, n_workers=n_workers, progress=progress, log=log
    )
    ds = load_dataset(
        entry, fractions=tuple(fractions), stride=stride, dtype=torch.float64, replicas=replicas
    )
    info = {
        "cache_path": str(entry.path),
        "cache_key": entry.key,
        "split": "contiguous time blocks (train, val, test)",
        **dict(entry.meta.get("info", {})),
    }
    split = DataSplit(ds.train, ds.val, ds.test, ds.positions, info)
    own = MDReference(ds.positions.numpy(), str(entry.traj_path))
    if ds.pool is not None:
        lw = pool_log_weights(ds.pool_energies, ds.pool_replica, ds.temperatures, replica_weights)
        w = np.exp(lw)
        info["replica_pool"] = {
            "replicas": int(replicas),
            "weighting": replica_weights,
            "temperatures": ds.temperatures.tolist(),
            "n_frames": int(len(lw)),
            "target_frames": int(ds.train.shape[0]),
            "kish_frames": kish_size(lw),
            "weight_share": [float(w[ds.pool_replica == r].sum()) for r in range(replicas)],
        }
        split.pool, split.pool_log_weights = ds.pool, torch.as_tensor(lw)
        ref_lw = series_log_weights(ds.replica_energies, ds.temperatures)
        xyz = ds.replica_positions.reshape(-1, ds.replica_positions.shape[-1]).numpy()
        own = MDReference(xyz, str(entry.path), ref_lw, replicas, ds.temperatures.tolist())
        info["replica_pool"]["reference_kish_frames"] = kish_size(ref_lw)
    runs, listing = [own], [{"md_seed": own_seed, "cache_key": entry.key}]
    for seed in seeds:
        extra = generate_or_load(
            system, {**md_settings, "seed": seed}, data_dir, n_workers=n_workers,
            progress=progress, log=log,
        )  # fmt: skip
        runs.append(load_reference(extra, replicas, stride))
        listing.append({"md_seed": seed, "cache_key": extra.key})
    split.md_reference = pool_runs(runs)
    info["md_reference"] = {"label": split.md_reference.label, "runs": listing}
    return split


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
    """Metropolis samples of a toy energy, each chain split into time blocks.

    Chains start from ``init_scale * N(0, 1)`` so that every basin can be reached.
    ``reference`` holds every sample (time-major, chains interleaved).
    """
    from .data import split_indices
    from .sampling import metropolis

    g = torch.Generator().manual_seed(seed)
    x0 = init_scale * torch.randn(n_chains, energy.dim, generator=g, dtype=torch.float64)
    x, acc = metropolis(energy, x0, n_steps, step_size, thin=thin, burn_in=burn_in, seed=seed)
    tr, va, te = split_indices(x.shape[0], tuple(fractions), n_series=n_chains)
    info = {
        "acceptance": float(acc),
        "n_samples": x.shape[0],
        "split": "contiguous time blocks per chain",
    }
    return DataSplit(x[tr], x[va], x[te], x, info)


def molecular_generator(
    system,
    train_x: Tensor,
    flow_factory: Callable,
    energy=None,
    zmatrix=None,
    circular="auto",
    bounded_ics: bool | str = False,
    ring_coordinates: str = "cartesian",
) -> BoltzmannGenerator:
    """IC transform fitted to ``train_x`` + ``flow_factory(dim=, circular=)`` + prior.

    The prior is Gaussian on bonds, angles and narrow torsions and uniform on the
    other torsions (:class:`NormalUniform`), which stay angles through the circular
    couplings. ``circular`` chooses those torsions (see
    :func:`~bgflow_mini.coordinates.ic_transform`); ``bounded_ics`` keeps every sample's
    bonds positive and angles in (0, pi), ``"box"`` also keeps the latent inside a box
    around the data (see ``ic_transform(bounded=...)``).
    ``ring_coordinates="cartesian"`` places ring atoms by Cartesian coordinates in a
    per-ring frame (:func:`~bgflow_mini.coordinates.rings.ring_zmatrix`; no effect on
    molecules without rings), ``"internal"`` keeps their internal coordinates. The
    generator's ``spec`` records the Z-matrix, its Cartesian rows, the mask,
    ``bounded_ics`` and the flow factory (see :mod:`bgflow_mini.checkpoint`).
    """
    from .checkpoint import flow_spec
    from .coordinates.rings import ring_zmatrix

    top, pos = system.mdtraj_topology, system.positions
    if zmatrix is None:
        zmatrix = build_zmatrix(top, positions=pos)
    cartesian = None
    if ring_coordinates == "cartesian":
        zmatrix, cartesian = ring_zmatrix(zmatrix, top, pos)
    elif ring_coordinates != "internal":
        raise ValueError(
            f"ring_coordinates must be 'cartesian' or 'internal', got {ring_coordinates!r}"
        )
    from .coordinates.zmatrix import bond_graph

    bonds = bond_graph(top)[1]
    ic, circular = ic_transform(
        zmatrix, train_x, cartesian=cartesian, bonds=bonds, circular=circular, bounded=bounded_ics
    )
    coupling = flow_factory(dim=ic.dim, circular=circular)
    prior = NormalUniform(ic.dim, circular)
    gen = BoltzmannGenerator(prior, Sequential(coupling, ic), energy)
    gen.spec = {
        "kind": "molecular",
        "dim": int(ic.dim),
        "zmatrix": ic.internal.zmatrix.tolist(),
        "cartesian": ic.internal.cartesian_rows.cpu().tolist(),
        "circular": circular.cpu().tolist(),
        "bounded_ics": bounded_ics if bounded_ics == "box" else bool(bounded_ics),
        "flow": flow_spec(flow_factory),
    }
    return gen


def toy_generator(energy, train_x: Tensor, flow_factory: Callable) -> BoltzmannGenerator:
    """A learnable diagonal Gaussian prior at the data mean/std + ``flow_factory(dim=)``."""
    from .checkpoint import flow_spec

    prior = DiagonalNormal(
        energy.dim, loc=train_x.mean(0).float(), scale=train_x.std(0).float(), learnable=True
    )
    gen = BoltzmannGenerator(prior, flow_factory(dim=energy.dim), energy)
    gen.spec = {"kind": "toy", "dim": int(energy.dim), "flow": flow_spec(flow_factory)}
    return gen


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

    Metrics besides ESS, NLL and the main ΔF (all free energies in kT):

    * ``ess_blocks``: the ESS of 5 disjoint blocks of the samples (min / median / max);
    * ``largest_weights``: the 5 largest weights, their share, energy and CV values
      (:func:`~bgflow_mini.evaluation.largest_weights`): where the flow is too thin;
    * ``state_populations``: raw and reweighted fraction of samples in every state;
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
        "largest_weights": largest_weights(log_w, u, values, cvs, k=5),
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
    if cap is not None:
        metrics["n_energies_above_cap"] = int((u[finite] > cap).sum())
        metrics["energy_cap"] = float(cap)
    if domain["evaluated"]:
        metrics["ic_out_of_domain_fraction"] = domain["out_of_domain"] / domain["evaluated"]
    metrics.update(_ramachandran(values, log_w, finite, data, cvs, bins))
    metrics.update(_chirality(target, x, log_w))
    topology = getattr(target, "topology", None)
    if topology is not None:
        from .ring_geometry import ring_bond_stats

        rings = ring_bond_stats(x, data.test.numpy(), topology, finite)
        if rings:
            metrics["ring_bonds"] = rings
    return metrics, {"x": x, "log_q": log_q, "u": u, "log_w": log_w}


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
    """Raw (finite-energy samples) and reweighted fraction of samples in each state."""
    lw = np.where(np.isfinite(log_w), log_w, -np.inf)
    w = np.exp(lw - lw.max()) if np.isfinite(lw).any() else np.zeros_like(lw)
    out = {}
    for name, state in states.items():
        m = np.asarray(cvmod.in_state(values, state, cvs))
        raw = float(m[finite].mean()) if finite.any() else math.nan
        out[name] = {"raw": raw, "reweighted": float(w[m].sum() / w.sum()) if w.sum() else 0.0}
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
