"""bgflow-train (scripts/train.py) end to end on a toy system: outputs, SIGKILL + resume,
resume overrides, and config mistakes caught before any work starts."""

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
import yaml

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


def assert_same_checkpoint(ref_path: Path, got_path: Path, step: int) -> None:
    """Two training checkpoints at ``step`` with the same loss history and weights."""
    ref = torch.load(ref_path, weights_only=True)
    got = torch.load(got_path, weights_only=True)
    assert got["step"] == ref["step"] == step
    assert [r["loss"] for r in got["history"]] == [r["loss"] for r in ref["history"]]
    for k, v in ref["model"].items():
        assert torch.equal(v, got["model"][k]), k


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
    assert "ESS (normalised)" in res.stdout and "3.380 (exact)" in res.stdout
    for name in [
        "config.yaml",
        "model.pt",
        "metrics.csv",
        "metrics.json",
        "log_weights.npy",
        "energies.npy",
        "samples.npy",
        "log_q.npy",
        "summary.json",
        "checkpoints/latest.pt",
        "checkpoints/best.pt",
        "plots/training.png",
        "plots/log_weights.png",
    ]:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["ess"] <= 1 and metrics["steps"] == 100
    assert 0 < metrics["evaluation_time_s"] < metrics["wall_time_s"]
    summary = json.loads((out / "summary.json").read_text())
    # the sample folder's timing is not measured apart from the metrics: null, not 1e14
    assert summary["wall_time_s"] is None and summary["samples_per_s"] is None
    assert abs(metrics["dF_reference"] - 3.380) < 1e-3 and metrics["dF_reference_kind"] == "exact"
    assert metrics["state_a"] == "A" and metrics["state_b"] == "B"
    pops = metrics["state_populations"]
    assert pops["A"]["reweighted"] + pops["B"]["reweighted"] == pytest.approx(1.0)
    assert metrics["finite_energy_fraction"] == 1.0 and metrics["n_energies_above_cap"] >= 0
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,phase,loss") and len(rows) == 1 + 10
    assert "n_capped_total" in rows[0] and "n_nonfinite_total" in rows[0]

    # resume a finished run with a safe override: evaluation is redone with it
    res = run(
        [
            sys.executable,
            str(SCRIPT),
            f"resume={out}",
            "evaluation.n_samples=1000",
            "evaluation.ais.steps=4",  # the evaluation again on AIS samples
            "training.compile=false",  # resume-safe: same numbers, compiled or not
            "progress=false",
            f"hydra.run.dir={tmp_path / 'r1'}",
        ],
        tmp_path,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == 1000
    ais = metrics["ais"]
    assert ais["sampler"]["kind"] == "ais" and ais["sampler"]["steps"] == 4
    assert ais["n_samples"] == 1000 and 0 < ais["ess"] <= 1 and "test_nll" not in ais
    assert abs(ais["dF_error"]) < 5 * ais["dF_reweighted_stderr"] + 0.05  # exact reference
    assert ais["energy_evaluations"] == 1000 * 5 + 4 * 512 * 5
    assert "AIS (4 steps" in res.stdout
    assert "n_samples: 1000" in (out / "config.yaml").read_text()
    # an override that changes what is trained is refused, naming it
    bad = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            f"resume={out}",
            "training.lr=0.1",
            "data.state_floor=0.1",  # the ML draws: a training change too
            "progress=false",
            f"hydra.run.dir={tmp_path / 'r2'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "training.lr" in bad.stderr and "Traceback" not in bad.stderr
    assert "'data.state_floor'" in bad.stderr
    # a checkpoint truncated by a crash: a message naming it and offering best.pt
    latest = out / "checkpoints" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:500])
    bad = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            f"resume={out}",
            "progress=false",
            f"hydra.run.dir={tmp_path / 'r3'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "latest.pt" in bad.stderr and "best.pt" in bad.stderr
    # ... and resuming from best.pt, as offered, works
    cmd = [sys.executable, str(SCRIPT), f"resume={out / 'checkpoints' / 'best.pt'}"]
    run([*cmd, "progress=false", f"hydra.run.dir={tmp_path / 'r4'}"], tmp_path)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert Path(saved["data_dir"]).is_absolute()  # resumable from another folder


