"""Private: OpenMM contexts in persistent worker processes (used by ``OpenMMEnergy``).

This file deliberately imports only the standard library, numpy and OpenMM. A worker is a
fresh interpreter (``subprocess.Popen`` = fork + immediate exec, the same start as the
multiprocessing "spawn" method: nothing of the parent's torch / OpenMM state is inherited)
that runs this file through ``runpy.run_path``. Unlike multiprocessing's spawn it does not
re-import the parent's ``__main__`` (no ``if __name__ == "__main__"`` guard needed, no
torch import): a worker starts in ~0.2 s. Messages are pickled tuples over a socketpair
wrapped in ``multiprocessing.connection.Connection``::

    parent -> worker: ("init", system_xml, platform, properties)  -> ("ready", pid, platform)
    parent -> worker: ("eval", x (m, n_atoms, 3) float64 nm, want_forces)
                                           -> ("ok", energies (m,) kJ/mol, forces, failed (m,))
    parent -> worker: ("close",)           -> worker exits
    any failure of the worker itself       -> ("error", traceback text)

A worker exits on "close", when its socket reaches EOF (the parent closed it or died), or
when its parent pid changes (checked every second); it ignores SIGINT, so Ctrl-C is
handled by the parent alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import weakref
from multiprocessing.connection import Connection, wait

import numpy as np
import openmm

__all__ = ["make_context", "evaluate", "WorkerPool", "WorkerError"]

_RUN_NAME = "__bgflow_openmm_worker__"
# State.getForces(asNumpy=True) wraps the array in a Quantity (~50 us per call, as long as
# the force evaluation of a small molecule); the private filler it uses is ~10x cheaper.
_FAST_FORCES = hasattr(openmm.State, "_getVectorAsNumpy")


class WorkerError(RuntimeError):
    """An OpenMM worker process failed (died, could not create its context, ...)."""


def make_context(system_xml: str, platform: str, properties: dict[str, str]) -> openmm.Context:
    """A Context for the serialized System on the named platform (dummy Verlet integrator)."""
    system = openmm.XmlSerializer.deserialize(system_xml)
    integrator = openmm.VerletIntegrator(0.001)
    plat = openmm.Platform.getPlatformByName(platform)
    return openmm.Context(system, integrator, plat, dict(properties))


def evaluate(
    context: openmm.Context, x: np.ndarray, want_forces: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Energies (kJ/mol) and forces (kJ/mol/nm) of ``x`` (m, n_atoms, 3) nm, one at a time.

    Returns ``(energies (m,), forces (m, n_atoms, 3) or None, failed (m,) bool)``. A
    configuration on which OpenMM raises, or that gives a non-finite energy or force, is
    marked failed with energy NaN and force 0 (the caller replaces them).
    """
    m = x.shape[0]
    energies = np.full(m, np.nan)
    forces = np.zeros_like(x) if want_forces else None
    failed = np.zeros(m, dtype=bool)
    for i in range(m):
        try:
            context.setPositions(x[i])
            state = context.getState(getEnergy=True, getForces=want_forces)
            # OpenMM's internal units are kJ/mol and nm: ._value avoids unit conversions
            e = state.getPotentialEnergy()._value
            if want_forces:
                if _FAST_FORCES:  # writes kJ/mol/nm straight into forces[i], no Quantity
                    state._getVectorAsNumpy(openmm.State.Forces, forces[i])
                else:
                    forces[i] = state.getForces(asNumpy=True)._value
        except Exception:  # openmm.OpenMMException and friends: one bad configuration
            failed[i] = True
            if want_forces:
                forces[i] = 0.0
            continue
        if not np.isfinite(e) or (want_forces and not np.isfinite(forces[i]).all()):
            failed[i] = True
            if want_forces:
                forces[i] = 0.0
            continue
        energies[i] = e
    return energies, forces, failed


