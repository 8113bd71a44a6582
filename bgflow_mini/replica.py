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

Replicas are split over worker processes when ``n_workers > 1`` (``multiprocessing``
``forkserver`` context with this module preloaded, ``spawn`` where forkserver is missing;
the System travels as XML); otherwise all contexts live in this process. Runs are
reproducible for a fixed (seed, n_workers, platform) on the Reference platform. Changing
``n_workers`` changes the noise: OpenMM's Reference platform draws the Langevin noise of
all contexts in one process from a single shared random stream.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import time
import traceback
from typing import Any

import numpy as np
import openmm
from openmm import unit
from tqdm import tqdm

from .units import kt_kjmol

__all__ = ["ReplicaGroup", "available_cores", "replica_seeds", "run_replicas"]

_log = logging.getLogger(__name__)


def available_cores() -> int:
    """Number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def replica_seeds(seed: int, n_replicas: int) -> np.ndarray:
    """Nonzero 31-bit seeds, shape ``(n_replicas, 2)``: (integrator, velocities) per replica.

    OpenMM treats seed 0 as "pick a random seed", so 0 is never returned.
    """
    raw = np.random.SeedSequence(int(seed)).generate_state(2 * n_replicas, dtype=np.uint32)
    return (raw.astype(np.int64) % (2**31 - 2) + 1).reshape(n_replicas, 2)


class ReplicaGroup:
    """The contexts of a subset of replicas, all in one process.

    Arguments:
        system: ``openmm.System`` or its XML serialisation.
        positions: starting positions, ``(n_atoms, 3)`` nm.
        temperatures: K, one per replica of this group.
        seeds: ``(n, 2)`` integrator and velocity seeds (see :func:`replica_seeds`).
        timestep: ps. friction: 1/ps.
        platform: OpenMM platform name; platform_properties: e.g. ``{"Threads": "1"}``.
        minimize: run ``LocalEnergyMinimizer`` before drawing velocities.
    """

    def __init__(
        self,
        system: openmm.System | str,
        positions: np.ndarray,
        temperatures: list[float],
        seeds: np.ndarray,
        timestep: float,
        friction: float,
        platform: str = "Reference",
        platform_properties: dict[str, str] | None = None,
        minimize: bool = True,
    ) -> None:
        if isinstance(system, str):
            system = openmm.XmlSerializer.deserialize(system)
        plat = openmm.Platform.getPlatformByName(platform)
        self.temperatures = [float(t) for t in temperatures]
        self.contexts: list[openmm.Context] = []
        self.integrators: list[openmm.LangevinMiddleIntegrator] = []
        for temp, (s_int, s_vel) in zip(self.temperatures, seeds, strict=True):
            integ = openmm.LangevinMiddleIntegrator(temp, friction, timestep)
            integ.setRandomNumberSeed(int(s_int))
            ctx = openmm.Context(system, integ, plat, dict(platform_properties or {}))
            ctx.setPositions(np.asarray(positions, dtype=np.float64))
            if minimize:
                openmm.LocalEnergyMinimizer.minimize(ctx)
            ctx.setVelocitiesToTemperature(temp, int(s_vel))
            self.contexts.append(ctx)
            self.integrators.append(integ)

    def advance(
        self,
        n_steps: int,
        new_states: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
        want_coordinates: bool = True,
    ) -> dict[str, np.ndarray | None]:
        """Set swapped states, run ``n_steps`` on every replica, return their states.

        ``new_states`` maps a local replica index to (positions nm, velocities nm/ps).
        Returns ``potential`` and ``kinetic`` (kJ/mol, shape ``(n,)``) and, when
        ``want_coordinates``, ``positions`` and ``velocities`` of shape ``(n, n_atoms, 3)``.
        """
        for k, (pos, vel) in (new_states or {}).items():
            self.contexts[k].setPositions(pos)
            self.contexts[k].setVelocities(vel)
        pot, kin, xs, vs = [], [], [], []
        for ctx, integ in zip(self.contexts, self.integrators, strict=True):
            if n_steps > 0:
                integ.step(int(n_steps))
            state = ctx.getState(
                getEnergy=True, getPositions=want_coordinates, getVelocities=want_coordinates
            )
            pot.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
            kin.append(state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))
            if want_coordinates:
                xs.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
                vs.append(
                    state.getVelocities(asNumpy=True).value_in_unit(
                        unit.nanometer / unit.picosecond
                    )
                )
        return {
            "potential": np.asarray(pot),
            "kinetic": np.asarray(kin),
            "positions": np.asarray(xs) if want_coordinates else None,
            "velocities": np.asarray(vs) if want_coordinates else None,
        }


def _worker_main(conn: Any, kwargs: dict[str, Any]) -> None:
    """Worker process loop: build a :class:`ReplicaGroup`, then serve ``advance`` calls."""
    try:
        group = ReplicaGroup(**kwargs)
        conn.send(("ok", None))
    except Exception:  # forwarded to the parent
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            break
        try:
            conn.send(("ok", group.advance(*msg)))
        except Exception:  # forwarded to the parent
            conn.send(("error", traceback.format_exc()))
    conn.close()


class _LocalHandle:
    """In-process stand-in for a worker: same submit/result protocol."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.group = ReplicaGroup(**kwargs)
        self._result: Any = None

    def submit(self, *args: Any) -> None:
        self._result = self.group.advance(*args)

    def result(self) -> Any:
        return self._result

    def close(self) -> None:
        self.group = None  # type: ignore[assignment]