ANNEALED = (
    "training.phases=[{name: kl_hot, steps: 100, w_ml: 0, w_kl: 1, temperature: 4.0},"
    "{name: iw_2, steps: 100, w_ml: 0, w_iw: 1, temperature: 2.0},"
    "{name: iw_1, steps: 100, w_ml: 0, w_iw: 1, temperature: 1.0}]"
)
# state feedback that moves at every estimate (no dead band, no minimum ESS)
FEEDBACK = (
    "training.state_feedback={_target_: bgflow_mini.state_feedback.StateFeedback, "
    "_partial_: true, min_ess: 0, tolerance: 0, gain: 1.0}"
)


@pytest.mark.parametrize(
    "steps",
    [phases(150, 150), ANNEALED, FEEDBACK],
    ids=["ml_then_mixed", "annealed", "state_feedback"],
)
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, steps):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    kill_after = 0  # the first checkpoint
    if steps == FEEDBACK:  # the resumed run must draw with the factors it had reached:
        steps = (phases(150, 150), FEEDBACK)  # killed after the updates at 160 and 200
        kill_after = 220
    elif steps == ANNEALED:
        steps = (
            "training=annealed",
            steps,
            "training.buffer_size=512",
            "training.resample_every=20",
        )
    else:
        steps = (steps,)
    run(command(ref_dir, *steps), tmp_path)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        command(cut_dir, *steps),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = cut_dir / "checkpoints" / "latest.pt"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= kill_after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert max(kill_after, 1) <= killed_at < 300, "the run was not interrupted mid-way"
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
    assert_same_checkpoint(ref_dir / "checkpoints" / "latest.pt", ckpt, 300)
    m_ref = json.loads((ref_dir / "metrics.json").read_text())
    m_got = json.loads((cut_dir / "metrics.json").read_text())
    assert m_got["ess"] == pytest.approx(m_ref["ess"], rel=1e-12)
    csv_ref = (ref_dir / "metrics.csv").read_text().splitlines()
    csv_got = (cut_dir / "metrics.csv").read_text().splitlines()
    col = csv_ref[0].split(",").index("elapsed_s")

    def strip(rows):  # wall-clock times differ: drop elapsed_s
        return [r.split(",")[:col] + r.split(",")[col + 1 :] for r in rows]

    assert strip(csv_got) == strip(csv_ref)
    if FEEDBACK in steps:  # the factors moved, or the test would not test the replay
        factors = m_ref["state_feedback"]["factors"]
        assert m_ref["state_feedback"]["updates"] >= 3 and max(factors.values()) > 1.05
        assert m_got["state_feedback"] == m_ref["state_feedback"]


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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.phases.0.steps=0", "training.phases.0.steps"),
        ("training.batch_size=abc", "training.batch_size"),
        ("training.lr=-1", "training.lr"),
        ("evaluation.state_b=Bee", "evaluation.state_b='Bee'"),
        ("dtype=half", "float32"),
        ("device=tpu", "device"),
        ("data.fractions=[0.5,0.5]", "data.fractions"),
        ("evaluation.md_reference_seeds=[0]", "evaluation.md_reference_seeds=[0]"),
        ("data.state_floor=0.5", "data.state_floor"),
    ],
)
def test_config_mistakes_stop_before_any_work(tmp_path, override, message):
    out = tmp_path / "run"
    res = subprocess.run(
        command(out, phases(5, 5), override),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (out / "checkpoints").exists() and not (out / "config.yaml").exists()


def test_state_floor_reaches_the_ml_draws_and_metrics(tmp_path):
    """data.state_floor=0.45 raises the less-sampled well's share of the ML draws (the toy's
    Metropolis chains start in both wells: about 0.4) to 0.45, metrics.json records it, and
    the reweighted dF still matches the exact 3.380 kT (the effect on a rare state:
    tests/test_state_balance.py)."""
    out = tmp_path / "run"
    res = run(command(out, phases(60, 40), "data.state_floor=0.45"), tmp_path)
    assert "| ML draws, state floor 0.45: share before -> after | " in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    floor = metrics["data_info"]["state_floor"]
    shares = {s: floor["states"][s]["after"] for s in ("A", "B")}
    assert floor["floor"] == 0.45 and min(shares.values()) == pytest.approx(0.45, rel=1e-3)
    assert min(floor["states"][s]["before"] for s in ("A", "B")) < 0.45
    # the raised well's collapse and overfill reference is its floored share (the 300 K
    # training frames alone hold less), the other well keeps its share of the frames
    raised = [s for s in ("A", "B") if floor["states"][s]["raised"]]
    assert len(raised) == 1 and floor["states"][raised[0]]["before"] < 0.45
    reference = metrics["training_state_populations_reference"]
    assert reference[raised[0]] == pytest.approx(0.45, rel=1e-3)
    other = ({"A", "B"} - set(raised)).pop()
    assert reference[other] == pytest.approx(floor["states"][other]["before"], abs=1e-3)
    assert abs(metrics["dF_error"]) < 5 * metrics["dF_reweighted_stderr"] + 0.05


def test_unsupported_molecules_are_refused_before_md(tmp_path):
    folder = tmp_path / "aldp_hbonds"
    folder.mkdir()
    src = ROOT / "systems" / "aldp_vacuum"
    (folder / "aldp.pdb").write_bytes((src / "aldp.pdb").read_bytes())
    text = (src / "system.yaml").read_text().replace("constraints: null", "constraints: HBonds")
    (folder / "system.yaml").write_text(text.replace("name: aldp_vacuum", "name: aldp_hbonds"))
    args = [
        sys.executable,
        str(SCRIPT),
        f"system.load.name_or_path={folder}",
        "system.name=x",
        f"data_dir={tmp_path / 'data'}",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "constraints 'HBonds'" in res.stderr
    assert not (tmp_path / "data").exists()  # no MD was started


def test_annealed_training_runs_from_the_energy_alone(tmp_path):
    out = tmp_path / "run"
    phases = (
        "training.phases=[{name: kl_hot, steps: 30, w_ml: 0, w_kl: 1, temperature: 4.0},"
        "{name: iw_2, steps: 20, w_ml: 0, w_iw: 1, temperature: 2.0},"
        "{name: iw_1, steps: 20, w_ml: 0, w_iw: 1, temperature: 1.0}]"
    )
    extra = ["training=annealed", phases, "training.buffer_size=512", "training.resample_every=10"]
    run(command(out, *extra), tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    # 30 reverse-KL steps of 128 samples, 4 buffer refills of 512, ESS estimates of 256
    n_ess = 70 // 40
    assert metrics["energy_evaluations"]["training"] == 30 * 128 + 4 * 512 + n_ess * 256
    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    temps = {r.split(",")[header.index("temperature")] for r in rows[1:]}
    assert temps == {"4.0", "2.0", "1.0"} and "ess_buffer" in header


@pytest.mark.slow
def test_compiled_run_trains_the_same_model(tmp_path):
    """``training.compile=true`` (inductor) gives the eager run's losses to rounding."""
    losses = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        res = run(command(out, phases(30, 20), f"training.compile={flag}"), tmp_path)
        assert "running it without compilation" not in res.stderr
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["compiled_flows"] == (1 if flag == "true" else 0)
        ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
        losses[flag] = torch.tensor([float(r["loss"]) for r in ckpt["history"]])
    assert len(losses["true"]) == 50
    torch.testing.assert_close(losses["true"], losses["false"], rtol=1e-4, atol=1e-4)
