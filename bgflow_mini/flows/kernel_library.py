"""Building, loading and switching the native kernels (``_spline_kernels.c``).

The library is compiled on first use with the system C compiler (``$CC``, else ``cc``;
about a second) into a cache folder (``$BGFLOW_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/bgflow_mini/kernels`` or ``~/.cache/bgflow_mini/kernels``), keyed by a
hash of the source, the flags and the compiler, and loaded with :mod:`ctypes`; a
concurrent process sees a whole file or none. Nothing is downloaded. Where no compiler
works the build is reported once (a warning) and :func:`available` is False, so the flows
run their PyTorch code. ``BGFLOW_NATIVE_KERNELS=0`` in the environment, or
:func:`use_native` ``(False)``, turns the kernels off; :func:`status` says which path CPU
tensors take and why. What the kernels compute: :mod:`bgflow_mini.flows.native`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["available", "status", "use_native", "disabled", "library", "TYPES"]

_LOG = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("_spline_kernels.c")
_FLAGS = ["-O3", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-std=c99", "-pthread"]
# tensor dtype -> (C type, suffix of the exported functions)
TYPES = {torch.float32: ("float", "_f32"), torch.float64: ("double", "_f64")}
_LOCK = threading.Lock()
_STATE: dict = {"lib": None, "tried": False, "reason": "not built yet", "enabled": None}


def _env_enabled() -> bool:
    return os.environ.get("BGFLOW_NATIVE_KERNELS", "1").strip().lower() not in (
        "0",
        "false",
        "off",
        "no",
    )


def use_native(flag: bool | None = True) -> None:
    """Turn the native kernels on (``True``) or off (``False``) for this process; ``None``
    goes back to the environment's choice (``BGFLOW_NATIVE_KERNELS``, on unless ``0``)."""
    _STATE["enabled"] = None if flag is None else bool(flag)


@contextlib.contextmanager
def disabled():
    """Within the block, CPU tensors take the PyTorch path (not thread-safe: a switch)."""
    previous = _STATE["enabled"]
    _STATE["enabled"] = False
    try:
        yield
    finally:
        _STATE["enabled"] = previous


def _enabled() -> bool:
    flag = _STATE["enabled"]
    return _env_enabled() if flag is None else flag


def _cache_root() -> Path:
    if os.environ.get("BGFLOW_KERNEL_CACHE"):
        return Path(os.environ["BGFLOW_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bgflow_mini" / "kernels"


def _compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (may hold a launcher or flags, e.g. ``ccache gcc``),
    else the first of cc, gcc, clang on the PATH; None if there is none."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [cc] if cc else None


def _build(cc: list[str], target: Path) -> None:
    """Compile the source twice (float, double) and link one shared library at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objs = []
        for real, suffix in TYPES.values():
            obj = Path(tmp) / f"spline{suffix}.o"
            cmd = [*cc, *_FLAGS, f"-DREAL={real}", f"-DSUFFIX={suffix}", "-c", str(_SOURCE)]
            subprocess.run([*cmd, "-o", str(obj)], check=True, capture_output=True, text=True)
            objs.append(str(obj))
        lib = Path(tmp) / target.name
        subprocess.run(
            [*cc, "-shared", "-pthread", *objs, "-o", str(lib), "-lm"],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(lib, target)  # atomic: a concurrent process sees a whole file or none


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, ptr, r = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_double
    for _, suffix in TYPES.values():
        head = [i64, i64, i32]
        fwd = [ptr, i64, i64, ptr, i64, i64, i64, i32, ptr, ptr, ptr, i32]
        bwd = [ptr, i64, i64, i64, i32, ptr, ptr, i64, i64, ptr, i64, ptr, ptr, i32]
        for name, args in (
            ("circular_forward", head + fwd),
            ("circular_backward", head + bwd),
            ("bounded_forward", head + [r] + fwd),
            ("bounded_backward", head + [r] + bwd),
        ):
            fn = getattr(lib, name + suffix)
            fn.argtypes, fn.restype = args, i32
        coupling = [i64, i64, ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, ptr, i32, ptr, i64, i32]
        fn = getattr(lib, "affine_coupling_forward" + suffix)
        fn.argtypes, fn.restype = coupling + [ptr, ptr, ptr, i32], i32
        fn = getattr(lib, "affine_coupling_backward" + suffix)
        fn.argtypes = coupling + [ptr, ptr, i64, i64, ptr, i64, ptr, ptr, ptr, i32]
        fn.restype = i32


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first call; None (reason in :func:`status`)."""
    if _STATE["tried"]:
        return _STATE["lib"]
    with _LOCK:
        if _STATE["tried"]:
            return _STATE["lib"]
        cc = _compiler()
        try:
            if cc is None:
                raise RuntimeError("no C compiler found (set CC or install gcc / clang)")
            source = _SOURCE.read_bytes()
            version = subprocess.run([*cc, "--version"], capture_output=True, text=True).stdout
            key = hashlib.sha256(
                b"\0".join(
                    [
                        source,
                        " ".join(_FLAGS).encode(),
                        " ".join(cc).encode(),
                        version.encode(),
                        platform.machine().encode(),
                        sys.platform.encode(),
                    ]
                )
            ).hexdigest()[:16]
            target = _cache_root() / key / "libbgflow_spline.so"
            if not target.exists():
                _LOG.info("compiling the native spline kernels into %s", target.parent)
                _build(cc, target)
            lib = ctypes.CDLL(str(target))
            _declare(lib)
            _STATE["lib"], _STATE["reason"] = lib, f"native ({target})"
        except (OSError, RuntimeError, subprocess.CalledProcessError, AttributeError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            _STATE["reason"] = f"unavailable: {detail.strip().splitlines()[-1] if detail else err}"
            _LOG.warning(
                "bgflow_mini: native spline kernels %s; using the PyTorch implementation "
                "(same results, slower on the CPU)",
                _STATE["reason"],
            )
        _STATE["tried"] = True
        return _STATE["lib"]


def available() -> bool:
    """Whether the native kernels are enabled and built (builds them on first call)."""
    return _enabled() and library() is not None


def status() -> str:
    """Which spline path CPU tensors take: ``native (<library>)``, ``off (...)`` or
    ``unavailable: <why>`` (builds the library on first call)."""
    if not _enabled():
        return "off (BGFLOW_NATIVE_KERNELS=0 or use_native(False))"
    library()
    return _STATE["reason"]
