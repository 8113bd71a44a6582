"""End-to-end test of scripts/run_md.py (Hydra entry point) in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_md.py"


def _run(tmp_path: Path, *overrides: str) -> str:
    args = [
        sys.executable,
        str(SCRIPT),
        "system=aldp_vacuum",
        "md=remd",
        "md.n_frames=10",
        "md.save_every=20",
        "md.swap_every=10",
        "md.n_replicas=2",
        "md.t_max=330",
        "md.equilibration_steps=20",
        "n_workers=1",
        "progress=false",
        "data_dir=data",  # relative: resolved against the original working directory
        f"hydra.run.dir={tmp_path / 'outputs'}",
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k != "BGFLOW_DATA"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_run_md_generates_then_hits_cache(tmp_path: Path) -> None:
    out1 = _run(tmp_path)
    assert "(generated)" in out1 and "swap acceptance: 300-330 K" in out1
    assert "timestep:        2 fs, hydrogens 4 amu" in out1
    entries = list((tmp_path / "data" / "aldp_vacuum").iterdir())
    assert len(entries) == 1
    entry = entries[0]
    for name in ("traj.h5", "energies.npy", "replica_energies.npy", "meta.json"):
        assert (entry / name).is_file(), name
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["settings"]["n_frames"] == 10 and len(meta["settings"]["temperatures"]) == 2
    assert meta["info"]["n_frames"] == 10 and "phi_positive_fraction" in meta["info"]
    # md=remd: 2 fs steps with 4-amu hydrogens, recorded in the settings (the cache key)
    assert meta["settings"]["hydrogen_mass"] == 4.0 and meta["settings"]["timestep"] == 0.002
    assert meta["info"]["hydrogen_mass"] == 4.0
    mtime = (entry / "traj.h5").stat().st_mtime_ns

    out2 = _run(tmp_path)
    assert "(cache hit)" in out2
    assert (entry / "traj.h5").stat().st_mtime_ns == mtime

    out3 = _run(tmp_path, "md.seed=1")
    assert "(generated)" in out3
    assert len(list((tmp_path / "data" / "aldp_vacuum").iterdir())) == 2