class _ProcessHandle:
    """A worker process owning some replicas; talks over a pipe."""

    def __init__(self, ctx: Any, kwargs: dict[str, Any]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, kwargs), daemon=True)
        self.proc.start()
        child.close()

    def submit(self, *args: Any) -> None:
        self.conn.send(args)

    def result(self) -> Any:
        try:
            status, payload = self.conn.recv()
        except EOFError as err:
            self.proc.join(timeout=5)
            raise RuntimeError(
                f"replica worker (pid {self.proc.pid}) died, exit code {self.proc.exitcode}; "
                "workers use the 'forkserver'/'spawn' start methods, so a script must guard its "
                "entry point with `if __name__ == '__main__':` (or pass n_workers=1)"
            ) from err
        if status == "error":
            raise RuntimeError(f"replica worker (pid {self.proc.pid}) failed:\n{payload}")
        return payload

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():  # pragma: no cover - defensive
            self.proc.terminate()
            self.proc.join()
        self.conn.close()


def _mp_context() -> Any:
    """'forkserver' (workers fork from a server that imported this module once) where
    available, else 'spawn'. Both start workers from a clean interpreter, never from a
    fork of the caller."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")  # pragma: no cover - Windows


def _log_tenth(done: int, total: int, chunk: int, elapsed: float) -> None:
    """One INFO line at each tenth of the ``total`` chunks (of ``chunk`` steps), with the
    time spent (``elapsed``, s) and the time left at that pace: the sign of life of a long
    run whose progress bar is off (log files, cluster jobs)."""
    if total < 1 or done * 10 // total == (done - 1) * 10 // total:
        return
    left = elapsed * (total - done) / done
    _log.info(
        "MD: %d %% of %s steps per replica, %.1f min so far, about %.1f min left",
        100 * done // total, f"{total * chunk:,}", elapsed / 60, left / 60,
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
) -> dict[str, Any]:
    """Run plain Langevin MD (one temperature) or replica exchange (several).

    Steps advance in chunks of ``gcd(save_every, swap_every)``; equilibration (rounded up
    to whole chunks) includes swaps, and all statistics are reset afterwards. ``progress``
    shows a progress bar; without it, one INFO line of the ``bgflow_mini.replica`` logger
    at each tenth of the run says how far it is and about how long is left.

    Returns a dict with ``positions`` (``(n_frames, n_atoms, 3)`` float32 nm, slot 0, or
    ``(n_replicas, n_frames, n_atoms, 3)`` when ``keep_all``), ``potential`` and
    ``kinetic`` (kJ/mol, ``(n_replicas, n_frames)``), ``walkers`` (which walker sat in each
    slot, ``(n_replicas, n_frames)`` int), ``swap_attempts``/``swap_accepts``
    (``(n_replicas - 1,)``), ``round_trips`` and timing numbers.
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
    seeds = replica_seeds(seed, n_rep)
    common = dict(
        positions=positions,
        timestep=float(timestep),
        friction=float(friction),
        platform=platform,
        platform_properties=platform_properties,
        minimize=minimize,
    )

    t_start = time.perf_counter()
    handles: list[_LocalHandle | _ProcessHandle] = []
    try:
        if n_workers > 1:
            ctx = _mp_context()
            xml = openmm.XmlSerializer.serialize(system)
            for idx in slots:
                kw = dict(common, system=xml, temperatures=temps[idx].tolist(), seeds=seeds[idx])
                handles.append(_ProcessHandle(ctx, kw))
            for h in handles:
                h.result()  # wait for set-up, surface errors
        else:
            kw = dict(common, system=system, temperatures=temps.tolist(), seeds=seeds)
            handles.append(_LocalHandle(kw))
        t_setup = time.perf_counter() - t_start

        shape = (n_rep, n_frames, n_atoms, 3) if keep_all else (n_frames, n_atoms, 3)
        out_pos = np.zeros(shape, dtype=np.float32)
        out_pot = np.zeros((n_rep, n_frames))
        out_kin = np.zeros((n_rep, n_frames))
        out_walk = np.zeros((n_rep, n_frames), dtype=np.int64)
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
        bar = tqdm(
            total=n_eq_chunks + n_prod_chunks,
            disable=not progress,
            desc=f"MD {n_rep} replica(s)",
            unit="chunk",
            mininterval=0.5,
        )
        for c in range(n_eq_chunks + n_prod_chunks):
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
            if not progress:
                _log_tenth(c + 1, n_eq_chunks + n_prod_chunks, chunk, time.perf_counter() - t_start)
        bar.close()
    finally:
        for h in handles:
            h.close()
    t_end = time.perf_counter()
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
    }
