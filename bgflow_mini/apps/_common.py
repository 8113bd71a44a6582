"""What the Hydra apps share: the config location, clean errors, energies from configs."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "CONFIG_PATH",
    "run_app",
    "energy_backend",
    "set_threads",
    "plain",
    "device_default_energy",
]

# the configs ship inside the package (bgflow_mini.configs = the repository's configs/)
CONFIG_PATH = "pkg://bgflow_mini.configs"
T = TypeVar("T")


def run_app(fn: Callable[[], T]) -> T:
    """Run an app body; a user error (bad config, missing file, unsupported system)
    prints ``error: <message>`` and exits with code 2 instead of a traceback
    (``HYDRA_FULL_ERROR=1`` shows the traceback); so does a training run that stalled
    (:class:`~bgflow_mini.training.TrainingStalled`: its message says what to try)."""
    from hydra.errors import InstantiationException

    from bgflow_mini.training import TrainingStalled

    user_errors = (ValueError, FileNotFoundError, KeyError, OSError, TrainingStalled)
    try:
        return fn()
    except (*user_errors, InstantiationException) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(err, InstantiationException):
            if not isinstance(err.__cause__, ValueError | FileNotFoundError | KeyError):
                raise  # not a user error: keep the traceback
            err = err.__cause__  # e.g. load_system's message for a misspelt system
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        print("(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


def plain(cfg: Any) -> Any:
    """A config node as plain Python data (interpolations resolved)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def energy_backend(spec: Any) -> Callable | None:
    """An energy factory ``backend(system)`` from a config node with ``_target_`` (or None)."""
    return None if spec is None else instantiate(spec)


def set_threads(num_threads: int | None) -> None:
    """torch CPU threads (``None``: torch's default)."""
    if num_threads:
        torch.set_num_threads(int(num_threads))


def device_default_energy(
    device: torch.device, choice: str | None, overrides: list[str]
) -> DictConfig | None:
    """The energy config a run on ``device`` should use instead of the config's, or None.

    On CUDA the default energy (the ``energy`` group's ``openmm``, left unchosen on the
    command line) becomes ``TorchForceField`` on the training device (``configs/energy/
    torchff.yaml``): energies and forces stay on the GPU, with no copies to OpenMM worker
    processes per step. Any ``energy=...`` or ``energy.<key>=...`` override keeps the
    config's choice, e.g. ``energy=openmm energy.platform=CUDA`` for OpenMM's CUDA platform.

    Arguments:
        device: the training device.
        choice: the ``energy`` group's choice (Hydra's ``runtime.choices``), None if unknown.
        overrides: the command line's overrides (Hydra's ``overrides.task``).
    """
    if device.type != "cuda" or choice != "openmm":
        return None
    if any(o.lstrip("+~").split("=")[0].split(".")[0] == "energy" for o in overrides):
        return None
    from importlib.resources import files

    return OmegaConf.load(str(files("bgflow_mini.configs") / "energy" / "torchff.yaml"))
