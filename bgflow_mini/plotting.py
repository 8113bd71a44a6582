"""Plots a chemist reads: Ramachandran maps (one residue, or a grid of residues), PMFs,
energy and weight histograms, training curves.

Every function writes one PNG (matplotlib, Agg backend) and returns its path.
Angles are in radians, energies and free energies in kT.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

__all__ = [
    "plot_ramachandran",
    "plot_ramachandran_grid",
    "plot_ramachandran_pairs",
    "cv_label",
    "plot_pmfs",
    "plot_energy_histograms",
    "plot_log_weights",
    "plot_training_curves",
    "moving_average",
]


def _weights(log_w) -> np.ndarray | None:
    if log_w is None:
        return None
    lw = np.asarray(log_w, dtype=np.float64)
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    return np.exp(lw - lw.max())


def _save(fig, path) -> Path:
    """Save and close ``fig``; the file appears complete or not at all (atomic rename)."""
    from .fileio import atomic_path

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def _rama_hists(panels: Mapping[str, tuple], edges: np.ndarray) -> dict[str, np.ndarray]:
    hists = {}
    for label, data in panels.items():
        phi, psi = np.asarray(data[0]), np.asarray(data[1])
        w = _weights(data[2]) if len(data) > 2 and data[2] is not None else None
        if phi.size == 0 or (w is not None and not w.sum() > 0):
            hists[label] = np.zeros((len(edges) - 1,) * 2)
            continue
        h, _, _ = np.histogram2d(phi, psi, bins=[edges, edges], weights=w, density=True)
        hists[label] = np.nan_to_num(h)
    return hists


def _log_range(hists) -> tuple[float, float]:
    """A shared log colour range: the largest density down to 1e-4 of it."""
    positive = [h[h > 0].min() for h in hists if (h > 0).any()]
    vmax = max(h.max() for h in hists) or 1.0
    vmin = max(min(positive), 1e-4 * vmax) if positive else 1e-6
    return vmin, max(vmax, vmin * 10)


def plot_ramachandran(
    path,
    panels: Mapping[str, tuple],
    bins: int = 64,
    title: str = "Ramachandran plot",
    labels: tuple[str, str] = (r"$\phi$ (rad)", r"$\psi$ (rad)"),
) -> Path:
    """Side-by-side (phi, psi) 2-D histograms with a log colour scale.

    ``panels`` maps a label to ``(phi, psi)`` or ``(phi, psi, log_w)`` (radians; log
    weights optional, for reweighted samples). Densities share one colour scale.
    ``labels``: the x and y axis labels.
    """
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    hists = _rama_hists(panels, edges)
    vmin, vmax = _log_range(hists.values())
    fig, axes = plt.subplots(
        1, len(hists), figsize=(4.6 * len(hists), 4), squeeze=False, layout="constrained"
    )
    for ax, (label, h) in zip(axes[0], hists.items()):
        im = ax.pcolormesh(
            edges, edges, np.ma.masked_less_equal(h.T, 0), norm=LogNorm(vmin, vmax), cmap="viridis"
        )
        ax.set_title(label)
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        ax.set_aspect("equal")
    fig.colorbar(im, ax=axes[0].tolist(), label="probability density (rad$^{-2}$)")
    fig.suptitle(title)
    return _save(fig, path)


def plot_ramachandran_grid(
    path,
    rows: Mapping[str, Mapping[str, tuple]],
    bins: int = 48,
    title: str = "Ramachandran plots per residue",
) -> Path:
    """One row of (phi, psi) histograms per residue, one column per source.

    ``rows`` maps a residue label (e.g. ``"residue 2"``) to panels as in
    :func:`plot_ramachandran` (label -> ``(phi, psi[, log_w])``); every row must have the
    same panel labels (the column titles). All panels share one log colour scale, so
    residues can be compared; axes span [-pi, pi] with ticks at -pi/2, 0, pi/2 only, so
    that five or more rows stay readable.
    """
    if not rows:
        raise ValueError("plot_ramachandran_grid needs at least one row")
    columns = list(next(iter(rows.values())))
    for name, panels in rows.items():
        if list(panels) != columns:
            raise ValueError(f"row {name!r} has panels {list(panels)}, expected {columns}")
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    hists = {name: _rama_hists(panels, edges) for name, panels in rows.items()}
    vmin, vmax = _log_range([h for r in hists.values() for h in r.values()])
    n_rows, n_cols = len(rows), len(columns)
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(2.7 * n_cols + 1.2, 2.5 * n_rows + 0.8),
        squeeze=False,
        sharex=True,
        sharey=True,
        layout="constrained",
    )
    ticks, names = [-math.pi / 2, 0.0, math.pi / 2], [r"$-\pi/2$", "0", r"$\pi/2$"]
    im = None
    for i, (name, row) in enumerate(hists.items()):
        for j, (label, h) in enumerate(row.items()):
            ax = axes[i, j]
            im = ax.pcolormesh(
                edges,
                edges,
                np.ma.masked_less_equal(h.T, 0),
                norm=LogNorm(vmin, vmax),
                cmap="viridis",
            )
            ax.set_aspect("equal")
            ax.set_xticks(ticks, names)
            ax.set_yticks(ticks, names)
            if i == 0:
                ax.set_title(label, fontsize="medium")
            if j == 0:
                ax.set_ylabel(f"{name}\n" + r"$\psi$ (rad)")
            if i == n_rows - 1:
                ax.set_xlabel(r"$\phi$ (rad)")
    fig.colorbar(
        im,
        ax=axes.ravel().tolist(),
        shrink=min(1.0, 3.0 / n_rows),
        aspect=25,
        label="probability density (rad$^{-2}$)",
    )
    fig.suptitle(title)
    return _save(fig, path)


def plot_ramachandran_pairs(
    path,
    pairs: Sequence[tuple[str, str, str]],
    sources: Mapping[str, tuple],
    bins: int = 64,
    title: str = "Ramachandran plot",
) -> Path | None:
    """Ramachandran plots of every backbone pair: one figure for one pair, else a grid.

    ``pairs``: ``(residue, phi_name, psi_name)`` as from
    :func:`bgflow_mini.cv.ramachandran_pairs`; ``sources`` maps a column label to
    ``(cv_values, log_w or None)`` with ``cv_values`` a ``{name: (n,)}`` dict holding the
    pairs' CVs. One pair gives :func:`plot_ramachandran` (axes named after the CVs), more
    give :func:`plot_ramachandran_grid` (rows ``residue <k>``). ``None`` without pairs.
    """

    def panels(phi: str, psi: str) -> dict[str, tuple]:
        return {label: (v[phi], v[psi], w) for label, (v, w) in sources.items()}

    if not pairs:
        return None
    if len(pairs) == 1:
        res, phi, psi = pairs[0]
        labels = tuple(cv_label(n) + " (rad)" for n in (phi, psi))
        return plot_ramachandran(path, panels(phi, psi), bins, title, labels)
    rows = {(f"residue {r}" if r else phi): panels(phi, psi) for r, phi, psi in pairs}
    return plot_ramachandran_grid(path, rows, min(bins, 48), title)


def cv_label(name: str) -> str:
    r"""``phi`` -> $\phi$, ``psi_2`` -> $\psi_{2}$, ``chi1_3`` -> $\chi_{1,3}$; others as is."""
    m = re.fullmatch(r"(phi|psi|omega|chi)(\d*)(?:_([A-Za-z0-9]+))?", name)
    if m is None:
        return name
    sub = ",".join(p for p in (m.group(2), m.group(3)) if p)
    return rf"$\{m.group(1)}" + (f"_{{{sub}}}$" if sub else "$")


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


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average: ``out[i] = mean(values[max(0, i - window + 1) : i + 1])``.

    The first ``window - 1`` entries average over the points seen so far (no padding),
    so the output has the input's length. Non-finite values are left out of each mean
    (a window with no finite value gives NaN). ``window`` must be a positive int.
    """
    if isinstance(window, bool) or not isinstance(window, int | np.integer) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, v, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(finite)])
    hi = np.arange(1, v.size + 1)
    lo = np.maximum(hi - int(window), 0)
    count = ccount[hi] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[hi] - csum[lo]) / count, np.nan)