def _serve(conn: Connection, parent_pid: int) -> None:
    """Worker main loop: answer requests until the parent goes away or says close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    context = None
    while True:
        try:
            while not conn.poll(1.0):
                if os.getppid() != parent_pid:
                    return
            msg = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if msg[0] == "close":
                return
            if msg[0] == "init":
                context = make_context(*msg[1:])
                reply = ("ready", os.getpid(), context.getPlatform().getName())
            elif msg[0] == "eval":
                if context is None:
                    raise RuntimeError("worker received 'eval' before 'init'")
                reply = ("ok", *evaluate(context, msg[1], msg[2]))
            else:
                raise RuntimeError(f"unknown request {msg[0]!r}")
        except Exception:
            reply = ("error", traceback.format_exc())
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


def _shutdown(procs: list[subprocess.Popen], conns: list[Connection], timeout: float = 5.0) -> None:
    """Ask workers to exit, then terminate / kill stragglers; never blocks for long."""
    for conn in conns:
        try:
            conn.send(("close",))
        except (OSError, ValueError):
            pass
    for conn in conns:  # a worker blocked on sending a reply now gets EPIPE and exits
        conn.close()
    deadline = time.monotonic() + timeout
    for proc in procs:  # a shared deadline: busy workers finish their chunk in parallel
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_BOOTSTRAP = (
    "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "import runpy; runpy.run_path(sys.argv[1], run_name=sys.argv[2])"
)


class WorkerPool:
    """``n_workers`` persistent processes, each holding one OpenMM Context.

    Started at construction (blocks until every worker created its Context). Shut down by
    :meth:`close`, on garbage collection and at interpreter exit.
    """

    def __init__(
        self,
        n_workers: int,
        system_xml: str,
        platform: str,
        properties: dict[str, str],
        start_timeout: float = 300.0,
    ) -> None:
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.conns)
        try:
            for _ in range(n_workers):
                parent_sock, child_sock = socket.socketpair()
                with child_sock:
                    fd = child_sock.fileno()
                    argv = [sys.executable, "-c", _BOOTSTRAP, os.path.abspath(__file__), _RUN_NAME]
                    argv += [str(fd), str(os.getpid())]
                    proc = subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.DEVNULL)
                self.procs.append(proc)
                self.conns.append(Connection(parent_sock.detach()))
            for conn in self.conns:
                conn.send(("init", system_xml, platform, dict(properties)))
            replies = [self._receive(k, start_timeout) for k in range(n_workers)]
        except BaseException:
            self.close()
            raise
        self.pids = [r[1] for r in replies]
        self.platform = replies[0][2]

    @property
    def n_workers(self) -> int:
        return len(self.procs)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop all workers (idempotent): ask them to exit, SIGTERM after 5 s."""
        self._finalizer()

    def terminate(self) -> None:
        """Stop all workers now (SIGTERM), e.g. after an interrupted evaluation."""
        if not self.closed:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.terminate()
        self.close()

    def _died(self, k: int) -> WorkerError:
        proc = self.procs[k]
        try:
            proc.wait(1.0)
        except subprocess.TimeoutExpired:
            pass
        return WorkerError(f"OpenMM worker {k} (pid {proc.pid}) died (exit code {proc.poll()})")

    def _send(self, k: int, msg: tuple) -> None:
        try:
            self.conns[k].send(msg)
        except OSError:
            raise self._died(k) from None

    def _receive(self, k: int, timeout: float | None) -> tuple:
        conn, proc = self.conns[k], self.procs[k]
        if not wait([conn], timeout):
            raise WorkerError(f"OpenMM worker {k} (pid {proc.pid}) did not answer in {timeout} s")
        try:
            reply = conn.recv()
        except (EOFError, OSError):
            raise self._died(k) from None
        if reply[0] == "error":
            raise WorkerError(f"OpenMM worker {k} (pid {proc.pid}) failed:\n{reply[1]}")
        return reply

    def evaluate(
        self, x: np.ndarray, want_forces: bool, n_tasks: int
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Evaluate ``x`` (m, n_atoms, 3) in ``n_tasks`` contiguous chunks over the workers.

        At most one chunk is in flight per worker; a free worker takes the next chunk.
        Any exception (including KeyboardInterrupt) terminates the pool, so no stale reply
        can be read later.
        """
        if self.closed:
            raise WorkerError("the OpenMM worker pool is closed")
        m = x.shape[0]
        energies = np.full(m, np.nan)
        forces = np.zeros_like(x) if want_forces else None
        failed = np.zeros(m, dtype=bool)
        bounds = np.linspace(0, m, n_tasks + 1).round().astype(int)
        tasks = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        try:
            busy: dict[int, tuple[int, int]] = {}
            free = list(range(self.n_workers))
            while tasks or busy:
                while tasks and free:
                    k = free.pop(0)
                    a, b = tasks.pop(0)
                    self._send(k, ("eval", np.ascontiguousarray(x[a:b]), want_forces))
                    busy[k] = (a, b)
                ready = wait([self.conns[k] for k in busy])
                for k in list(busy):
                    if self.conns[k] in ready:
                        _, e, f, bad = self._receive(k, None)
                        a, b = busy.pop(k)
                        energies[a:b], failed[a:b] = e, bad
                        if want_forces:
                            forces[a:b] = f
                        free.append(k)
        except (OSError, ValueError) as err:
            if not self.closed:
                self.terminate()
                raise
            raise WorkerError("the OpenMM worker pool was closed during an evaluation") from err
        except BaseException:
            self.terminate()
            raise
        return energies, forces, failed


if __name__ == _RUN_NAME:  # executed inside a worker: python -c _BOOTSTRAP file name fd ppid
    _serve(Connection(int(sys.argv[3])), int(sys.argv[4]))
