"""Atomic file output: every file is written to a temporary name and renamed into place.

A run killed while writing never leaves a truncated ``model.pt``, ``metrics.json`` or
``log_weights.npy`` behind: readers see the old file or the new one, nothing between.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_path", "save_torch", "save_json", "save_text", "save_npy", "load_torch"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The parent folder is created. On an exception the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:  # on disk before the rename: safe against power loss too
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically."""
    return _write(path, lambda tmp: torch.save(obj, tmp))


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """JSON (indented; numpy scalars and other objects as floats/strings) atomically."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return save_text(json.dumps(obj, indent=2, default=default), path)


def save_text(text: str, path: str | os.PathLike) -> Path:
    """A text file atomically."""
    return _write(path, lambda tmp: tmp.write_text(text))


def save_npy(array: Any, path: str | os.PathLike) -> Path:
    """``np.save`` atomically (``path`` should end in ``.npy``)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array))

    return _write(path, write)


def alternative_hint(path: Path, alternative: str | os.PathLike | None) -> str:
    """A sentence pointing at ``alternative`` when it is another file that exists."""
    if alternative is None or Path(alternative) == path or not Path(alternative).is_file():
        return ""
    return f"; the last good copy may be {alternative} (use it instead)"


def load_torch(path: str | os.PathLike, alternative: str | os.PathLike | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with a clear error.

    A missing file raises ``FileNotFoundError``; an unreadable one (truncated by a crash,
    not a torch file, or holding objects other than tensors and plain containers) raises
    ``ValueError`` naming the file and, when it exists, ``alternative`` to use instead.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and unpickler errors of many kinds
        hint = alternative_hint(path, alternative)
        raise ValueError(
            f"cannot read {path}: the file is truncated or corrupt, or not a bgflow_mini "
            f"checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]}){hint}"
        ) from err
