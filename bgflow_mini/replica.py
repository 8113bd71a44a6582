"""Replica-exchange engine: Langevin contexts, Metropolis swaps and worker processes.

:func:`run_replicas` drives ``n`` replicas at temperatures ``T_0 < T_1 < ... < T_{n-1}`` (K).
Each replica is one ``openmm.Context`` with a ``LangevinMiddleIntegrator``. Every
``swap_every`` steps, neighbour pairs ``(i, i+1)`` are proposed for exchange, alternating
even pairs ``(0,1), (2,3), ...`` and odd pairs ``(1,2), (3,4), ...``, and accepted with
probability ``min(1, exp((beta_i - beta_j) (U_i - U_j)))`` where ``U`` is the potential
energy (kJ/mol) of the configuration currently at temperature ``T_i``.

Swaps exchange *configurations*: temperature slot ``i`` always runs at ``T_i``; on an
accepted swap, positions move between slots and velocities are rescaled by
``sqrt(T_new / T_old)`` so that they stay Maxwell-Boltzmann at the new temperature.
Slot 0 therefore always holds equilibrium samples at the target temperature ``T_0``.

Replicas are split over worker processes when ``n_workers > 1``
(:mod:`bgflow_mini.replica_workers`: ``multiprocessing``'s ``forkserver`` context, ``spawn``
where forkserver is missing; the System travels as XML); otherwise all contexts live in this
process. With ``checkpoint=`` the frames go to disk as they are made and the run can be
resumed after a crash (:mod:`bgflow_mini.md_checkpoint`). Runs are
reproducible for a fixed (seed, n_workers, platform) on the Reference platform. Changing
``n_workers`` changes the noise: OpenMM's Reference platform draws the Langevin noise of
all contexts in one process from a single shared random stream.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from typing import Any

import numpy as np
import openmm
from tqdm import tqdm

from .md_checkpoint import MDCheckpoint
from .replica_workers import LocalHandle, ProcessHandle, ReplicaGroup, mp_context
from .units import kt_kjmol

__all__ = ["ReplicaGroup", "available_cores", "replica_seeds", "run_replicas"]

_log = logging.getLogger(__name__)


def available_cores() -> int:
    """Number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def replica_seeds(seed: int, n_replicas: int, resumed_at: int | None = None) -> np.ndarray:
    """Nonzero 31-bit seeds, shape ``(n_replicas, 2)``: (integrator, velocities) per replica;
    ``resumed_at`` (a chunk index) gives a run resumed there a stream of its own.

    OpenMM treats seed 0 as "pick a random seed", so 0 is never returned.
    """
    entropy = int(seed) if resumed_at is None else [int(seed), int(resumed_at), 104_729]
    raw = np.random.SeedSequence(entropy).generate_state(2 * n_replicas, dtype=np.uint32)
    return (raw.astype(np.int64) % (2**31 - 2) + 1).reshape(n_replicas, 2)


def _log_tenth(done: int, total: int, chunk: int, elapsed: float, done_before: int = 0) -> None:
    """One INFO line at each tenth of the run's chunks (of ``chunk`` steps): ``done`` of the
    ``total`` chunks this call runs, after ``done_before`` from before a resume, with the
    time spent (``elapsed``, s) and the time left at that pace: the sign of life of a long
    run whose progress bar is off (log files, cluster jobs)."""
    n, all_ = done + done_before, total + done_before
    if total < 1 or n * 10 // all_ == (n - 1) * 10 // all_:
        return
    left = elapsed * (total - done) / done
    _log.info(
        "MD: %d %% of %s steps per replica, %.1f min so far, about %.1f min left",
        100 * n // all_, f"{all_ * chunk:,}", elapsed / 60, left / 60,
    )  # fmt: skip


