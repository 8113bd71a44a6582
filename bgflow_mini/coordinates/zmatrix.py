"""Z-matrices: which atoms define each atom's bond, angle and torsion.

A Z-matrix is an integer array of shape ``(n_atoms, 4)``; row ``i`` is
``(atom, bond_ref, angle_ref, torsion_ref)`` and the rows are in *placement
order*: every reference of row ``i`` is an atom of an earlier row.  Row 0 has
no references, row 1 only a bond reference and row 2 a bond and an angle
reference; missing references are ``-1``.  Row ``i >= 3`` defines

* bond ``|x_atom - x_bond_ref|`` (nm),
* angle ``angle(atom, bond_ref, angle_ref)`` (radians, in (0, pi)),
* torsion ``dihedral(atom, bond_ref, angle_ref, torsion_ref)`` (radians,
  IUPAC sign as in ``mdtraj.compute_dihedrals``).

:func:`build_zmatrix` builds one from a bond graph (heavy atoms first, grown
breadth-first from the most central heavy atom; hydrogens last, each on its heavy
atom), :func:`validate_zmatrix` checks a given one.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["build_zmatrix", "validate_zmatrix", "bond_graph"]


def bond_graph(
    topology_or_bonds: Any, n_atoms: int | None = None, hydrogens: Any = None
) -> tuple[int, np.ndarray, np.ndarray]:
    """Bonds and hydrogen flags of an mdtraj/OpenMM topology or a bond list.

    Arguments:
        topology_or_bonds: an ``mdtraj.Topology``, an ``openmm.app.Topology`` or an
            integer array-like of shape ``(n_bonds, 2)``.
        n_atoms: number of atoms (bond lists only; default ``max index + 1``).
        hydrogens: optional bool array ``(n_atoms,)`` marking hydrogens; by default
            taken from the topology's elements (all atoms count as heavy for a bond list).

    Returns:
        ``(n_atoms, bonds, is_hydrogen)`` with ``bonds`` of shape ``(n_bonds, 2)`` int.
    """
    if hasattr(topology_or_bonds, "getNumAtoms"):  # openmm.app.Topology
        top = topology_or_bonds
        n = top.getNumAtoms()
        bonds = [(b[0].index, b[1].index) for b in top.bonds()]
        is_h = [a.element is not None and a.element.symbol == "H" for a in top.atoms()]
    elif hasattr(topology_or_bonds, "n_atoms") and hasattr(topology_or_bonds, "atoms"):
        top = topology_or_bonds  # mdtraj.Topology
        n = top.n_atoms
        bonds = [(b[0].index, b[1].index) for b in top.bonds]
        is_h = [a.element is not None and a.element.symbol == "H" for a in top.atoms]
    else:
        arr = np.asarray(topology_or_bonds)
        if arr.size == 0:
            arr = arr.reshape(0, 2)
        if arr.ndim != 2 or arr.shape[1] != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"bonds must be an integer array of shape (n_bonds, 2), got {arr.dtype} {arr.shape}"
            )
        n = int(arr.max()) + 1 if n_atoms is None and arr.size else int(n_atoms or 0)
        bonds = [tuple(int(v) for v in b) for b in arr]
        is_h = [False] * n
    if n_atoms is not None and int(n_atoms) != n:
        raise ValueError(f"n_atoms={n_atoms} does not match the topology's {n} atoms")
    bonds_arr = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
    if bonds_arr.size and (bonds_arr.min() < 0 or bonds_arr.max() >= n):
        lo, hi = bonds_arr.min(), bonds_arr.max()
        raise ValueError(f"bond indices must lie in [0, {n}), got {lo}..{hi}")
    if np.any(bonds_arr[:, 0] == bonds_arr[:, 1]):
        raise ValueError("a bond connects an atom to itself")
    if hydrogens is not None:
        is_h = np.asarray(hydrogens, dtype=bool)
        if is_h.shape != (n,):
            raise ValueError(f"hydrogens must have shape ({n},), got {is_h.shape}")
    return n, bonds_arr, np.asarray(is_h, dtype=bool)


def _adjacency(n: int, bonds: np.ndarray) -> list[set[int]]:
    adj: list[set[int]] = [set() for _ in range(n)]
    for i, j in bonds:
        adj[int(i)].add(int(j))
        adj[int(j)].add(int(i))
    return adj


def _reachable(adj: list[set[int]], start: int, allowed: Iterable[int] | None = None) -> dict:
    """Graph distances from ``start`` within the ``allowed`` atoms (default: all)."""
    ok = None if allowed is None else set(allowed)
    dist = {start: 0}
    queue = deque([start])
    while queue:
        u = queue.popleft()
        for v in adj[u]:
            if v not in dist and (ok is None or v in ok):
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def _central_atom(adj: list[set[int]], is_h: np.ndarray) -> int:
    """Heavy atom of smallest eccentricity (ties: more heavy neighbours, lower index)."""
    n = len(adj)
    heavy = [i for i in range(n) if not is_h[i]] or list(range(n))
    if len(_reachable(adj, heavy[0], heavy)) != len(heavy):
        heavy = list(range(n))  # heavy atoms alone are not connected: use all atoms

    def key(i: int) -> tuple[int, int, int]:
        ecc = max(_reachable(adj, i, heavy).values())
        return (ecc, -sum(1 for j in adj[i] if not is_h[j]), i)

    return min(heavy, key=key)


def _angle(positions: np.ndarray, i: int, j: int, k: int) -> float:
    """Angle i-j-k in radians."""
    u = positions[i] - positions[j]
    v = positions[k] - positions[j]
    return float(np.arctan2(np.linalg.norm(np.cross(u, v)), np.dot(u, v)))


def _collinear(positions: np.ndarray | None, i: int, j: int, k: int, tol: float) -> bool:
    if positions is None:
        return False
    a = _angle(positions, i, j, k)
    return a < tol or a > np.pi - tol


def _as_positions(positions: Any, n: int) -> np.ndarray | None:
    if positions is None:
        return None
    if hasattr(positions, "value_in_unit"):  # openmm Quantity
        from openmm import unit

        positions = positions.value_in_unit(unit.nanometer)
    if hasattr(positions, "detach"):
        positions = positions.detach().cpu().numpy()
    pos = np.asarray(positions, dtype=np.float64)
    if pos.shape == (n * 3,):
        pos = pos.reshape(n, 3)
    if pos.shape != (n, 3):
        raise ValueError(f"positions must have shape ({n}, 3) in nm, got {pos.shape}")
    return pos


class _CollinearError(ValueError):
    pass


def _placement_order(
    adj: list[set[int]], is_h: np.ndarray, prefix: list[int], cache: dict
) -> tuple[list[int], dict[int, int]]:
    """Breadth-first growth from ``prefix`` (root first): heavy atoms before hydrogens;
    among the children of one atom the one with the larger heavy-atom branch comes first."""
    n = len(adj)
    rank: dict[int, int] = {}
    order: list[int] = []
    parent: dict[int, int] = {}

    def add(u: int, p: int | None) -> None:
        rank[u] = len(order)
        order.append(u)
        if p is not None:
            parent[u] = p

    def key(u: int) -> tuple:
        placed = [v for v in adj[u] if v in rank]
        p = min(placed, key=lambda v: (bool(is_h[v]), rank[v]))
        return (bool(is_h[u]), rank[p], -_branch(adj, is_h, u, p, cache), u), p

    heap: list = []

    def add_and_push(u: int, p: int | None) -> None:
        add(u, p)
        for v in adj[u]:
            if v not in rank:
                heapq.heappush(heap, key(v))

    add_and_push(prefix[0], None)
    for u in prefix[1:]:
        add_and_push(u, min((v for v in adj[u] if v in rank), key=lambda v: rank[v]))
    while len(order) < n:
        if not heap:
            raise ValueError("the bond graph is not connected")
        k, p = heapq.heappop(heap)
        u = k[-1]
        if u in rank or key(u) != (k, p):  # placed already, or a stale entry
            continue
        add_and_push(u, p)
    return order, parent


def _branch(adj: list[set[int]], is_h: np.ndarray, u: int, p: int, cache: dict) -> int:
    """Number of heavy atoms reachable from ``u`` without passing through ``p``."""
    if is_h[u]:
        return 0
    if (u, p) not in cache:
        heavy = [i for i in range(len(adj)) if not is_h[i] and i != p]
        cache[(u, p)] = len(_reachable(adj, u, heavy))
    return cache[(u, p)]


def _rows(
    adj: list[set[int]],
    is_h: np.ndarray,
    order: list[int],
    parent: dict[int, int],
    pos: np.ndarray | None,
    tol: float,
) -> np.ndarray:
    """Z-matrix rows for a placement order (see :func:`build_zmatrix`)."""
    n = len(order)
    rank = {a: k for k, a in enumerate(order)}

    def by_pref(atoms: Iterable[int]) -> list[int]:
        return sorted(atoms, key=lambda v: (bool(is_h[v]), rank[v]))

    b = parent[order[2]]
    c = order[0] if b == order[1] else order[1]
    if _collinear(pos, order[2], b, c, tol):
        raise _CollinearError(f"first three atoms {(order[2], b, c)} are collinear")
    rows = [(order[0], -1, -1, -1), (order[1], order[0], -1, -1), (order[2], b, c, -1)]
    placed = set(order[:3])

    def far(b: int, exclude: set[int]) -> list[int]:
        """Other placed atoms, nearest to ``b`` in the graph first (rarely needed)."""
        dist = _reachable(adj, b)
        key = lambda v: (dist.get(v, n), bool(is_h[v]), rank[v])  # noqa: E731
        return sorted(placed - exclude, key=key)

    for k in range(3, n):
        a = order[k]
        b = parent[a]
        chosen = None
        near = by_pref(adj[b] & placed)
        cands = near + [None]  # None: fall back to any other placed atom
        i = 0
        while chosen is None and i < len(cands):
            c = cands[i]
            i += 1
            if c is None:
                cands += by_pref(placed - set(near) - {b})
                continue
            if _collinear(pos, a, b, c, tol):
                continue
            siblings = by_pref((adj[b] & placed) - {c})
            proper = by_pref((adj[c] & placed) - {b})
            for d in siblings + proper + [None]:
                if d is None:
                    d = next(
                        (
                            v
                            for v in far(b, {b, c} | set(siblings) | set(proper))
                            if not _collinear(pos, b, c, v, tol)
                        ),
                        None,
                    )
                    if d is None:
                        break
                if not _collinear(pos, b, c, d, tol):
                    chosen = (c, d)
                    break
        placed.add(a)
        if chosen is None:
            raise _CollinearError(f"no non-collinear angle/torsion references for atom {a}")
        rows.append((a, b, chosen[0], chosen[1]))
    return np.asarray(rows, dtype=np.int64)


def build_zmatrix(
    topology_or_bonds: Any,
    n_atoms: int | None = None,
    positions: Any = None,
    *,
    hydrogens: Any = None,
    root: int | None = None,
    min_angle_deg: float = 5.0,
) -> np.ndarray:
    """Build a Z-matrix ``(n_atoms, 4)`` int from a bond graph.

    Placement: the first atom is the most central heavy atom (``root``), the next two
    are heavy neighbours; heavy atoms are then added breadth-first (larger branches
    first, so the backbone precedes side chains) and hydrogens last.  Each atom is
    bonded to its earliest placed neighbour ``b``; the angle reference is ``b``'s
    earliest placed heavy neighbour ``c``.  The torsion reference is, in order of
    preference, another placed neighbour of ``b`` (a narrow "improper" torsion, e.g.
    the 2nd/3rd methyl hydrogens relative to the 1st, or a carbonyl O relative to the
    next N), else a placed neighbour of ``c`` (a proper torsion such as phi/psi or a
    methyl rotation), else the nearest other placed atom.  If ``positions`` are given,
    reference choices whose triples are within ``min_angle_deg`` of collinear are
    skipped (for a collinear start, other 2nd/3rd atoms are tried), and the result is
    validated against them.

    Arguments:
        topology_or_bonds: ``mdtraj.Topology``, ``openmm.app.Topology`` or bonds
            ``(n_bonds, 2)``.
        n_atoms: number of atoms (for a bond list whose last atoms have no bonds this
            still fails: the graph must be connected).
        positions: optional reference structure ``(n_atoms, 3)`` in nm.
        hydrogens: optional bool mask of hydrogens (default: from elements; a bond list
            treats every atom as heavy).
        root: optional first atom.
        min_angle_deg: collinearity tolerance in degrees.

    Raises:
        ValueError: disconnected graph, fewer than 3 atoms, or no valid choice.
    """
    n, bonds, is_h = bond_graph(topology_or_bonds, n_atoms, hydrogens)
    if n < 3:
        raise ValueError(f"a Z-matrix needs at least 3 atoms, got {n}")
    pos = _as_positions(positions, n)
    tol = np.deg2rad(min_angle_deg)
    adj = _adjacency(n, bonds)
    if root is None:
        root = _central_atom(adj, is_h)
    if not 0 <= root < n:
        raise ValueError(f"root must be an atom index in [0, {n}), got {root}")
    root = int(root)
    missing = sorted(set(range(n)) - set(_reachable(adj, root)))
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise ValueError(
            f"the bond graph is not connected: {len(missing)} atoms unreachable from atom "
            f"{root} ({shown})"
        )

    cache: dict = {}

    def pref(atoms: Iterable[int], p: int) -> list[int]:
        return sorted(atoms, key=lambda v: (bool(is_h[v]), -_branch(adj, is_h, v, p, cache), v))

    prefixes: list[list[int]] = [[root]]
    for s in pref(adj[root], root):
        thirds = pref(adj[root] - {s}, root) + pref(adj[s] - {root}, s)
        prefixes += [[root, s, t] for t in thirds]
    error: Exception | None = None
    for prefix in prefixes:
        order, parent = _placement_order(adj, is_h, prefix, cache)
        try:
            zmatrix = _rows(adj, is_h, order, parent, pos, tol)
        except _CollinearError as err:
            error = err
            continue
        return validate_zmatrix(zmatrix, pos, (n, bonds), min_angle_deg=min_angle_deg)
    raise ValueError(f"could not build a Z-matrix without collinear triples: {error}")


def validate_zmatrix(
    zmatrix: Any,
    positions: Any = None,
    topology_or_bonds: Any = None,
    *,
    min_angle_deg: float = 5.0,
    cartesian: Any = None,
) -> np.ndarray:
    """Check a Z-matrix and return it as an ``(n_atoms, 4)`` int64 array.

    Checks that every atom ``0..n-1`` appears exactly once in column 0, that row ``i``
    has ``min(i, 3)`` references (the rest ``-1``), that references are distinct atoms
    placed in earlier rows, that each bond reference is bonded to its atom (if a
    topology / bond list, or a tuple ``(n_atoms, bonds)``, is given) and that no angle
    triple ``(atom, bond_ref, angle_ref)`` or ``(bond_ref, angle_ref, torsion_ref)`` is
    within ``min_angle_deg`` of collinear in ``positions`` (nm, ``(n_atoms, 3)``).
    Rows marked in ``cartesian`` (bool ``(n_atoms,)`` by row, rows >= 3 only; see
    :func:`~bgflow_mini.coordinates.rings.ring_zmatrix`) place their atom in the frame
    of their three references: only the references are checked.

    Raises:
        ValueError: naming the offending row.
    """
    z = np.asarray(zmatrix)
    if z.ndim != 2 or z.shape[1] != 4:
        raise ValueError(f"zmatrix must have shape (n_atoms, 4), got {z.shape}")
    if not np.issubdtype(z.dtype, np.integer) and not np.all(z == np.round(z)):
        raise ValueError("zmatrix entries must be integers")
    z = z.astype(np.int64)
    n = len(z)
    if n < 3:
        raise ValueError(f"zmatrix needs at least 3 rows (atoms), got {n}")
    atoms = z[:, 0]
    bad = np.flatnonzero((atoms < 0) | (atoms >= n))
    if bad.size:
        raise ValueError(f"zmatrix row {bad[0]}: atom {atoms[bad[0]]} is not in [0, {n})")
    counts = np.bincount(atoms, minlength=n)
    if np.any(counts != 1):
        dup = np.flatnonzero(counts > 1).tolist()
        missing = np.flatnonzero(counts == 0).tolist()
        raise ValueError(
            f"every atom must appear exactly once in column 0: duplicated {dup}, missing {missing}"
        )
    edges = None
    if topology_or_bonds is not None:
        if isinstance(topology_or_bonds, tuple) and len(topology_or_bonds) == 2:
            n_top, bonds = int(topology_or_bonds[0]), np.asarray(topology_or_bonds[1])
        else:
            n_top, bonds, _ = bond_graph(topology_or_bonds, None)
        if n_top != n:
            raise ValueError(f"zmatrix has {n} atoms but the topology has {n_top}")
        edges = {(int(i), int(j)) for i, j in bonds} | {(int(j), int(i)) for i, j in bonds}
    pos = _as_positions(positions, n)
    tol = np.deg2rad(min_angle_deg)
    cart = np.zeros(n, dtype=bool) if cartesian is None else np.asarray(cartesian, dtype=bool)
    if cart.shape != (n,):
        raise ValueError(f"cartesian must be a bool array of shape ({n},), got {cart.shape}")
    if cart[:3].any():
        raise ValueError("the first three rows of a Z-matrix cannot be Cartesian rows")
    placed: set[int] = set()
    for i, row in enumerate(z):
        a, refs = int(row[0]), [int(r) for r in row[1:]]
        n_refs = min(i, 3)
        if any(r < 0 for r in refs[:n_refs]) or any(r != -1 for r in refs[n_refs:]):
            raise ValueError(
                f"zmatrix row {i} (atom {a}): expected {n_refs} references followed by -1, "
                f"got {refs}"
            )
        used = refs[:n_refs]
        for r in used:
            if r not in placed:
                raise ValueError(
                    f"zmatrix row {i} (atom {a}): reference {r} is not placed in an earlier row"
                )
        if len(set(used + [a])) != n_refs + 1:
            raise ValueError(f"zmatrix row {i} (atom {a}): references {used} are not distinct")
        if edges is not None and n_refs >= 1 and not cart[i] and (a, used[0]) not in edges:
            raise ValueError(
                f"zmatrix row {i}: atom {a} is not bonded to its bond reference {used[0]}"
            )
        if pos is not None and n_refs >= 2:
            triples = [] if cart[i] else [(a, used[0], used[1])]
            triples += [tuple(used)] if n_refs == 3 else []
            for t in triples:
                if _collinear(pos, *t, tol):
                    raise ValueError(
                        f"zmatrix row {i} (atom {a}): atoms {t} are (near-)collinear, angle "
                        f"{np.rad2deg(_angle(pos, *t)):.2f} deg"
                    )
        placed.add(a)
    return z
