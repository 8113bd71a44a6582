"""The replicas' OpenMM contexts and the worker processes that own them.

:class:`ReplicaGroup` holds the Langevin contexts of some replicas in one process and
advances them; :func:`bgflow_mini.replica.run_replicas` drives groups through handles with
one protocol (``submit`` a chunk of steps with the swapped states, then ``result``), in this
process or in a worker process (``forkserver``, else ``spawn``: a clean interpreter, the
System sent as XML).
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from typing import Any

import numpy as np
import openmm
from openmm import unit

__all__ = ["ReplicaGroup", "LocalHandle", "ProcessHandle", "mp_context"]


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


class LocalHandle:
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


class ProcessHandle:
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


def mp_context() -> Any:
    """'forkserver' (workers fork from a server that imported this module once) where
    available, else 'spawn'. Both start workers from a clean interpreter, never from a
    fork of the caller."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")  # pragma: no cover - Windows
