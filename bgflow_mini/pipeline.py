"""Building blocks of the training pipeline (used by :mod:`bgflow_mini.targets`; no Hydra).

* data: :func:`molecular_data` (cached OpenMM MD / replica exchange) and
  :func:`toy_data` (Metropolis on a toy energy), split into train/val/test in
  contiguous blocks of time;
* models: :func:`molecular_generator` (internal coordinates + coupling flow on
  torsion-aware features) and :func:`toy_generator`, each with a ``spec`` from which
  :func:`bgflow_mini.checkpoint.load_generator` rebuilds it;
* evaluation: :func:`evaluate` (:mod:`bgflow_mini.run_evaluation`, re-exported here)
  returns a metrics dict (ESS, test NLL, ΔF vs the reference, state populations,
  Ramachandran KL, finite and capped energies) computed with the real energy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .coordinates import build_zmatrix, ic_transform
from .distributions import DiagonalNormal, NormalUniform
from .flows import Sequential
from .generator import BoltzmannGenerator
from .md_reference import MDReference, load_reference, pool_runs
from .run_evaluation import evaluate, ic_domain_stats, test_nll

__all__ = [
    "DataSplit",
    "apply_state_floor",
    "check_state_floor",
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
    (``reference_seeds``). None: ``reference`` alone (toys). ``ml_log_weights``: the
    ML rows' log draw weights when a state floor raised them
    (:func:`bgflow_mini.state_balance.state_floor_log_weights`), else None.
    ``ml_weightings``: the ML rows' log draw weights under further replica weightings
    (``extra_weightings`` of :func:`molecular_data`, for phases with their own
    ``replica_weights``), the state floor applied to each where one is set.
    """

    train: Tensor
    val: Tensor
    test: Tensor
    reference: Tensor
    info: dict = field(default_factory=dict)
    pool: Tensor | None = None
    pool_log_weights: Tensor | None = None
    md_reference: MDReference | None = None
    ml_log_weights: Tensor | None = None
    ml_weightings: dict[str, Tensor] = field(default_factory=dict)

    def ml_data(self, weighting: str | None = None) -> tuple[Tensor, Tensor | None]:
        """The maximum-likelihood rows and their draw weights (None: uniform draws);
        ``weighting`` (``"mbar"`` or ``"equal"``) asks for the replica pool's rows drawn
        with that weighting instead of the run's own."""
        rows = self.train if self.pool is None else self.pool
        own = (self.info.get("replica_pool") or {}).get("weighting")
        if weighting is None or weighting == own:
            lw = self.pool_log_weights if self.ml_log_weights is None else self.ml_log_weights
        elif weighting in self.ml_weightings:
            lw = self.ml_weightings[weighting]
        else:
            raise ValueError(
                f"no ML draw weights for replica weighting {weighting!r}: the data has "
                + (f"{own!r} and {sorted(self.ml_weightings)}" if own else "no replica pool")
            )
        return rows, None if lw is None else torch.exp(lw - lw.max())


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
    extra_weightings: Sequence[str] = (),
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
    share of each temperature; ``extra_weightings`` computes the pool's weights under those
    weightings too (``ml_weightings``). Validation, test and ``reference`` stay target-temperature
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

    for weighting in (replica_weights, *extra_weightings):  # before any MD
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"replica_weights must be one of {list(WEIGHTINGS)}, got {weighting!r}"
            )
    if extra_weightings and replicas < 2:
        raise ValueError(
            f"replica weightings {list(extra_weightings)} need a replica pool (replicas > 1), "
            f"got replicas={replicas}"
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

        def summary(log_w: np.ndarray) -> dict:  # Kish size and each temperature's share
            w = np.exp(log_w)
            shares = [float(w[ds.pool_replica == r].sum()) for r in range(replicas)]
            return {"kish_frames": kish_size(log_w), "weight_share": shares}

        info["replica_pool"] = {
            "replicas": int(replicas),
            "weighting": replica_weights,
            "temperatures": ds.temperatures.tolist(),
            "n_frames": int(len(lw)),
            "target_frames": int(ds.train.shape[0]),
            **summary(lw),
        }
        split.pool, split.pool_log_weights = ds.pool, torch.as_tensor(lw)
        for weighting in sorted(set(extra_weightings) - {replica_weights}):
            other = pool_log_weights(ds.pool_energies, ds.pool_replica, ds.temperatures, weighting)
            split.ml_weightings[weighting] = torch.as_tensor(other)
            info["replica_pool"].setdefault("phase_weightings", {})[weighting] = summary(other)
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


def check_state_floor(
    state_floor: float, states: Mapping, name: str = "this target", cvs: Mapping | None = None
) -> None:
    """Refuse, before any MD, a state floor outside (0, 0.5), one for a target without
    states, or one that ``states`` cannot all hold (k states that exclude one another need
    ``k * state_floor <= 1``; ``cvs`` marks the periodic CVs)."""
    from .state_balance import check_floor

    check_floor(state_floor, states, cvs)
    if not states:
        raise ValueError(
            f"state_floor={state_floor} raises the ML share of the target's states, but "
            f"{name} defines none (system.yaml: states)"
        )


def apply_state_floor(
    split: DataSplit,
    cvs: Mapping,
    states: Mapping,
    state_floor: float,
    log: Callable | None = print,
) -> DataSplit:
    """Raise the ML draw weights of ``split`` in every state below ``state_floor``.

    The ML rows (``pool`` or ``train``) get ``ml_log_weights``
    (:func:`bgflow_mini.state_balance.state_floor_log_weights`) in which each of ``states``
    (CV ranges over ``cvs``) holds at least that share; ``info["state_floor"]`` reports
    the shares before and after. The further weightings of ``ml_weightings`` are floored
    the same way. Validation, test and the reference are untouched.
    """
    from .state_balance import state_floor_log_weights, state_masks

    rows = split.train if split.pool is None else split.pool
    masks = state_masks(rows.detach().cpu().numpy(), cvs, states)
    lw = None if split.pool_log_weights is None else split.pool_log_weights.numpy()
    lw, report = state_floor_log_weights(lw, masks, state_floor)
    split.ml_log_weights = torch.as_tensor(lw)
    for weighting, other in split.ml_weightings.items():
        floored, _ = state_floor_log_weights(other.numpy(), masks, state_floor)
        split.ml_weightings[weighting] = torch.as_tensor(floored)
    split.info["state_floor"] = report
    if log is not None:
        moved = {
            s: f"{r['before']:.4f} -> {r['after']:.4f}"
            for s, r in report["states"].items()
            if abs(r["after"] - r["before"]) > 1e-4
        }
        log(
            f"[data] state floor {state_floor}: ML draw shares {moved or 'unchanged'} "
            f"(Kish effective {report['kish_frames']:.0f} of {len(lw)} frames)"
        )
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
