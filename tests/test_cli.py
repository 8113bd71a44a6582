"""Console commands: they find the checkout's scripts and run them with the given overrides."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from bgflow_mini import cli

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "bgflow-train": ("train", "train"),
    "bgflow-sample": ("sample", "sample"),
    "bgflow-free-energy": ("free_energy", "free_energy"),
    "bgflow-md": ("run_md", "run_md"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_script_path(command: str) -> None:
    func, script = COMMANDS[command]
    assert cli.script_path(script) == ROOT / "scripts" / f"{script}.py"
    assert callable(getattr(cli, func))


def test_script_path_missing_checkout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pip install -e"):
        cli.script_path("train", root=tmp_path)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "train.py").write_text("")
    with pytest.raises(FileNotFoundError, match="configs"):
        cli.script_path("train", root=tmp_path)


def test_entry_points_declared() -> None:
    """The installed distribution declares every command (needs pip install -e .)."""
    eps = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    for command, (func, _) in COMMANDS.items():
        assert eps.get(command) == f"bgflow_mini.cli:{func}"


def test_train_command_passes_overrides(tmp_path: Path) -> None:
    """The command runs scripts/train.py with the overrides (Hydra prints the job config)."""
    code = "import sys; from bgflow_mini.cli import train; train()"
    out = subprocess.run(
        [sys.executable, "-c", code, "--cfg", "job", "flow=nice", "seed=7"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "kind: nice" in out.stdout and "seed: 7" in out.stdout
