"""Quality metrics of a trained Boltzmann generator against reference (MD) data.

All free energies are in kT, angles in radians. Reweighted quantities always come
with the ESS of the weights they use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext

import numpy as np
import torch

from . import cv as cvmod

__all__ = [
    "histogram_kl",
    "ramachandran_kl",
    "state_masks",
    "block_free_energy",
    "generator_samples",
    "largest_weights",
    "EVALUATION_STREAM",
]


def _norm_weights(log_w, n: int) -> np.ndarray:
    if log_w is None:
        return np.full(n, 1.0 / n)
    lw = np.asarray(log_w, dtype=np.float64)
    if lw.shape != (n,):
        raise ValueError(f"log_w must have shape ({n},), got {lw.shape}")
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    if not np.isfinite(lw).any():
        raise ValueError("all log weights are -inf/NaN: no sample carries weight")
    w = np.exp(lw - lw.max())
    return w / w.sum()


def largest_weights(
    log_w,
    u,
    cv_values: Mapping[str, np.ndarray] | None = None,
    cvs: Mapping[str, Mapping] | None = None,
    k: int = 5,
) -> list[dict]:
    """Where the importance weight concentrates: the ``k`` largest weights of a sample set.

    A low ESS usually comes from a few samples where the generator's density is far below
    the target's; their CV values say which region the flow has too thin. For each of the
    ``k`` largest weights (largest first):

    * ``index``: the sample's position in the set;
    * ``share``: its fraction of the total weight;
    * ``log_w_above_median``: ``log w`` minus the median of the finite ``log w`` (nats);
    * ``u_above_median``: its reduced energy minus the median finite energy (kT);
    * ``cvs``: the value of every CV in ``cv_values`` at that sample, torsions and
      angles in degrees (their specs in ``cvs`` say which; without ``cvs``, raw values),
      distances in nm.

    Arguments:
        log_w: log importance weights ``(n,)`` (non-finite ones carry no weight).
        u: reduced energies ``(n,)``, kT.
        cv_values: CV name -> values ``(n,)`` (radians / nm), e.g. from
            :func:`bgflow_mini.cv.compute_cvs`.
        cvs: CV specs (``{"type": "torsion", ...}``) used for the units.
        k: how many weights (fewer when fewer samples carry weight).
    """
    lw = np.asarray(log_w, dtype=np.float64).ravel()
    uu = np.asarray(u, dtype=np.float64).ravel()
    if uu.shape != lw.shape:
        raise ValueError(f"u has shape {uu.shape}, log_w {lw.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    finite = np.isfinite(lw)
    if not finite.any():
        return []
    w = _norm_weights(lw, lw.size)
    order = np.argsort(-w, kind="stable")[: min(k, int(finite.sum()))]
    lw_med = float(np.median(lw[finite]))
    u_fin = np.isfinite(uu)
    u_med = float(np.median(uu[u_fin])) if u_fin.any() else math.nan
    angular = {n for n, s in (cvs or {}).items() if s.get("type") in ("torsion", "angle")}
    out = []
    for i in order:
        values = {}
        for name, v in (cv_values or {}).items():
            x = float(np.asarray(v)[i])
            values[name] = math.degrees(x) if name in angular else x
        out.append(
            {
                "index": int(i),
                "share": float(w[i]),
                "log_w_above_median": float(lw[i] - lw_med),
                "u_above_median": float(uu[i] - u_med),
                "cvs": values,
            }
        )
    return out


def histogram_kl(p_hist: np.ndarray, q_hist: np.ndarray, eps: float = 1e-10) -> float:
    """Forward KL ``sum p log(p / q)`` of two histograms (normalised here).

    ``eps`` is added to every bin of ``q`` (then renormalised) so that bins where the
    reference has mass and ``q`` has none give a large finite penalty, not inf.
    """
    p = np.asarray(p_hist, dtype=np.float64).ravel()
    q = np.asarray(q_hist, dtype=np.float64).ravel() + eps
    p, q = p / p.sum(), q / q.sum()
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def ramachandran_kl(
    ref_phi, ref_psi, phi, psi, log_w=None, bins: int = 64, eps: float = 1e-10
) -> float:
    """Forward KL of the (phi, psi) histogram of reference data vs (weighted) samples.

    Histograms on ``bins x bins`` bins over [-pi, pi)^2; ``log_w`` are the samples'
    log importance weights (``None``: unweighted). See :func:`histogram_kl`.
    """
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    h_ref, _, _ = np.histogram2d(np.asarray(ref_phi), np.asarray(ref_psi), bins=[edges, edges])
    w = _norm_weights(log_w, len(np.asarray(phi)))
    h_q, _, _ = np.histogram2d(np.asarray(phi), np.asarray(psi), bins=[edges, edges], weights=w)
    return histogram_kl(h_ref, h_q, eps)


def state_masks(
    cv_values: Mapping, states: Mapping, cvs: Mapping, state_a: str, state_b: str
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks ``(n,)`` of two named states (CV ranges from a system's YAML)."""
    for s in (state_a, state_b):
        if s not in states:
            raise KeyError(f"unknown state {s!r}; defined states: {sorted(states)}")
    a = np.asarray(cvmod.in_state(cv_values, states[state_a], cvs))
    b = np.asarray(cvmod.in_state(cv_values, states[state_b], cvs))
    return a, b


