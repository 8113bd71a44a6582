"""The library imports without Hydra/OmegaConf: only ``bgflow_mini.apps`` may need them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ALLOWED_PREFIX = "bgflow_mini.apps"  # the Hydra entry points
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys, traceback

    for name in ("hydra", "omegaconf"):
        sys.modules[name] = None  # any "import hydra..." now raises ImportError

    import bgflow_mini

    allowed = sys.argv[1]

    def skip(name):
        return name == allowed or name.startswith(allowed + ".")

    def onerror(name):  # a package whose __init__ fails while walking
        if not skip(name):
            failed[name] = traceback.format_exc(limit=-4)

    failed, found = {}, []
    for info in pkgutil.walk_packages(bgflow_mini.__path__, "bgflow_mini.", onerror=onerror):
        if skip(info.name):
            continue
        found.append(info.name)
        try:
            importlib.import_module(info.name)
        except BaseException:
            failed[info.name] = traceback.format_exc(limit=-4)
    print(json.dumps({"found": found, "failed": failed}))
    """
)


def test_library_imports_without_hydra() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, ALLOWED_PREFIX],
        capture_output=True,
        cwd=ROOT,  # the working tree's package
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    found, failed = result["found"], result["failed"]
    # the walk did discover the library (guards against a silently empty walk)
    assert {"bgflow_mini.flows.coupling", "bgflow_mini.reweighting"} <= set(found), found
    assert not any(m.startswith(ALLOWED_PREFIX) for m in found)
    details = "\n".join(f"--- {name}\n{tb}" for name, tb in sorted(failed.items()))
    assert not failed, (
        f"{len(failed)} module(s) cannot be imported without hydra/omegaconf: "
        f"{sorted(failed)}\n{details}"
    )
