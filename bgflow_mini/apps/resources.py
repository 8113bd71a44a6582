"""CPU budget of one job, so that a sweep never oversubscribes the machine.

A job of a Hydra multirun (``-m``) may share the machine with other jobs (``hydra/launcher=
joblib``) or run in a slice of a cluster node (``hydra/launcher=submitit_slurm``). Its
budget, in cores, comes from the first of:

1. the submitit launcher's ``cpus_per_task`` (what the job was submitted with);
2. ``SLURM_CPUS_PER_TASK`` (any job started inside a SLURM allocation);
3. joblib: the cores (2., else this process's CPU affinity) divided by ``n_jobs``
   (``-1``: one per core, as joblib counts);
4. the cores this process may run on (``os.sched_getaffinity``, else ``os.cpu_count()``).

:func:`plan` then sizes torch threads (``num_threads``), MD worker processes
(``data.n_workers``) and OpenMM energy workers (``energy.n_workers``) from it. Numbers set
in the config for ``num_threads`` / ``data.n_workers`` always win (a warning when above the
budget); ``null`` takes the budget. ``energy.n_workers`` is lowered to the budget (the
energies do not depend on it). Outside a launcher and outside SLURM nothing changes: ``null``
keeps torch's and the MD's own defaults.

Only :func:`launcher_config` and :func:`job_resources` read Hydra's state; the rest is plain
Python and tested as such.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from bgflow_mini.replica import available_cores

__all__ = ["Budget", "Resources", "job_budget", "plan", "launcher_config", "job_resources"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """Cores one job may use, and why.

    ``limited`` is True when a launcher or the scheduler set the number (then ``null``
    settings are sized to it); False for the whole machine of a plain run.
    """

    cores: int
    reason: str
    limited: bool


@dataclass(frozen=True)
class Resources:
    """What a job uses: torch threads (None: torch's default), MD workers (None: the
    library's default, one per core up to one per replica), OpenMM energy workers (None: the
    energy config has no ``n_workers``), and one line per decision."""

    budget: Budget
    threads: int | None
    md_workers: int | None
    energy_workers: int | None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def energy_kwargs(self) -> dict[str, int]:
        """Keyword arguments for ``instantiate(cfg.energy, ...)``."""
        return {} if self.energy_workers is None else {"n_workers": self.energy_workers}

    def summary(self) -> str:
        return f"{self.budget.cores} core(s) for this job ({self.budget.reason}); " + "; ".join(
            self.notes
        )


def _positive(value: Any) -> int | None:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def job_budget(
    launcher: Mapping[str, Any] | None,
    env: Mapping[str, str] | None = None,
    cores: int | None = None,
) -> Budget:
    """The cores one job may use.

    Arguments:
        launcher: the multirun launcher's config (``hydra.launcher``; its ``_target_`` names
            the launcher), or None for a plain run.
        env: environment variables (default ``os.environ``).
        cores: cores this process may run on (default: its CPU affinity).
    """
    env = os.environ if env is None else env
    cores = max(1, int(cores if cores is not None else available_cores()))
    launcher = launcher or {}
    target = str(launcher.get("_target_") or "")
    slurm = _positive(env.get("SLURM_CPUS_PER_TASK"))
    if "hydra_submitit_launcher" in target:
        kind = "submitit_slurm" if target.endswith("SlurmLauncher") else "submitit_local"
        cpus = _positive(launcher.get("cpus_per_task"))
        if cpus:
            return Budget(cpus, f"{kind} cpus_per_task={cpus}", True)
        if slurm:
            return Budget(slurm, f"SLURM_CPUS_PER_TASK={slurm}", True)
        if kind == "submitit_local":  # every job of the sweep starts at once
            return Budget(
                1, "submitit_local without cpus_per_task runs all jobs at once: 1 core each", True
            )
        return Budget(cores, f"{cores} core(s) of the SLURM allocation (CPU affinity)", True)
    machine, where = (slurm, f"SLURM_CPUS_PER_TASK={slurm}") if slurm else (cores, "CPU affinity")
    if "hydra_joblib_launcher" in target:
        n_jobs = int(launcher.get("n_jobs") or -1)
        k = n_jobs if n_jobs > 0 else max(1, machine + 1 + n_jobs)  # joblib's rule for < 0
        return Budget(
            max(1, machine // k),
            f"joblib n_jobs={n_jobs}: {machine} core(s) ({where}) // {k} job(s) at once",
            True,
        )
    if slurm:
        return Budget(slurm, f"SLURM_CPUS_PER_TASK={slurm}", True)
    return Budget(cores, f"{cores} core(s), {where}; no launcher or scheduler limit", False)


def plan(
    budget: Budget,
    num_threads: int | None,
    md_workers: int | None,
    energy_workers: int | None,
) -> Resources:
    """Torch threads, MD workers and OpenMM energy workers for a budget.

    Arguments:
        budget: from :func:`job_budget`.
        num_threads: the config's ``num_threads`` (None: size it to the budget).
        md_workers: the config's ``data.n_workers`` (None: size it to the budget).
        energy_workers: the energy config's ``n_workers`` (None: it has none).
    """
    n, notes = budget.cores, []

    def explicit(name: str, value: int) -> int:
        over = f", above the budget of {n}: jobs may oversubscribe" if value > n else ""
        notes.append(f"{name}={value} (config{over})")
        if over:
            log.warning("%s=%d is above this job's budget of %d core(s)", name, value, n)
        return value

    def choose(key: str, value: Any, what: str, otherwise: str) -> int | None:
        """The configured value, else the budget when the job has one, else None."""
        if value is not None:
            return explicit(key, int(value))
        notes.append(f"{what} {n} (budget)" if budget.limited else f"{what}: {otherwise}")
        return n if budget.limited else None

    threads = choose("num_threads", num_threads, "torch threads", "torch's default")
    workers = choose("data.n_workers", md_workers, "MD workers", "one per core")
    energy = None if energy_workers is None else int(energy_workers)
    if energy is not None and budget.limited and energy > n:
        notes.append(f"OpenMM energy workers {n} (energy.n_workers={energy} lowered to the budget)")
        energy = n
    elif energy is not None:
        notes.append(f"OpenMM energy workers {energy}")
    return Resources(budget, threads, workers, energy, notes)


def launcher_config() -> dict[str, Any] | None:
    """The launcher config of this multirun job (``_target_``, ``n_jobs``,
    ``cpus_per_task``), or None for a plain run (``hydra/launcher`` only acts with ``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or hc.get("launcher") is None:
        return None
    node = hc.launcher
    return {k: node.get(k) for k in ("_target_", "n_jobs", "cpus_per_task") if k in node}


def job_resources(cfg: Any) -> Resources:
    """Budget and plan for a training job from its config (``num_threads``,
    ``data.n_workers``, ``energy.n_workers``) and the launcher; sets torch's threads and logs
    the decision (into the job's ``<app>.log`` under Hydra)."""
    import torch

    energy = cfg.get("energy")
    energy_workers = energy.get("n_workers") if energy is not None else None
    data = cfg.get("data")
    res = plan(
        job_budget(launcher_config()),
        cfg.get("num_threads"),
        data.get("n_workers") if data is not None else None,
        energy_workers,
    )
    if res.threads:
        torch.set_num_threads(res.threads)
    log.info("resources: %s", res.summary())
    return res
