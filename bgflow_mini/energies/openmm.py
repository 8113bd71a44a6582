"""Reduced OpenMM energies u(x) = U(x)/kT with forces as gradients, optionally in parallel."""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import numpy as np
import openmm
import torch
from torch import Tensor

from ..systems import MolecularSystem
from ..units import kt_kjmol
from . import _openmm_pool
from .base import Energy

__all__ = ["OpenMMEnergy", "WorkerError", "select_platform"]

WorkerError = _openmm_pool.WorkerError
PLATFORMS = ("Reference", "CPU", "CUDA", "OpenCL", "auto")
_log = logging.getLogger(__name__)


def select_platform(system: openmm.System, name: str = "auto") -> str:
    """Name of the platform to use: ``name`` itself, or for "auto" the fastest platform on
    which a Context for ``system`` can actually be created (CUDA > OpenCL > CPU > Reference).
    Each platform "auto" passes over is logged (INFO) with the reason OpenMM gave, and if
    none works the error lists every reason.
    """
    if name not in PLATFORMS:
        raise ValueError(f"platform must be one of {list(PLATFORMS)}, got {name!r}")
    if name != "auto":
        try:
            openmm.Platform.getPlatformByName(name)
        except Exception as err:
            raise ValueError(f"OpenMM platform {name!r} is not available: {err}") from err
        return name
    platforms = [openmm.Platform.getPlatform(i) for i in range(openmm.Platform.getNumPlatforms())]
    skipped: list[str] = []
    for plat in sorted(platforms, key=lambda p: -p.getSpeed()):
        try:
            openmm.Context(system, openmm.VerletIntegrator(0.001), plat)
        except Exception as err:  # OpenMM raises its own exception types per platform
            lines = str(err).strip().splitlines()
            why = f"{type(err).__name__}: {lines[0] if lines else 'no message'}"
            _log.info("OpenMM platform %s skipped (%s)", plat.getName(), why)
            skipped.append(f"{plat.getName()} ({why})")
            continue
        return plat.getName()
    raise RuntimeError(
        "no OpenMM platform can create a Context for this system: " + "; ".join(skipped)
    )


