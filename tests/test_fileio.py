"""Atomic writes: a failed write leaves the old file; readers get clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bgflow_mini.fileio import atomic_path, load_torch, save_json, save_npy, save_torch


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = save_json({"a": np.float64(1.5), "b": np.arange(2)}, tmp_path / "m.json")
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"a":1.5,"b":[0,1]}'
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert '"a": 1.5' in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]  # no temp file left


def test_round_trips_and_truncation(tmp_path: Path) -> None:
    a = np.linspace(0, 1, 7)
    np.testing.assert_array_equal(np.load(save_npy(a, tmp_path / "a.npy")), a)
    state = {"w": torch.arange(5.0), "step": 3, "history": [{"loss": 1.0}]}
    good = save_torch(state, tmp_path / "best.pt")
    got = load_torch(good)
    assert torch.equal(got["w"], state["w"]) and got["history"] == state["history"]
    bad = tmp_path / "latest.pt"
    bad.write_bytes(good.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"cannot read .*latest\.pt.*best\.pt"):
        load_torch(bad, alternative=good)
    with pytest.raises(ValueError) as info:
        load_torch(bad, alternative=bad)  # no point offering the same broken file
    assert "use it instead" not in str(info.value)
    with pytest.raises(FileNotFoundError):
        load_torch(tmp_path / "none.pt")


class Payload:
    """An arbitrary class: unpickling it would run code of its module."""


def test_weights_only_refuses_arbitrary_objects(tmp_path: Path) -> None:
    torch.save({"obj": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot read"):
        load_torch(tmp_path / "evil.pt")
