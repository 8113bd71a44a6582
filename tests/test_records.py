"""Tests of reading step records back from the device."""

from __future__ import annotations

import pytest
import torch

from bgflow_mini.records import read_back


def test_read_back_converts_every_scalar_tensor_by_its_dtype():
    records = [
        {"step": 1, "loss": torch.tensor(1.5), "skipped": torch.tensor(False)},
        {"step": 2, "n": torch.tensor(2**40 + 3), "ess": torch.tensor(0.25, dtype=torch.float64)},
        {"phase": "ml", "flag": torch.tensor(True), "nan": torch.tensor(float("nan"))},
    ]
    read_back(records)
    assert records[0] == {"step": 1, "loss": 1.5, "skipped": False}
    assert type(records[0]["skipped"]) is bool and type(records[1]["n"]) is int
    assert records[1] == {"step": 2, "n": 2**40 + 3, "ess": 0.25}
    assert records[2]["flag"] is True and records[2]["phase"] == "ml"
    assert records[2]["nan"] != records[2]["nan"]  # NaN stays NaN
    read_back([])  # nothing to do


def test_read_back_refuses_a_non_scalar():
    with pytest.raises(ValueError, match="shape"):
        read_back([{"x": torch.zeros(3)}])