def block_free_energy(
    in_a,
    in_b,
    n_blocks: int = 20,
    n_bootstrap: int = 500,
    seed: int = 0,
    weights=None,
) -> tuple[float, float]:
    """ΔF = -ln(P_b / P_a) of a time series of state labels, with a block-bootstrap error.

    ``in_a``, ``in_b``: boolean masks ``(n_frames,)`` in time order (e.g. MD frames), or
    ``(n_series, n_frames)`` for several series sampled at the same times (e.g. the
    replicas of a replica exchange). The time axis is cut into ``n_blocks`` contiguous
    blocks (the same times in every series) that are resampled with replacement, so
    correlated frames do not shrink the error. ``weights`` (same shape, non-negative;
    e.g. MBAR weights of pooled replicas) weight each frame; default 1. Returns
    ``(dF, stderr)`` in kT; a state never visited gives ``inf`` and a replicate without
    a visit is dropped from the error estimate.
    """
    a = np.asarray(in_a, dtype=bool)
    b = np.asarray(in_b, dtype=bool)
    if a.shape != b.shape or a.ndim not in (1, 2):
        raise ValueError(
            f"in_a and in_b must be 1-D (or series x time) masks of equal shape, got "
            f"{a.shape}, {b.shape}"
        )
    w = np.ones(a.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != a.shape or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite, non-negative, of shape {a.shape}")
    a, b, w = np.atleast_2d(a), np.atleast_2d(b), np.atleast_2d(w)
    n_time = a.shape[1]
    if n_blocks < 2 or n_time < n_blocks:
        raise ValueError(f"need 2 <= n_blocks <= n_frames, got {n_blocks} for {n_time} frames")
    na, nb = (w * a).sum(), (w * b).sum()
    if na == 0 or nb == 0:
        return (math.inf if nb == 0 else -math.inf), math.inf
    dF = -math.log(nb / na)
    blocks = np.array_split(np.arange(n_time), n_blocks)
    ca = np.array([(w[:, i] * a[:, i]).sum() for i in blocks], dtype=float)
    cb = np.array([(w[:, i] * b[:, i]).sum() for i in blocks], dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_blocks, size=(n_bootstrap, n_blocks))
    sa, sb = ca[idx].sum(1), cb[idx].sum(1)
    ok = (sa > 0) & (sb > 0)
    if ok.sum() < n_bootstrap / 2:
        return dF, math.inf
    return dF, float(np.std(-np.log(sb[ok] / sa[ok]), ddof=1))


EVALUATION_STREAM = 5
"""``purpose`` of the evaluation's random streams (see
:func:`~bgflow_mini.distributed.stream_seed`; the trainer's streams are 0-4)."""


@torch.no_grad()
def generator_samples(
    generator,
    n: int,
    batch_size: int = 4096,
    progress: bool = False,
    energy=None,
    seed: int | None = None,
    shards: int | None = None,
):
    """Draw ``n`` samples in batches: returns numpy ``(x, log_q, u, log_w)``.

    ``energy`` (default: the generator's) gives ``u`` in kT. Non-finite energies are
    kept (their log weight is ``-inf``), so a caller can report the fraction of finite
    energies.

    Without ``seed`` the samples come from torch's global RNG in this process. With it, the
    ``n`` samples are split into ``shards`` parts (default: one per process of the
    ``torch.distributed`` group), each drawn from its own stream ``(seed, shard)``; under
    ``torchrun`` every process draws and evaluates the energies of its consecutive shards
    and all processes receive the union in shard order, so the samples depend on
    ``(seed, shards)``, not on how many processes drew them.
    """
    from tqdm.auto import tqdm

    from . import distributed as dist
    from .generator import check_energy_output

    energy = generator.energy if energy is None else energy
    if energy is None:
        raise ValueError("generator_samples needs an energy: the generator has none")
    world, rank = dist.world_size(), dist.rank()
    shards = world if shards is None else int(shards)
    if shards < 1 or shards % world:
        raise ValueError(f"shards={shards} must be a positive multiple of the {world} processes")
    if seed is None and world > 1:
        raise ValueError("generator_samples needs a seed to split the samples over processes")
    if seed is None:  # one process, the global RNG
        mine = [(None, int(n))]
    else:  # (shard, count) of this process's consecutive shards
        counts = dist.shard_counts(n, shards)
        mine = [(sh, counts[sh]) for sh in dist.rank_shards(shards, rank, world)]
    p = next(generator.parameters(), None)
    device = p.device if p is not None else "cpu"
    bar = tqdm(total=int(n), disable=not progress or rank != 0, desc="sampling")
    xs, lqs, us = [], [], []
    for shard, count in mine:
        stream = nullcontext()
        if shard is not None:
            stream = dist.rng_stream(dist.stream_seed(seed, shard, 0, EVALUATION_STREAM), device)
        with stream:
            for start in range(0, count, batch_size):
                m = min(batch_size, count - start)
                x, lq = generator.sample(m, with_log_prob=True)
                u = check_energy_output(energy(x), x)
                xs.append(x.detach())
                lqs.append(lq.detach())
                us.append(u.detach())
                bar.update(m * world)
    bar.close()
    if not xs:  # fewer samples than shards: this process drew none
        dim = generator.sample(1).shape[1]
        xs, lqs, us = [torch.zeros(0, dim)], [torch.zeros(0)], [torch.zeros(0)]
    x, lq, u = (dist.all_gather_cat(torch.cat(t).double()).cpu().numpy() for t in (xs, lqs, us))
    log_w = np.where(np.isfinite(u) & np.isfinite(lq), -u - lq, -np.inf)
    return x, lq, u, log_w
