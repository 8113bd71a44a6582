"""scripts/train.py end to end on a toy system: outputs, and SIGKILL + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
TINY = [
    "system=double_well",
    "progress=false",
    "data.toy.n_chains=64",
    "data.toy.n_steps=400",
    "data.toy.burn_in=100",
    "evaluation.n_samples=4000",
    "evaluation.n_bootstrap=20",
    "flow.n_blocks=2",
    "flow.hidden=[32,32]",
    "training.batch_size=128",
    "training.kl_batch_size=128",
    "training.eval_every=20",
    "training.metrics_every=10",
    "training.checkpoint_every=20",
    "training.ess_every=40",
    "training.ess_samples=256",
]


def phases(n_ml: int, n_mixed: int) -> str:
    return (
        f"training.phases=[{{name: ml, steps: {n_ml}, w_ml: 1.0}},"
        f"{{name: mixed, steps: {n_mixed}, w_ml: 0.5, w_kl: 1.0}}]"
    )


def command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *TINY, f"hydra.run.dir={run_dir}", *extra]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_outputs_of_a_short_run(tmp_path):
    out = tmp_path / "run"
    res = run(command(out, phases(60, 40)), tmp_path)
    assert "ESS (normalised)" in res.stdout and "dF exact" in res.stdout
    for name in [
        "config.yaml",
        "model.pt",
        "metrics.csv",
        "metrics.json",
        "log_weights.npy",
        "energies.npy",
        "samples.npy",
        "checkpoints/latest.pt",
        "checkpoints/best.pt",
        "plots/training.png",
        "plots/log_weights.png",
    ]:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["ess"] <= 1 and metrics["steps"] == 100
    assert abs(metrics["dF_exact"] - 3.380) < 1e-3
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,phase,loss") and len(rows) == 1 + 10


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    steps = phases(150, 150)
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    run(command(ref_dir, steps), tmp_path)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        command(cut_dir, steps),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = cut_dir / "checkpoints" / "latest.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < killed_at < 300, "the run was not interrupted mid-way"
    assert not (cut_dir / "metrics.json").exists()

    run(
        [
            sys.executable,
            str(SCRIPT),
            f"resume={cut_dir}",
            "progress=false",
            f"hydra.run.dir={tmp_path / 'resume_log'}",
        ],
        tmp_path,
    )
    ref = torch.load(ref_dir / "checkpoints" / "latest.pt", weights_only=False)
    got = torch.load(ckpt, weights_only=False)
    assert got["step"] == ref["step"] == 300
    assert [r["loss"] for r in got["history"]] == [r["loss"] for r in ref["history"]]
    for k, v in ref["model"].items():
        assert torch.equal(v, got["model"][k]), k
    m_ref = json.loads((ref_dir / "metrics.json").read_text())
    m_got = json.loads((cut_dir / "metrics.json").read_text())
    assert m_got["ess"] == pytest.approx(m_ref["ess"], rel=1e-12)
    csv_ref = (ref_dir / "metrics.csv").read_text().splitlines()
    csv_got = (cut_dir / "metrics.csv").read_text().splitlines()
    strip = lambda rows: [r.rsplit(",", 1)[0] for r in rows]  # noqa: E731 - drop elapsed_s
    assert strip(csv_got) == strip(csv_ref)


def test_resume_without_run_folder_is_a_clear_error(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            f"resume={tmp_path / 'nope'}",
            "progress=false",
            f"hydra.run.dir={tmp_path / 'log'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0
    assert "no config.yaml" in res.stderr + res.stdout