def _series(history: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that hold a finite number under ``key``."""
    pts = []
    for i, r in enumerate(history):
        v = r.get(key)
        if v is None or isinstance(v, bool):
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            pts.append((float(r.get("step", i + 1)), v))
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts)
    return np.asarray(s), np.asarray(v)


def _phase_starts(history: Sequence[Mapping]) -> list[tuple[float, str]]:
    """(step, name) of the first record with a ``phase`` and of each later record whose
    ``phase`` differs from that of the previous record that has one."""
    out, prev = [], None
    for i, r in enumerate(history):
        if "phase" not in r:
            continue
        ph = r["phase"]
        if prev is None or ph != prev[0]:
            out.append((float(r.get("step", i + 1)), str(ph)))
        prev = (ph,)
    return out


def _robust_ylim(ax, *series: np.ndarray, k: float = 8.0) -> None:
    """Clip the y range to ``[q25 - k IQR, q75 + k IQR]`` (padded) when values lie outside,
    so that a transient (e.g. the first steps of a phase, at 1e4 kT) does not flatten the
    plateau of a noisy curve. Steadily changing curves have a wide IQR and stay whole."""
    v = np.concatenate([np.asarray(s, dtype=float).ravel() for s in series])
    v = v[np.isfinite(v)]
    if v.size < 10:
        return
    q1, q3 = np.quantile(v, [0.25, 0.75])
    iqr = q3 - q1
    lo, hi = max(v.min(), q1 - k * iqr), min(v.max(), q3 + k * iqr)
    if iqr > 0 and (lo > v.min() or hi < v.max()):
        pad = 0.05 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)


def plot_training_curves(
    path,
    history: Sequence[Mapping],
    title: str = "Training",
    smooth: int | None = None,
) -> Path:
    """Training history from :class:`~bgflow_mini.training.Trainer`, one panel per quantity.

    Panels, each skipped when no record holds a finite value for it:

    * training NLL (``nll``) with validation NLL (``val_nll``), kT;
    * reverse KL (``kl``), kT;
    * ESS: per-batch ``ess`` (faint) with its :func:`moving_average` over ``smooth``
      steps, and the periodic ``ess_eval`` points;
    * learning rate (``lr``, log scale);
    * gradient norm (``grad_norm``, log scale).

    All share the step axis; dashed vertical lines mark where ``phase`` changes (phase
    names are written above the top panel). NLL, KL and gradient norm also get the
    smoothed overlay, and the NLL/KL y ranges ignore extreme outliers (e.g. the first
    steps). ``smooth`` defaults to about 2 % of the record count (at least 1).
    """
    n = len(history)
    window = int(smooth) if smooth is not None else max(1, n // 50)
    nll, val, kl = (_series(history, k) for k in ("nll", "val_nll", "kl"))
    ess, ess_eval = _series(history, "ess"), _series(history, "ess_eval")
    lr, gnorm = _series(history, "lr"), _series(history, "grad_norm")

    def loss_panel(ax, main, label, colour, extra=None):
        s, v = main
        if s.size:
            ax.plot(s, v, lw=0.6, alpha=0.35, color=colour, label=f"{label} (per step)")
            if window > 1:
                ax.plot(s, moving_average(v, window), lw=1.4, color=colour, label=f"{label} (avg)")
        if extra is not None and extra[0].size:
            ax.plot(*extra, "o-", ms=3, lw=1, color="C3", label="validation NLL")
        _robust_ylim(ax, v, *(() if extra is None else (extra[1],)))
        ax.set_ylabel(f"{label} (kT)")

    panels = []
    if nll[0].size or val[0].size:
        panels.append(lambda ax: loss_panel(ax, nll, "NLL", "C0", val))
    if kl[0].size:
        panels.append(lambda ax: loss_panel(ax, kl, "reverse KL", "C1"))

    def ess_panel(ax):
        s, v = ess
        if s.size:
            ax.plot(s, v, lw=0.5, alpha=0.3, color="C2", label="ESS (training batch)")
            ax.plot(
                s, moving_average(v, window), lw=1.4, color="C2", label=f"avg over {window} steps"
            )
        if ess_eval[0].size:
            ax.plot(*ess_eval, "o-", ms=3, lw=1, color="C4", label="ESS (evaluation)")
        top = max([float(x.max()) for x in (ess[1], ess_eval[1]) if x.size] + [1e-3])
        ax.set_ylim(0, min(1.02, 1.15 * top))  # small ESS values stay readable
        ax.set_ylabel("normalised ESS")

    if ess[0].size or ess_eval[0].size:
        panels.append(ess_panel)

    def positive_panel(ax, series, label, colour, smoothed=False):
        s, v = series
        if smoothed and window > 1:
            ax.plot(s, v, lw=0.6, alpha=0.35, color=colour, label=f"{label} (per step)")
            ax.plot(s, moving_average(v, window), lw=1.4, color=colour, label=f"{label} (avg)")
        else:
            ax.plot(s, v, lw=1, color=colour, label=label)
        if (v > 0).all():
            ax.set_yscale("log")
        ax.set_ylabel(label)

    if lr[0].size:
        panels.append(lambda ax: positive_panel(ax, lr, "learning rate", "C5"))
    if gnorm[0].size:
        panels.append(lambda ax: positive_panel(ax, gnorm, "gradient norm", "C7", True))

    n_panels = max(len(panels), 1)
    fig, axes = plt.subplots(
        n_panels, 1, figsize=(8, 2.4 * n_panels + 0.6), sharex=True, squeeze=False
    )
    axes = axes[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, "no data", ha="center", va="center", transform=axes[0].transAxes)
    starts = _phase_starts(history)
    for ax, draw in zip(axes, panels):
        draw(ax)
        for step, _ in starts[1:]:  # boundaries: where the phase changes
            ax.axvline(step, color="0.4", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="best")
    if panels:
        tr = axes[0].get_xaxis_transform()
        for step, name in starts:
            if name:
                axes[0].text(step, 1.01, f" {name}", transform=tr, fontsize="small", va="bottom")
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
