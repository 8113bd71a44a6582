"""Ring geometry of samples against MD: is every ring closed and undistorted?

A generator on internal coordinates can break a ring silently: the ring-closing bond
is not one of its features unless the rings are handled (see
:mod:`bgflow_mini.coordinates.rings`). :func:`ring_bond_stats` compares the length
distribution of every ring bond in generator samples with MD frames.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .coordinates.rings import ring_systems

__all__ = ["ring_bonds", "ring_bond_stats"]


def ring_bonds(topology: Any) -> list[tuple[int, int]]:
    """Bonds ``(i, j)`` with both atoms in one ring system of an mdtraj/OpenMM topology
    (each ring bond once; fused rings included)."""
    from .coordinates.zmatrix import bond_graph

    n, bonds, _ = bond_graph(topology)
    member = {}
    for k, system in enumerate(ring_systems(bonds, n)):
        for a in system:
            member[a] = k
    return [
        (int(i), int(j))
        for i, j in bonds
        if int(i) in member and member[int(i)] == member.get(int(j), -1)
    ]


def _atoms(topology: Any) -> list:
    return list(topology.atoms() if callable(topology.atoms) else topology.atoms)


def _names(topology: Any) -> list[str]:
    out = []
    for a in _atoms(topology):
        res = a.residue
        out.append(f"{res.name}{getattr(res, 'resSeq', getattr(res, 'id', ''))}-{a.name}")
    return out


def ring_bond_stats(
    x: np.ndarray, reference: np.ndarray, topology: Any, finite: np.ndarray | None = None
) -> dict[str, Any]:
    """Length statistics of every ring bond in samples ``x`` vs ``reference`` (MD).

    Arguments:
        x: generator samples ``(n, 3 * n_atoms)`` nm (unweighted: what the generator
            draws).
        reference: MD frames ``(m, 3 * n_atoms)`` nm.
        topology: mdtraj or OpenMM topology.
        finite: optional bool ``(n,)``, samples to use (e.g. those with finite energy).

    Returns:
        ``{}`` without rings, else ``{"n_ring_bonds", "max_std_ratio", "min_std_ratio",
        "max_mean_rel_error", "bonds": {name: {"mean", "std", "md_mean", "md_std",
        "std_ratio", "mean_rel_error", "off_5pct": fraction more than 5 % off MD's
        mean, "md_off_5pct"}}}`` with lengths in nm.
    """
    pairs = ring_bonds(topology)
    if not pairs:
        return {}
    names = _names(topology)
    xyz = np.asarray(x, dtype=np.float64).reshape(len(x), -1, 3)
    if finite is not None:
        xyz = xyz[np.asarray(finite, dtype=bool)]
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1, 3)
    i, j = np.asarray(pairs).T
    d = np.linalg.norm(xyz[:, i] - xyz[:, j], axis=-1)
    d_ref = np.linalg.norm(ref[:, i] - ref[:, j], axis=-1)
    bonds = {}
    for k, (a, b) in enumerate(pairs):
        mu, sd = float(d_ref[:, k].mean()), float(d_ref[:, k].std())
        g_mu, g_sd = float(d[:, k].mean()), float(d[:, k].std())
        bonds[f"{names[a]}-{names[b].split('-')[-1]}"] = {
            "mean": g_mu,
            "std": g_sd,
            "md_mean": mu,
            "md_std": sd,
            "std_ratio": g_sd / sd if sd > 0 else float("inf"),
            "mean_rel_error": (g_mu - mu) / mu,
            "off_5pct": float((np.abs(d[:, k] / mu - 1) > 0.05).mean()),
            "md_off_5pct": float((np.abs(d_ref[:, k] / mu - 1) > 0.05).mean()),
        }
    ratios = [v["std_ratio"] for v in bonds.values()]
    return {
        "n_ring_bonds": len(pairs),
        "max_std_ratio": max(ratios),
        "min_std_ratio": min(ratios),
        "max_mean_rel_error": max(abs(v["mean_rel_error"]) for v in bonds.values()),
        "bonds": bonds,
    }
