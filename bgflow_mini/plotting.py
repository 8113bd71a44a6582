"""Plots a chemist reads: Ramachandran maps, PMFs, energy and weight histograms, curves.

Every function writes one PNG (matplotlib, Agg backend) and returns its path.
Angles are in radians, energies and free energies in kT.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

__all__ = [
    "plot_ramachandran",
    "plot_pmfs",
    "plot_energy_histograms",
    "plot_log_weights",
    "plot_training_curves",
]


def _weights(log_w) -> np.ndarray | None:
    if log_w is None:
        return None
    lw = np.asarray(log_w, dtype=np.float64)
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    return np.exp(lw - lw.max())


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_ramachandran(
    path, panels: Mapping[str, tuple], bins: int = 64, title: str = "Ramachandran plot"
) -> Path:
    """Side-by-side (phi, psi) 2-D histograms with a log colour scale.

    ``panels`` maps a label to ``(phi, psi)`` or ``(phi, psi, log_w)`` (radians; log
    weights optional, for reweighted samples). Densities share one colour scale.
    """
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    hists = {}
    for label, data in panels.items():
        phi, psi = np.asarray(data[0]), np.asarray(data[1])
        w = _weights(data[2]) if len(data) > 2 else None
        h, _, _ = np.histogram2d(phi, psi, bins=[edges, edges], weights=w, density=True)
        hists[label] = h
    positive = [h[h > 0].min() for h in hists.values() if (h > 0).any()]
    vmin = max(min(positive), 1e-4 * max(h.max() for h in hists.values())) if positive else 1e-6
    vmax = max(h.max() for h in hists.values()) or 1.0
    fig, axes = plt.subplots(
        1, len(hists), figsize=(4.6 * len(hists), 4), squeeze=False, layout="constrained"
    )
    for ax, (label, h) in zip(axes[0], hists.items()):
        im = ax.pcolormesh(
            edges, edges, np.ma.masked_less_equal(h.T, 0), norm=LogNorm(vmin, vmax), cmap="viridis"
        )
        ax.set_title(label)
        ax.set_xlabel(r"$\phi$ (rad)")
        ax.set_ylabel(r"$\psi$ (rad)")
        ax.set_aspect("equal")
    fig.colorbar(im, ax=axes[0].tolist(), label="probability density (rad$^{-2}$)")
    fig.suptitle(title)
    return _save(fig, path)


def plot_pmfs(
    path,
    profiles: Mapping[str, tuple],
    xlabel: str,
    title: str = "Free-energy profile",
    max_f: float | None = None,
) -> Path:
    """1-D PMFs with error bands: ``profiles`` maps label -> ``(centres, F, stderr)`` in kT.

    ``max_f`` (kT) caps the y axis, so that a barrier bin carried by one tiny weight does
    not squash the basins (``None``: autoscale).
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (c, f, err) in profiles.items():
        c, f = np.asarray(c), np.asarray(f, dtype=float)
        f = np.where(np.isfinite(f), f, np.nan)  # gaps at empty bins
        (line,) = ax.plot(c, f, label=label)
        if err is not None:
            e = np.asarray(err, dtype=float)
            e = np.where(np.isfinite(e), e, 0.0)
            ax.fill_between(c, f - e, f + e, alpha=0.3, color=line.get_color())
    if max_f is not None:
        ax.set_ylim(-0.05 * float(max_f), float(max_f))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("free energy (kT)")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def plot_energy_histograms(
    path, energies: Mapping[str, Sequence[float]], title: str = "Reduced energies"
) -> Path:
    """Histograms of reduced energies u/kT per label (non-finite values left out)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    finite = {k: np.asarray(v, dtype=float) for k, v in energies.items()}
    finite = {k: v[np.isfinite(v)] for k, v in finite.items()}
    allv = np.concatenate([v for v in finite.values() if v.size]) if finite else np.zeros(1)
    lo, hi = np.percentile(allv, [0.5, 99.5]) if allv.size else (0, 1)
    for label, v in finite.items():
        ax.hist(v, bins=80, range=(lo, hi), density=True, histtype="step", label=label)
    ax.set_xlabel("reduced energy u (kT)")
    ax.set_ylabel("density (1/kT)")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def plot_log_weights(path, log_w, title: str = "Log importance weights") -> Path:
    """Histogram of log importance weights, shifted so the largest is 0."""
    lw = np.asarray(log_w, dtype=float)
    lw = lw[np.isfinite(lw)]
    fig, ax = plt.subplots(figsize=(6, 4))
    if lw.size:
        ax.hist(lw - lw.max(), bins=80, density=True)
    ax.set_xlabel("log w - max log w")
    ax.set_ylabel("density")
    ax.set_title(title)
    return _save(fig, path)


def plot_training_curves(path, history: Sequence[Mapping], title: str = "Training") -> Path:
    """Losses (NLL, reverse KL, validation NLL) and ESS against the step."""
    keys = [("nll", "train NLL"), ("val_nll", "validation NLL"), ("kl", "reverse KL")]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in keys:
        pts = [(r["step"], r[key]) for r in history if key in r and math.isfinite(r[key])]
        if pts:
            s, v = zip(*pts)
            ax.plot(s, v, label=label, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (kT)")
    ax.set_title(title)
    ax.legend()
    for key, label in [("ess", "ESS (training batch)"), ("ess_eval", "ESS (evaluation)")]:
        pts = [(r["step"], r[key]) for r in history if key in r]
        if pts:
            s, v = zip(*pts)
            ax2.plot(s, v, label=label, lw=1)
    ax2.set_xlabel("step")
    ax2.set_ylabel("normalised ESS")
    ax2.set_ylim(0, 1)
    ax2.set_title("Effective sample size")
    ax2.legend()
    return _save(fig, path)
