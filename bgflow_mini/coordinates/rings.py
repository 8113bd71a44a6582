"""Rings in a Z-matrix: ring atoms as Cartesian coordinates in a local frame.

A Z-matrix places every atom by a bond, an angle and a torsion, so a ring's closing
bond is implicit: it is only right when the flow gets several torsions and angles of
the ring right together. A proline ring from the default recipe came out with a
closing-bond spread 2.6 times that of MD this way (see BENCHMARKS.md).

:func:`ring_zmatrix` makes ring geometry as easy as any bond. For each ring system
(fused rings are one system) the first two placed ring atoms ``r0, r1`` and one more
placed atom ``q`` bonded to them define a frame; every other atom of the system is
placed by its Cartesian coordinates in that frame (a *Cartesian row*, see
:class:`~bgflow_mini.coordinates.internal.InternalCoordinates`). The ring's shape is
then a small set of nearly Gaussian coordinates in one frame (whitened together by
:class:`~bgflow_mini.coordinates.whitening.Whiten`), every ring bond, the closing one
included, is a near-linear function of them, and the soft degrees of freedom (the
torsion that turns the ring, e.g. chi2 of Phe) stay torsions. A rotation to a local
frame has Jacobian 1, so the transform stays exact and its log-det simple.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .zmatrix import _angle, _as_positions, bond_graph, validate_zmatrix

__all__ = ["ring_systems", "ring_zmatrix"]


def _bridges(n: int, adj: list[list[int]]) -> set[frozenset]:
    """Bonds whose removal disconnects the graph (iterative Tarjan, O(atoms + bonds))."""
    disc = [-1] * n
    low = [0] * n
    out: set[frozenset] = set()
    t = 0
    for s in range(n):
        if disc[s] >= 0:
            continue
        disc[s] = low[s] = t
        t += 1
        stack = [(s, -1, iter(adj[s]))]
        while stack:
            u, parent, it = stack[-1]
            v = next(it, None)
            if v is None:
                stack.pop()
                if parent >= 0:
                    low[parent] = min(low[parent], low[u])
                    if low[u] > disc[parent]:
                        out.add(frozenset((u, parent)))
                continue
            if v == parent:
                continue
            if disc[v] < 0:
                disc[v] = low[v] = t
                t += 1
                stack.append((v, u, iter(adj[v])))
            else:
                low[u] = min(low[u], disc[v])
    return out


def _shortest_cycle(adj: list[list[int]], i: int, j: int, limit: int) -> list[int] | None:
    """Atoms of the shortest cycle through bond ``i-j`` with at most ``limit`` atoms."""
    parent = {i: -1}
    frontier = [i]
    for _ in range(limit - 1):
        nxt = []
        for u in frontier:
            for v in adj[u]:
                if v in parent or (u == i and v == j):
                    continue
                parent[v] = u
                if v == j:
                    path = [j]
                    while path[-1] != i:
                        path.append(parent[path[-1]])
                    return path
                nxt.append(v)
        frontier = nxt
    return None


def ring_systems(
    topology_or_bonds: Any, n_atoms: int | None = None, max_ring_size: int = 8
) -> list[list[int]]:
    """Atoms of each system of small rings (rings sharing atoms merged), sorted, in order
    of the smallest atom index.

    A bond is in a small ring when the shortest cycle through it has at most
    ``max_ring_size`` atoms (3- to 8-membered by default: every ring of the amino acids);
    macrocycles, e.g. a loop closed by a disulfide bond, are no rings here: their atoms
    keep internal coordinates.

    Arguments:
        topology_or_bonds: mdtraj/OpenMM topology or integer bonds ``(n_bonds, 2)``.
        n_atoms: number of atoms for a bond list.
        max_ring_size: largest ring (atoms) that counts.

    Returns:
        a list of sorted atom-index lists, each of at least 3 atoms; empty without rings.
    """
    n, bonds, _ = bond_graph(topology_or_bonds, n_atoms)
    adj: list[list[int]] = [[] for _ in range(n)]
    for i, j in bonds:
        adj[int(i)].append(int(j))
        adj[int(j)].append(int(i))
    bridges = _bridges(n, adj)
    root = list(range(n))  # union-find over the atoms of small rings

    def find(a: int) -> int:
        while root[a] != a:
            root[a] = root[root[a]]
            a = root[a]
        return a

    in_ring = np.zeros(n, dtype=bool)
    for i, j in bonds:
        i, j = int(i), int(j)
        if frozenset((i, j)) in bridges:
            continue
        cycle = _shortest_cycle(adj, i, j, max_ring_size)
        if cycle is None:
            continue
        in_ring[cycle] = True
        for a in cycle[1:]:
            root[find(a)] = find(cycle[0])
    groups: dict[int, list[int]] = {}
    for a in np.flatnonzero(in_ring):
        groups.setdefault(find(int(a)), []).append(int(a))
    return sorted((sorted(g) for g in groups.values() if len(g) >= 3), key=lambda g: g[0])


def ring_zmatrix(
    zmatrix: Any,
    topology_or_bonds: Any,
    positions: Any = None,
    *,
    min_angle_deg: float = 5.0,
    max_ring_size: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn the ring atoms of a Z-matrix into Cartesian rows in a per-ring-system frame.

    For each ring system (:func:`ring_systems`, small rings only), in placement order:
    ``r0, r1`` are its first two placed atoms, ``q`` the earliest placed atom among those
    bonded to ``r0`` or ``r1`` (heavy atoms first) and placed before the system's third
    atom. Every later atom of the
    system (at row 3 or later) gets the row ``(atom, r0, r1, q)`` and is marked
    Cartesian. If no such ``q`` exists (the ring starts the Z-matrix), the third ring atom
    stays an internal-coordinate row and serves as ``q``. The placement order is kept,
    so every other row stays valid.

    Arguments:
        zmatrix: ``(N, 4)`` Z-matrix (e.g. from :func:`build_zmatrix`).
        topology_or_bonds: the molecule's bonds (topology or ``(n_bonds, 2)``).
        positions: optional reference structure ``(N, 3)`` nm; frames within
            ``min_angle_deg`` of collinear are avoided.
        max_ring_size: see :func:`ring_systems`.

    Returns:
        ``(zmatrix, cartesian)``: the new Z-matrix and a bool array ``(N,)`` by row.
    """
    z = validate_zmatrix(zmatrix).copy()
    n, bonds, is_h = bond_graph(topology_or_bonds, None)
    if n != len(z):
        raise ValueError(f"zmatrix has {len(z)} atoms but the topology has {n}")
    pos = _as_positions(positions, n)
    tol = np.deg2rad(min_angle_deg)
    adj: list[set[int]] = [set() for _ in range(n)]
    for i, j in bonds:
        adj[int(i)].add(int(j))
        adj[int(j)].add(int(i))
    rank = np.empty(n, dtype=np.int64)
    rank[z[:, 0]] = np.arange(n)
    cartesian = np.zeros(n, dtype=bool)
    for system in ring_systems(bonds, n, max_ring_size):
        members = sorted(system, key=lambda a: rank[a])
        r0, r1 = members[0], members[1]

        def ok(c: int, r0: int = r0, r1: int = r1) -> bool:
            if pos is None:
                return True
            a = _angle(pos, c, r1, r0)
            return tol < a < np.pi - tol

        limit = rank[members[2]]
        cands = [c for c in (adj[r0] | adj[r1]) - {r0, r1} if rank[c] < limit and ok(c)]
        cands.sort(key=lambda c: (bool(is_h[c]), rank[c]))
        if cands:
            q, rest = cands[0], members[2:]
        elif len(members) > 3 and ok(members[2]):
            q, rest = members[2], members[3:]
        else:
            continue  # no frame: the system keeps its internal coordinates
        for a in rest:  # placed after r0, r1 and q, so at row 3 or later
            row = rank[a]
            z[row, 1:] = (r0, r1, q)
            cartesian[row] = True
    return z, cartesian
