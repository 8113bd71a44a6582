"""Sweeps with Hydra launchers: 2-job joblib and submitit_local sweeps of a tiny toy run end to
end, the SLURM preset as sbatch would see it, and the per-job CPU budget
(:mod:`bgflow_mini.apps.resources`) in every case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from bgflow_mini.apps import resources
from bgflow_mini.apps.resources import Budget, job_budget, plan
from bgflow_mini.replica import available_cores

JOBLIB = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}
LOCAL = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"}
SLURM = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}
BASIC = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}

# a tiny toy run as an experiment file: the job folders' names stay short
TINY = """# @package _global_
defaults:
  - override /system: double_well
progress: false
data:
  toy: {n_chains: 32, n_steps: 200, burn_in: 50}
evaluation: {n_samples: 1000, n_bootstrap: 10}
flow: {n_blocks: 2, hidden: [16, 16]}
training:
  batch_size: 64
  kl_batch_size: 64
  eval_every: 10
  metrics_every: 10
  checkpoint_every: 20
  ess_every: 20
  ess_samples: 128
  phases:
    - {name: ml, steps: 20, w_ml: 1.0}
    - {name: mixed, steps: 10, w_ml: 0.5, w_kl: 1.0}
"""


# ---------------------------------------------------------------- the per-job budget


@pytest.mark.parametrize(
    "launcher, env, cores, expected, reason",
    [
        (None, {}, 8, 8, "no launcher"),
        (BASIC, {}, 8, 8, "no launcher"),
        (None, {"SLURM_CPUS_PER_TASK": "6"}, 64, 6, "SLURM_CPUS_PER_TASK=6"),
        ({**JOBLIB, "n_jobs": 2}, {}, 8, 4, "joblib n_jobs=2"),
        ({**JOBLIB, "n_jobs": 3}, {}, 8, 2, "// 3 job"),
        ({**JOBLIB, "n_jobs": -1}, {}, 8, 1, "// 8 job"),  # joblib: -1 is one job per core
        ({**JOBLIB, "n_jobs": -2}, {}, 8, 1, "// 7 job"),
        ({**JOBLIB, "n_jobs": 16}, {}, 8, 1, "// 16 job"),  # never below one core
        ({**JOBLIB, "n_jobs": 4}, {"SLURM_CPUS_PER_TASK": "16"}, 64, 4, "SLURM_CPUS_PER_TASK"),
        ({**LOCAL, "cpus_per_task": 3}, {}, 8, 3, "submitit_local cpus_per_task=3"),
        ({**LOCAL, "cpus_per_task": None}, {}, 8, 1, "all jobs at once"),
        ({**SLURM, "cpus_per_task": 4}, {"SLURM_CPUS_PER_TASK": "4"}, 64, 4, "cpus_per_task=4"),
        ({**SLURM, "cpus_per_task": None}, {"SLURM_CPUS_PER_TASK": "5"}, 64, 5, "SLURM_CPUS"),
        ({**SLURM, "cpus_per_task": None}, {}, 2, 2, "SLURM allocation"),
    ],
)
def test_job_budget(launcher, env, cores, expected, reason) -> None:
    budget = job_budget(launcher, env, cores)
    assert budget.cores == expected and reason in budget.reason
    assert budget.limited == (launcher not in (None, BASIC) or bool(env))


def test_plan_sizes_null_settings_to_the_budget() -> None:
    res = plan(Budget(3, "test", True), None, None, 2)
    assert (res.threads, res.md_workers, res.energy_workers) == (3, 3, 2)
    res = plan(Budget(1, "test", True), None, None, 2)  # energy workers lowered to the budget
    assert (res.threads, res.md_workers, res.energy_workers) == (1, 1, 1)
    assert any("lowered" in n for n in res.notes)
    assert plan(Budget(1, "test", True), None, None, 0).energy_workers == 0  # in-process
    assert plan(Budget(4, "test", True), None, None, None).energy_kwargs() == {}  # torchff


def test_plan_keeps_explicit_settings_and_warns_above_the_budget(caplog) -> None:
    res = plan(Budget(2, "test", True), 1, 1, 2)
    assert (res.threads, res.md_workers, res.energy_workers) == (1, 1, 2) and not caplog.records
    res = plan(Budget(2, "test", True), 4, 3, 2)
    assert (res.threads, res.md_workers) == (4, 3)
    assert "oversubscribe" in res.summary() and len(caplog.records) == 2


def test_plan_changes_nothing_without_a_limit() -> None:
    res = plan(Budget(64, "test", False), None, None, 2)  # a plain run: today's defaults
    assert (res.threads, res.md_workers, res.energy_workers) == (None, None, 2)
    assert res.energy_kwargs() == {"n_workers": 2}


def test_job_resources_reads_the_config_and_sets_torch_threads(monkeypatch, caplog) -> None:
    assert resources.launcher_config() is None  # not inside a Hydra multirun job
    cfg = OmegaConf.create(
        {"num_threads": None, "data": {"n_workers": None}, "energy": {"n_workers": 2}}
    )
    monkeypatch.setattr(resources, "launcher_config", lambda: {**JOBLIB, "n_jobs": 1})
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    old = torch.get_num_threads()
    try:
        caplog.set_level("INFO", logger=resources.__name__)
        res = resources.job_resources(cfg)
        assert torch.get_num_threads() == 1 == res.threads == res.md_workers == res.energy_workers
        assert "SLURM_CPUS_PER_TASK=1" in caplog.text and "joblib n_jobs=1" in caplog.text
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------- launcher configs


def test_slurm_preset_reaches_sbatch(tmp_path, monkeypatch) -> None:
    submitit = pytest.importorskip("submitit")
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module("bgflow_mini.configs", version_base="1.3"):
        for name in ("joblib", "submitit_local", "submitit_slurm"):  # the plugins' own
            cfg = compose("train", [f"hydra/launcher={name}"], return_hydra_config=True)
            assert "hydra_plugins" in cfg.hydra.launcher._target_
        cfg = compose(
            "train",
            [
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=1",
                f"hydra.sweep.dir={tmp_path / 'sweep'}",
            ],
            return_hydra_config=True,
        )
    fake = tmp_path / "bin"  # submitit looks for srun before it builds anything
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    got = {}

    class Captured(Exception):
        pass

    def capture(executor, fn, *args):  # stands in for the sbatch call
        got.update(executor=executor._executor, n_jobs=len(args[0]))
        raise Captured

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    with pytest.raises(Captured):
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    params = got["executor"].parameters
    assert got["n_jobs"] == 2
    assert params["partition"] == "gpu" and params["gpus_per_node"] == 1
    assert params["cpus_per_task"] == 4 and params["time"] == 240 and params["mem"] == "8GB"
    assert params["array_parallelism"] == 16
    sbatch = got["executor"]._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--cpus-per-task=4", "--gpus-per-node=1", "--time=240"):
        assert f"#SBATCH {line}" in sbatch


# ---------------------------------------------------------------- sweeps end to end


@pytest.mark.parametrize(
    "launcher, expected_cores",
    [
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], max(1, available_cores() // 2)),
        (
            [
                "hydra/launcher=submitit_local",
                "hydra.launcher.cpus_per_task=1",
                "hydra.launcher.timeout_min=5",
            ],
            1,
        ),
    ],
    ids=["joblib", "submitit_local"],
)
def test_two_job_sweep(tmp_path: Path, launcher: list[str], expected_cores: int) -> None:
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "tiny.yaml").write_text(TINY)
    sweep = tmp_path / "sweep"
    command = [
        str(Path(sys.executable).parent / "bgflow-train"),  # the installed command
        "-m",
        "--config-dir",
        str(tmp_path / "conf"),
        "experiment=tiny",
        *launcher,
        "num_threads=null",  # size torch threads to the job's budget
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    ]
    res = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0_experiment=tiny,num_threads=null,seed=0",
                                      "1_experiment=tiny,num_threads=null,seed=1"]  # fmt: skip
    seeds = []
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["steps"] == 30 and 0 < metrics["ess"] <= 1
        budget = metrics["resources"]["budget"]
        assert budget["cores"] == expected_cores and budget["limited"]
        assert metrics["resources"]["threads"] == expected_cores
        assert "resources:" in (job / "train.log").read_text()
        seeds.append(yaml.safe_load((job / "config.yaml").read_text())["seed"])
    assert seeds == [0, 1]
    assert not (tmp_path / "multirun").exists() and (sweep / "multirun.yaml").is_file()
