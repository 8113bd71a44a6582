"""Console commands and package layout: the apps, their shipped configs and systems, lazy
sub-modules, and thin script shims."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

import pytest
import torch

import bgflow_mini

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "bgflow-train": "bgflow_mini.apps.train:main",
    "bgflow-sample": "bgflow_mini.apps.sample:main",
    "bgflow-free-energy": "bgflow_mini.apps.free_energy:main",
    "bgflow-md": "bgflow_mini.apps.run_md:main",
    "bgflow-system": "bgflow_mini.apps.build_system:main",
}


def test_entry_points_are_the_apps() -> None:
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    for name, value in COMMANDS.items():
        assert eps.get(name) == value
        module, func = value.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_configs_and_systems_ship_as_package_data() -> None:
    configs = resources.files("bgflow_mini.configs")
    for name in ("train.yaml", "sample.yaml", "free_energy.yaml", "run_md.yaml"):
        assert configs.joinpath(name).is_file(), name
    repo = sorted(
        p.relative_to(ROOT / "configs").as_posix() for p in ROOT.glob("configs/**/*.yaml")
    )
    assert repo and all(configs.joinpath(p).is_file() for p in repo)
    systems = resources.files("bgflow_mini.system_data")
    assert systems.joinpath("aldp_vacuum", "system.yaml").is_file()
    assert bgflow_mini.systems.system_search_paths()[-1] == Path(str(systems))
    assert "aldp_vacuum" in bgflow_mini.systems.available_systems()


def test_every_data_folder_is_a_listed_package() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    for top, package in (
        ("configs", "bgflow_mini.configs"),
        ("systems", "bgflow_mini.system_data"),
    ):
        for folder in (ROOT / top).iterdir():
            if folder.is_dir() and not folder.name.startswith((".", "_")):
                assert f"{package}.{folder.name}" in listed, f"{top}/{folder.name} is not shipped"


def test_command_runs_outside_the_checkout(tmp_path: Path) -> None:
    res = subprocess.run(
        ["bgflow-train", "--cfg", "job", "system=double_well"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        },
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "name: double_well" in res.stdout and "phases:" in res.stdout


def test_submodules_are_lazy_attributes() -> None:
    names = {m.name for m in pkgutil.iter_modules(bgflow_mini.__path__)}
    names -= {"apps", "configs", "system_data"}  # apps import Hydra; the others are data
    assert names == set(bgflow_mini.SUBMODULES)
    code = (
        "import sys, bgflow_mini as bg; assert 'bgflow_mini.md' not in sys.modules; "
        "print(bg.systems.load_system('aldp_vacuum').n_atoms, bg.reweighting.__name__)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["22", "bgflow_mini.reweighting"]
    with pytest.raises(AttributeError):
        bgflow_mini.no_such_module  # noqa: B018


@pytest.mark.parametrize("path", sorted((ROOT / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_scripts_are_thin_shims(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= 150
    assert "from bgflow_mini.apps." in text and "main()" in text


def test_cuda_runs_default_to_the_pytorch_force_field():
    """On CUDA the default OpenMM energy becomes TorchForceField on the device, unless the
    command line chose an energy; on CPU nothing changes."""
    from bgflow_mini.apps._common import device_default_energy

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    gpu = device_default_energy(cuda, "openmm", ["seed=1", "training.energy_budget=3"])
    assert gpu is not None and gpu._target_ == "bgflow_mini.energies.TorchForceField.from_openmm"
    assert device_default_energy(cpu, "openmm", []) is None
    assert device_default_energy(cuda, "torchff", []) is None
    for chosen in (["energy=openmm"], ["energy.platform=CUDA"], ["+energy.n_workers=1"]):
        assert device_default_energy(cuda, "openmm", chosen) is None, chosen


def test_user_errors_and_stalled_runs_exit_with_a_message(capsys, monkeypatch) -> None:
    from bgflow_mini.apps._common import run_app
    from bgflow_mini.training import TrainingStalled

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for err in (ValueError("bad value"), TrainingStalled("190 of the last 200 steps")):

        def body(err=err):
            raise err

        with pytest.raises(SystemExit) as exit_info:
            run_app(body)
        assert exit_info.value.code == 2
        assert f"error: {err.args[0]}" in capsys.readouterr().err
    with pytest.raises(RuntimeError):  # not a user error: the traceback stays
        run_app(lambda: (_ for _ in ()).throw(RuntimeError("bug")))