def run_replicas(
    system: openmm.System,
    positions: np.ndarray,
    temperatures: list[float],
    n_frames: int,
    save_every: int,
    swap_every: int | None = 500,
    timestep: float = 0.001,
    friction: float = 1.0,
    seed: int = 0,
    platform: str = "Reference",
    platform_properties: dict[str, str] | None = None,
    minimize: bool = True,
    equilibration_steps: int = 0,
    n_workers: int | None = None,
    keep_all: bool = False,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
    keep_checkpoint: bool = False,
) -> dict[str, Any]:
    """Run plain Langevin MD (one temperature) or replica exchange (several).

    Steps advance in chunks of ``gcd(save_every, swap_every)``; equilibration (rounded up
    to whole chunks) includes swaps, and all statistics are reset afterwards. ``progress``
    shows a progress bar; without it, one INFO line of the ``bgflow_mini.replica`` logger
    at each tenth of the run says how far it is and about how long is left.

    ``checkpoint``: a folder (:class:`bgflow_mini.md_checkpoint.MDCheckpoint`) that holds
    the frames as they are made and, at most every ``checkpoint_every`` seconds, the run's
    state; a call with the same arguments and folder after a crash goes on from there (the
    Langevin noise from new seeds: a statistically equivalent continuation). The folder is
    deleted when the run completes, unless ``keep_checkpoint``: then it holds the finished
    run (the same call returns it again without MD) until the caller has stored the result
    and deletes it (:func:`bgflow_mini.md_checkpoint.remove_checkpoint`). The checkpoint's
    signature includes a hash of the OpenMM System and of the starting positions, so a
    checkpoint of another force field or structure is refused.

    Returns a dict with ``positions`` (``(n_frames, n_atoms, 3)`` float32 nm, slot 0, or
    ``(n_replicas, n_frames, n_atoms, 3)`` when ``keep_all``), ``potential`` and
    ``kinetic`` (kJ/mol, ``(n_replicas, n_frames)``), ``walkers`` (which walker sat in each
    slot, ``(n_replicas, n_frames)`` int), ``swap_attempts``/``swap_accepts``
    (``(n_replicas - 1,)``), ``round_trips``, timing numbers and ``resumed_at_steps`` (the
    steps at which a checkpointed run was resumed; empty for one that was not).
    """
    temps = np.asarray([float(t) for t in temperatures])
    n_rep = len(temps)
    if n_rep < 1 or np.any(np.diff(temps) <= 0) or temps[0] <= 0:
        raise ValueError(f"temperatures must be positive and increasing, got {temps.tolist()}")
    if n_frames < 1 or save_every < 1:
        raise ValueError(f"need n_frames >= 1 and save_every >= 1, got {n_frames}, {save_every}")
    swapping = n_rep > 1 and swap_every is not None and swap_every > 0
    chunk = math.gcd(int(save_every), int(swap_every)) if swapping else int(save_every)
    n_eq_chunks = -(-int(equilibration_steps) // chunk)
    n_prod_chunks = n_frames * save_every // chunk
    betas = np.array([1.0 / kt_kjmol(t) for t in temps])  # 1 / (R T), mol/kJ
    positions = np.asarray(positions, dtype=np.float64)
    n_atoms = positions.shape[0]

    if n_workers is None:
        n_workers = min(available_cores(), n_rep)
    n_workers = max(1, min(int(n_workers), n_rep))
    if platform == "CPU" and n_workers > 1 and platform_properties is None:
        platform_properties = {"Threads": "1"}  # one thread per worker, no oversubscription
    slots = np.array_split(np.arange(n_rep), n_workers)
    owner = np.empty(n_rep, dtype=int)
    local = np.empty(n_rep, dtype=int)
    for g, idx in enumerate(slots):
        owner[idx] = g
        local[idx] = np.arange(len(idx))
    shape = (n_rep, n_frames, n_atoms, 3) if keep_all else (n_frames, n_atoms, 3)
    arrays = {
        "positions": (shape, np.float32),
        "potential": ((n_rep, n_frames), np.float64),
        "kinetic": ((n_rep, n_frames), np.float64),
        "walkers": ((n_rep, n_frames), np.int64),
    }
    ckpt, resume = None, None
    if checkpoint is not None:
        signature = {
            "temperatures": temps.tolist(), "n_frames": int(n_frames),
            "save_every": int(save_every), "swap_every": int(swap_every) if swapping else None,
            "timestep": float(timestep), "friction": float(friction), "seed": int(seed),
            "platform": platform, "minimize": bool(minimize),
            "equilibration_steps": int(equilibration_steps), "keep_all": bool(keep_all),
            "n_atoms": int(n_atoms), "positions_sha256": _sha256(positions.tobytes()),
            "system_sha256": _sha256(openmm.XmlSerializer.serialize(system).encode()),
        }  # fmt: skip
        n_pairs, xyz_shape = (max(n_rep - 1, 0),), (n_rep, n_atoms, 3)
        state_spec = {
            "chunk": (), "frame": (), "attempts": n_pairs, "accepts": n_pairs,
            "walker": (n_rep,), "direction": (n_rep,), "round_trips": (),
            "n_swap_rounds": (), "xyz": xyz_shape, "vel": xyz_shape, "resumed_at": None,
            "production_time_s": (),
        }  # fmt: skip
        ckpt = MDCheckpoint(checkpoint, signature, arrays, state_spec)
        resume = ckpt.open()  # checked: every entry there, with its shape
    start = 0 if resume is None else int(resume["chunk"])
    seeds = replica_seeds(seed, n_rep, None if resume is None else start)
    if resume is not None:
        minimize = False  # the saved positions and velocities replace the start
    common = dict(
        positions=positions,
        timestep=float(timestep),
        friction=float(friction),
        platform=platform,
        platform_properties=platform_properties,
        minimize=minimize,
    )

    t_start = time.perf_counter()
    handles: list[LocalHandle | ProcessHandle] = []
    try:
        if n_workers > 1:
            ctx = mp_context()
            xml = openmm.XmlSerializer.serialize(system)
            for idx in slots:
                kw = dict(common, system=xml, temperatures=temps[idx].tolist(), seeds=seeds[idx])
                handles.append(ProcessHandle(ctx, kw))
            for h in handles:
                h.result()  # wait for set-up, surface errors
        else:
            kw = dict(common, system=system, temperatures=temps.tolist(), seeds=seeds)
            handles.append(LocalHandle(kw))
        t_setup = time.perf_counter() - t_start

        if ckpt is not None:
            out_pos, out_pot, out_kin, out_walk = (ckpt.arrays[k] for k in arrays)
        else:
            out_pos, out_pot, out_kin, out_walk = (np.zeros(s, d) for s, d in arrays.values())
        attempts = np.zeros(max(n_rep - 1, 0), dtype=np.int64)
        accepts = np.zeros_like(attempts)
        walker = np.arange(n_rep)  # walker id currently in each slot
        direction = np.zeros(n_rep, dtype=np.int64)  # per walker: +1 visited T_0 last, -1 T_max
        round_trips = 0
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7919]))
        pending: list[dict[int, tuple[np.ndarray, np.ndarray]]] = [{} for _ in handles]
        n_swap_rounds = 0
        frame = 0
        t_prod = 0.0
        resumed_at: list[int] = []
        if resume is not None:
            attempts[:], accepts[:] = resume["attempts"], resume["accepts"]
            walker[:], direction[:] = resume["walker"], resume["direction"]
            round_trips, n_swap_rounds = int(resume["round_trips"]), int(resume["n_swap_rounds"])
            frame = int(resume["frame"])
            rng.bit_generator.state = resume["rng"]
            resumed_at = [int(v) for v in resume["resumed_at"]] + [start * chunk]
            t_prod = time.perf_counter() - float(resume["production_time_s"])
            for s_ in range(n_rep):  # every replica where the checkpoint left it
                pending[owner[s_]][int(local[s_])] = (resume["xyz"][s_], resume["vel"][s_])
            _log.info("MD: resuming %s at step %s of %s per replica (%d frames kept)",
                      checkpoint, f"{start * chunk:,}",
                      f"{(n_eq_chunks + n_prod_chunks) * chunk:,}", frame)  # fmt: skip
        t_saved = time.perf_counter()
        bar = tqdm(
            initial=start,
            total=n_eq_chunks + n_prod_chunks,
            disable=not progress,
            desc=f"MD {n_rep} replica(s)",
            unit="chunk",
            mininterval=0.5,
        )
        for c in range(start, n_eq_chunks + n_prod_chunks):
            if c == n_eq_chunks:
                attempts[:] = 0
                accepts[:] = 0
                round_trips = 0
                t_prod = time.perf_counter()
            in_prod = c >= n_eq_chunks
            save = in_prod and ((c - n_eq_chunks + 1) * chunk) % save_every == 0
            swap = swapping and ((c + 1) * chunk) % swap_every == 0
            for g, h in enumerate(handles):
                h.submit(chunk, pending[g], save or swap)
            pending = [{} for _ in handles]
            res = [h.result() for h in handles]
            pot = np.concatenate([r["potential"] for r in res])
            if save:
                kin = np.concatenate([r["kinetic"] for r in res])
            if save or swap:
                xyz = np.concatenate([r["positions"] for r in res])
                vel = np.concatenate([r["velocities"] for r in res])
            if save:
                if keep_all:
                    out_pos[:, frame] = xyz
                else:
                    out_pos[frame] = xyz[0]
                out_pot[:, frame] = pot
                out_kin[:, frame] = kin
                out_walk[:, frame] = walker
                frame += 1
            if swap:
                for i in range(n_swap_rounds % 2, n_rep - 1, 2):
                    j = i + 1
                    attempts[i] += 1
                    log_acc = (betas[i] - betas[j]) * (pot[i] - pot[j])
                    if log_acc >= 0 or rng.random() < math.exp(log_acc):
                        accepts[i] += 1
                        xi, vi = xyz[i].copy(), vel[i] * math.sqrt(temps[j] / temps[i])
                        xyz[i], vel[i] = xyz[j], vel[j] * math.sqrt(temps[i] / temps[j])
                        xyz[j], vel[j] = xi, vi
                        pot[i], pot[j] = pot[j], pot[i]
                        walker[i], walker[j] = walker[j], walker[i]
                        for s in (i, j):
                            pending[owner[s]][int(local[s])] = (xyz[s].copy(), vel[s].copy())
                n_swap_rounds += 1
                if n_rep > 1:
                    if in_prod and direction[walker[0]] == -1:
                        round_trips += 1
                    direction[walker[0]] = 1
                    direction[walker[-1]] = -1
            bar.update(1)
            now = time.perf_counter()
            last = c + 1 == n_eq_chunks + n_prod_chunks
            if ckpt is not None and (
                (last and keep_checkpoint)
                or ((save or swap) and not last and now - t_saved >= checkpoint_every)
            ):
                state = {
                    "chunk": c + 1, "frame": frame, "attempts": attempts, "accepts": accepts,
                    "walker": walker, "direction": direction, "round_trips": round_trips,
                    "n_swap_rounds": n_swap_rounds, "xyz": xyz, "vel": vel,
                    "resumed_at": np.asarray(resumed_at, dtype=np.int64),
                    "production_time_s": now - t_prod if in_prod else 0.0,
                }  # fmt: skip
                ckpt.save(state, rng.bit_generator.state)
                t_saved = now
            if not progress:
                _log_tenth(c + 1 - start, n_eq_chunks + n_prod_chunks - start, chunk,
                           now - t_start, done_before=start)  # fmt: skip
        bar.close()
    except BaseException:
        if ckpt is not None:
            ckpt.close()  # its files stay for the resume; the folder is free again
        raise
    finally:
        for h in handles:
            h.close()
    t_end = time.perf_counter()
    if ckpt is not None:
        out_pos, out_pot, out_kin, out_walk = ckpt.load_arrays().values()
        if keep_checkpoint:
            ckpt.close()
        else:
            ckpt.remove()
    return {
        "positions": out_pos,
        "potential": out_pot,
        "kinetic": out_kin,
        "walkers": out_walk,
        "swap_attempts": attempts,
        "swap_accepts": accepts,
        "round_trips": int(round_trips),
        "n_workers": n_workers,
        "setup_time_s": t_setup,
        "production_time_s": t_end - t_prod if n_prod_chunks else 0.0,
        "wall_time_s": t_end - t_start,
        "equilibration_steps": n_eq_chunks * chunk,
        "production_steps": n_prod_chunks * chunk,
        "resumed_at_steps": resumed_at,
    }


def _sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (what a checkpoint's signature records of big inputs)."""
    return hashlib.sha256(data).hexdigest()