class _OpenMMFunction(torch.autograd.Function):
    """u = bridge(x); du/dx = -F/kT from the same OpenMM call."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bridge: OpenMMEnergy, want_forces: bool) -> Tensor:
        u, grad = bridge._evaluate(x, want_forces)
        if want_forces:
            ctx.save_for_backward(grad)
        return u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_u: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad_u[:, None] * grad, None, None


class OpenMMEnergy(Energy):
    """Reduced potential energy u = U/kT of an OpenMM system, shape (batch,).

    Input ``x`` of shape (batch, n_atoms*3) or (batch, n_atoms, 3) in nm, any float dtype
    and device; the output (and the gradient -F/kT in kT/nm) has the input's dtype and
    device. OpenMM always evaluates in float64 on CPU-side numpy arrays.

    Arguments:
        system: a :class:`~bgflow_mini.systems.MolecularSystem`, or an ``openmm.System``
            together with ``temperature`` (K).
        platform: "Reference" | "CPU" | "CUDA" | "OpenCL" | "auto" (fastest that works).
        n_workers: 0 evaluates in this process; k >= 1 uses k persistent worker processes,
            each with its own Context, started on first use (or :meth:`start`) and reused.
        high_energy: reduced energy (kT) given to failed configurations; default +inf.
        chunk_size: max configurations per task sent to a worker; default: one contiguous
            chunk per worker.
        temperature: K, required when ``system`` is an ``openmm.System``.
        platform_properties: OpenMM platform properties. Defaults: ``Threads=1`` for the
            CPU platform with more than one worker, ``Precision=mixed`` on CUDA / OpenCL.

    Failed configurations (non-finite input coordinates, which are never sent to OpenMM;
    OpenMM raising; non-finite energy or forces) get ``high_energy`` (default +inf) and a
    zero gradient, and are counted in :attr:`stats` (cumulative) and :attr:`last_stats`
    (last call): keys ``calls``, ``evaluated``, ``nonfinite_input``, ``openmm_failed``.
    A worker failure (died, cannot create its Context) raises :class:`WorkerError`.

    Workers are fresh interpreters (fork + exec, like multiprocessing "spawn", but they do
    not re-import ``__main__``, so no ``if __name__ == "__main__":`` guard is needed) that
    import only numpy and OpenMM. Use as a context manager or call :meth:`close` to stop
    them early; they also stop on garbage collection, at interpreter exit and when this
    process dies. Calls are serialised by a lock (one evaluation at a time per instance).
    """

    def __init__(
        self,
        system: MolecularSystem | openmm.System,
        platform: str = "Reference",
        n_workers: int = 1,
        high_energy: float | None = None,
        chunk_size: int | None = None,
        *,
        temperature: float | None = None,
        platform_properties: dict[str, str] | None = None,
    ) -> None:
        if isinstance(system, MolecularSystem):
            omm_system = system.system
            temperature = system.temperature if temperature is None else temperature
        elif isinstance(system, openmm.System):
            omm_system = system
            if temperature is None:
                raise ValueError("temperature (K) is required when passing an openmm.System")
        else:
            raise TypeError(
                f"system must be a MolecularSystem or openmm.System, got {type(system).__name__}"
            )
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0 K, got {temperature}")
        n_atoms = omm_system.getNumParticles()
        super().__init__(3 * n_atoms)
        if int(n_workers) < 0:
            raise ValueError(f"n_workers must be >= 0, got {n_workers}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        if high_energy is not None and math.isnan(float(high_energy)):
            raise ValueError("high_energy must not be NaN")
        self.n_atoms = n_atoms
        self.temperature = float(temperature)
        self.kT = kt_kjmol(self.temperature)  # kJ/mol
        self.n_workers = int(n_workers)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.high_energy = math.inf if high_energy is None else float(high_energy)
        self.platform = select_platform(omm_system, platform)
        props = {} if platform_properties is None else dict(platform_properties)
        if self.platform == "CPU" and self.n_workers > 1:
            props.setdefault("Threads", "1")
        if self.platform in ("CUDA", "OpenCL"):
            props.setdefault("Precision", "mixed")
        self.platform_properties = {str(k): str(v) for k, v in props.items()}
        self.system_xml = openmm.XmlSerializer.serialize(omm_system)
        self._context: openmm.Context | None = None
        self._pool: _openmm_pool.WorkerPool | None = None
        self._lock = threading.Lock()  # one evaluation at a time per bridge
        self.reset_stats()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> OpenMMEnergy:
        """Create the Context / start the workers now (otherwise done on first call)."""
        if self.n_workers == 0:
            if self._context is None:
                self._context = _openmm_pool.make_context(
                    self.system_xml, self.platform, self.platform_properties
                )
        elif self._pool is None or self._pool.closed:
            self._pool = _openmm_pool.WorkerPool(
                self.n_workers, self.system_xml, self.platform, self.platform_properties
            )
        return self

    def close(self) -> None:
        """Stop the worker processes and drop the Context (idempotent; restarts on next call)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._context = None

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running workers ([] when none are running)."""
        return [] if self._pool is None or self._pool.closed else list(self._pool.pids)

    def __enter__(self) -> OpenMMEnergy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__().copy()
        state["_pool"], state["_context"], state["_lock"] = None, None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    def reset_stats(self) -> dict[str, int]:
        """Zero the counters; returns the old cumulative stats."""
        old = getattr(self, "stats", {})
        keys = ("calls", "evaluated", "nonfinite_input", "openmm_failed")
        self.stats = dict.fromkeys(keys, 0)
        self.last_stats = dict.fromkeys(keys, 0)
        return old

    # ------------------------------------------------------------------ evaluation
    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.ndim == 3:
            if tuple(x.shape[1:]) != (self.n_atoms, 3):
                raise ValueError(
                    f"OpenMMEnergy expects x of shape (batch, {self.n_atoms}, 3) or "
                    f"(batch, {self.dim}), got {tuple(x.shape)}"
                )
            x = x.reshape(x.shape[0], self.dim)
        if isinstance(x, Tensor) and not x.is_floating_point():
            raise ValueError(f"OpenMMEnergy expects a floating point tensor, got {x.dtype}")
        return super().forward(x)

    def _energy(self, x: Tensor) -> Tensor:
        want_forces = torch.is_grad_enabled() and x.requires_grad
        return _OpenMMFunction.apply(x, self, want_forces)

    def _evaluate(self, x: Tensor, want_forces: bool) -> tuple[Tensor, Tensor | None]:
        """u/kT (batch,) and du/dx = -F/kT (batch, dim) (or None) in x's dtype/device."""
        batch = x.shape[0]
        xn = (
            x.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(batch, self.n_atoms, 3)
        )
        finite = np.isfinite(xn).all(axis=(1, 2))
        idx = np.flatnonzero(finite)
        energies = np.full(batch, np.nan)
        forces = np.zeros_like(xn) if want_forces else None
        failed = ~finite
        if idx.size:
            xs = xn if idx.size == batch else xn[idx]
            e, f, bad = self._run(xs, want_forces)
            energies[idx] = e
            failed[idx] = bad
            if want_forces:
                forces[idx] = f
                forces[failed] = 0.0
        u = energies / self.kT
        u[failed] = self.high_energy
        n_nonfinite = int((~finite).sum())
        n_failed = int(failed.sum()) - n_nonfinite
        self.last_stats = {
            "calls": 1,
            "evaluated": batch - n_nonfinite - n_failed,
            "nonfinite_input": n_nonfinite,
            "openmm_failed": n_failed,
        }
        for k, v in self.last_stats.items():
            self.stats[k] += v
        u_t = torch.from_numpy(u).to(device=x.device, dtype=x.dtype)
        grad = None
        if want_forces:
            grad = torch.from_numpy(forces.reshape(batch, -1) / -self.kT)
            grad = grad.to(device=x.device, dtype=x.dtype)
        return u_t, grad

    def _run(self, x: np.ndarray, want_forces: bool):
        with self._lock:
            return self._run_locked(x, want_forces)

    def _run_locked(self, x: np.ndarray, want_forces: bool):
        self.start()
        if self.n_workers == 0:
            return _openmm_pool.evaluate(self._context, x, want_forces)
        n = x.shape[0]
        n_tasks = min(self.n_workers, n)
        if self.chunk_size is not None:
            n_tasks = max(n_tasks, math.ceil(n / self.chunk_size))
        try:
            return self._pool.evaluate(x, want_forces, n_tasks)
        except BaseException:
            self._pool = None  # the pool closed itself; the next call starts a fresh one
            raise

    def extra_repr(self) -> str:
        return (
            f"n_atoms={self.n_atoms}, T={self.temperature} K, platform={self.platform}, "
            f"n_workers={self.n_workers}"
        )
