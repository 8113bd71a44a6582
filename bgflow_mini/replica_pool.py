"""Training frames pooled from several replica-exchange temperatures.

Replica exchange runs replicas on a temperature ladder ``T_0 < T_1 < ...`` (``T_0`` the
target) and, by default, the package trains on the target replica's frames alone. The
hotter replicas sample the same molecule at ``T_k`` and visit its rare regions (barriers,
minor rotamers, phi > 0) far more often. Pooling the frames of the ``k`` lowest
temperatures (``data.replicas = k``, ``md.keep_replicas >= k``) gives the maximum-likelihood
term one of two training distributions:

* ``"mbar"``: every frame weighted by the multistate Bennett acceptance ratio (MBAR;
  Shirts & Chodera, J. Chem. Phys. 129, 124105, 2008; solved with ``pymbar``) for the
  target temperature. The weighted pool is an unbiased, lower-variance sample of the
  target's Boltzmann distribution: the ML term's target is unchanged, estimated from
  more effective frames.
* ``"equal"``: every pooled frame counts once, i.e. the equal mixture of the ``k``
  Boltzmann distributions. The ML term then asks for a broader density than the target
  (heavier in the rare regions the flow tends to leave thin); the importance weights of
  the evaluation, computed with the target energy, stay exact.

The reduced potential of frame ``n`` at temperature ``T_j`` is ``U(x_n) / (R T_j)``: one
Hamiltonian, so the potential energies the MD saved are all MBAR needs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math

import numpy as np
import torch
from scipy.special import logsumexp

from .reweighting import effective_sample_size
from .units import kt_kjmol

__all__ = [
    "WEIGHTINGS",
    "temperature_log_weights",
    "pool_log_weights",
    "series_log_weights",
    "kish_size",
]

WEIGHTINGS = ("mbar", "equal")


@contextlib.contextmanager
def _quiet():
    """Silence pymbar's import notices (stdout) and its solver log (the ``pymbar`` logger)."""
    logger = logging.getLogger("pymbar")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _pymbar():
    """``pymbar`` (the ``mbar`` extra)."""
    try:
        with _quiet():
            import pymbar
    except ImportError as err:  # pragma: no cover - the test extra installs it
        raise ImportError(
            "MBAR weights of pooled replica frames need pymbar: pip install 'bgflow_mini[mbar]'"
        ) from err
    return pymbar


def temperature_log_weights(
    potentials: np.ndarray, replica: np.ndarray, temperatures: np.ndarray, target: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """MBAR weights at ``temperatures[target]`` of frames sampled at several temperatures.

    Arguments:
        potentials: ``(N,)`` potential energy of every frame, kJ/mol.
        replica: ``(N,)`` int, the ladder index of the temperature each frame was sampled at.
        temperatures: ``(K,)`` K; every index ``0..K-1`` must have frames.
        target: ladder index of the temperature to weight for.

    Returns:
        ``(log_w, f)``: ``(N,)`` log weights normalised to ``logsumexp(log_w) = 0``, and the
        ``(K,)`` dimensionless free energies ``f_k = -ln Z_k`` with ``f_0 = 0``.
    """
    u = np.asarray(potentials, dtype=np.float64).reshape(-1)
    rep = np.asarray(replica).reshape(-1)
    temps = np.asarray(temperatures, dtype=np.float64).reshape(-1)
    if rep.shape != u.shape:
        raise ValueError(f"replica {rep.shape} and potentials {u.shape} differ in shape")
    if not np.all(np.isfinite(u)):
        raise ValueError("potentials must be finite")
    n_k = np.bincount(rep, minlength=len(temps))
    if len(n_k) != len(temps) or np.any(n_k == 0) or rep.min() < 0:
        raise ValueError(
            f"every temperature needs frames and replica indices in 0..{len(temps) - 1}; "
            f"frames per temperature: {n_k.tolist()}"
        )
    if not 0 <= target < len(temps):
        raise ValueError(f"target must be in 0..{len(temps) - 1}, got {target}")
    kt = np.array([kt_kjmol(float(t)) for t in temps])  # kJ/mol
    u_kn = u[None, :] / kt[:, None]
    # frames in ladder order, as pymbar expects; weights are returned in the input order
    order = np.argsort(rep, kind="stable")
    pymbar = _pymbar()
    with _quiet():
        mbar = pymbar.MBAR(u_kn[:, order], n_k, initialize="BAR" if len(temps) > 1 else "zeros")
    f = np.asarray(mbar.f_k, dtype=np.float64)
    log_denominator = logsumexp(f[:, None] - u_kn, b=n_k[:, None].astype(float), axis=0)
    log_w = f[target] - u_kn[target] - log_denominator
    return log_w - logsumexp(log_w), f - f[0]


def pool_log_weights(
    potentials: np.ndarray,
    replica: np.ndarray,
    temperatures: np.ndarray,
    weighting: str = "mbar",
) -> np.ndarray:
    """Log weights ``(N,)`` (``logsumexp = 0``) of pooled frames: ``"mbar"`` for the target
    temperature ``temperatures[0]`` (:func:`temperature_log_weights`) or ``"equal"``
    (every frame ``-ln N``). See the module docstring."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"replica weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
    n = len(np.asarray(potentials).reshape(-1))
    if weighting == "equal":
        return np.full(n, -math.log(n))
    return temperature_log_weights(potentials, replica, temperatures)[0]


def series_log_weights(
    energies: np.ndarray, temperatures: np.ndarray, weighting: str = "mbar"
) -> np.ndarray:
    """Log weights ``(k * n,)`` of ``k`` series of frames, series after series (the layout
    of :func:`bgflow_mini.data.load_replica_frames` flattened), for ``temperatures[0]``.

    ``energies``: ``(k, n)`` potential energies in kJ/mol, series ``j`` sampled at
    ``temperatures[j]`` K. See :func:`pool_log_weights` for ``weighting``.
    """
    u = np.asarray(energies, dtype=np.float64)
    if u.ndim != 2 or u.shape[0] != len(np.asarray(temperatures).reshape(-1)):
        raise ValueError(
            f"energies must be (k, n) with one row per temperature, got {u.shape} for "
            f"{len(np.asarray(temperatures).reshape(-1))} temperatures"
        )
    replica = np.repeat(np.arange(u.shape[0]), u.shape[1])
    return pool_log_weights(u.reshape(-1), replica, temperatures, weighting)


def kish_size(log_w: np.ndarray | torch.Tensor) -> float:
    """Kish effective number of frames ``(sum w)^2 / sum w^2`` of log weights ``(N,)``."""
    return effective_sample_size(log_w) * len(log_w)
