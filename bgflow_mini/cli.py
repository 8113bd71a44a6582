"""Console commands (``bgflow-train``, ``bgflow-sample``, ``bgflow-free-energy``, ``bgflow-md``).

Each command runs the matching script of the source checkout (``scripts/<name>.py``,
configured by Hydra from ``configs/``) with the same command-line arguments, e.g.
``bgflow-train experiment=aldp_vacuum_rnvp`` is ``python scripts/train.py
experiment=aldp_vacuum_rnvp``. The library itself does not import Hydra; the scripts do.
The scripts and configs are found next to the installed package, i.e. in an editable
install (``pip install -e .``) of the repository; elsewhere the command says so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["script_path", "train", "sample", "free_energy", "run_md"]

_ROOT = Path(__file__).resolve().parents[1]


def script_path(name: str, root: str | os.PathLike | None = None) -> Path:
    """Path of ``scripts/<name>.py`` in the checkout ``root`` (default: next to the package).

    Raises:
        FileNotFoundError: the scripts or their configs are not there (e.g. a non-editable
            install, which ships the library only).
    """
    base = Path(root) if root is not None else _ROOT
    script, configs = base / "scripts" / f"{name}.py", base / "configs"
    if not script.is_file() or not configs.is_dir():
        raise FileNotFoundError(
            f"bgflow-mini console commands run the repository's scripts/ with its configs/, "
            f"but {script} or {configs} is missing; install the checkout in editable mode "
            f"(pip install -e .) or run python scripts/{name}.py from the repository root"
        )
    return script


def _run(name: str) -> None:
    try:
        script = script_path(name)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    # replace this process by the script, so Hydra sees an ordinary script launch
    os.execv(sys.executable, [sys.executable, str(script), *sys.argv[1:]])


def train() -> None:
    """``bgflow-train [overrides]``: ``python scripts/train.py [overrides]``."""
    _run("train")


def sample() -> None:
    """``bgflow-sample checkpoint=RUN [overrides]``: ``python scripts/sample.py``."""
    _run("sample")


def free_energy() -> None:
    """``bgflow-free-energy samples=PATH [overrides]``: ``python scripts/free_energy.py``."""
    _run("free_energy")


def run_md() -> None:
    """``bgflow-md [overrides]``: ``python scripts/run_md.py``."""
    _run("run_md")
