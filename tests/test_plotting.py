"""Tests of the training-curve plot and its moving-average helper."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from bgflow_mini import plotting
from bgflow_mini.plotting import moving_average, plot_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(n: int = 300, seed: int = 0) -> list[dict]:
    """Records shaped like Trainer.history: ML phase, then mixed ML + KL with periodic evals."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(1, n + 1):
        rec = {
            "step": step,
            "phase": "ml" if step <= n // 3 else "mixed",
            "lr": 1e-3 * 0.5 * (1 + math.cos(math.pi * step / n)) + 1e-6,
            "nll": -220.0 + 400.0 * math.exp(-step / 10) + rng.normal(0, 2),
            "grad_norm": float(abs(rng.normal(5, 2))) + 0.1,
            "skipped": False,
        }
        if step > n // 3:
            rec["kl"] = 215.0 + 1e4 * math.exp(-(step - n // 3) / 5) + rng.normal(0, 3)
            rec["ess"] = float(rng.uniform(0, 0.4))
            rec["n_nonfinite"] = 0
            if step % 25 == 0:
                rec["ess_eval"] = 0.1 + 0.0002 * step
        if step % 50 == 0:
            rec["val_nll"] = -215.0 + 400.0 * math.exp(-step / 10)
        rec["loss"] = rec["nll"] + rec.get("kl", 0.0)
        out.append(rec)
    out[5]["nll"] = float("nan")  # a non-finite value is skipped, not fatal
    return out


def _assert_png(path) -> None:
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_training_curves_all_keys(tmp_path, monkeypatch) -> None:
    calls = []
    orig_save = plotting._save

    def spy(fig, path):
        calls.append([ax.get_ylabel() for ax in fig.axes])
        vlines = [
            line.get_xdata()[0]
            for line in fig.axes[0].get_lines()
            if line.get_linestyle() == "--" and len(line.get_xdata()) == 2
        ]
        calls.append(vlines)
        return orig_save(fig, path)

    monkeypatch.setattr(plotting, "_save", spy)
    out = plot_training_curves(tmp_path / "sub" / "training.png", _history(), title="aldp")
    _assert_png(out)
    labels, vlines = calls
    assert labels == [
        "NLL (kT)",
        "reverse KL (kT)",
        "normalised ESS",
        "learning rate",
        "gradient norm",
    ]
    assert vlines == [101]  # one phase change: first "mixed" record
    assert plt.get_fignums() == []  # figure closed


def test_training_curves_nll_only(tmp_path, monkeypatch) -> None:
    labels = []
    orig_save = plotting._save

    def spy(fig, path):
        labels.extend(ax.get_ylabel() for ax in fig.axes)
        return orig_save(fig, path)

    monkeypatch.setattr(plotting, "_save", spy)
    history = [{"step": i, "nll": -200.0 - i} for i in range(1, 40)]
    out = plot_training_curves(tmp_path / "nll.png", history)
    _assert_png(out)
    assert labels == ["NLL (kT)"]  # panels without data are skipped


def test_training_curves_empty_history(tmp_path) -> None:
    _assert_png(plot_training_curves(tmp_path / "empty.png", []))


def test_nll_and_kl_have_separate_axes(tmp_path, monkeypatch) -> None:
    """The original bug: NLL (~-220) and KL (~+215) on one axis were flat lines."""
    limits = []
    orig_save = plotting._save

    def spy(fig, path):
        limits.extend(ax.get_ylim() for ax in fig.axes[:2])
        return orig_save(fig, path)

    monkeypatch.setattr(plotting, "_save", spy)
    plot_training_curves(tmp_path / "t.png", _history())
    (nlo, nhi), (klo, khi) = limits
    assert nlo < -220 < nhi < 215  # each axis covers its own plateau but not the other's
    assert -220 < klo < 215 < khi
    assert khi < 1000  # the initial KL transient (1e4 kT) does not set the scale


def test_moving_average_values() -> None:
    v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    np.testing.assert_allclose(moving_average(v, 3), [1.0, 1.5, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(moving_average(v, 1), v)
    np.testing.assert_allclose(moving_average(v, 100), np.cumsum(v) / np.arange(1, 7))
    # a constant series stays constant; a step is smoothed over the window
    np.testing.assert_allclose(moving_average(np.full(10, 0.3), 4), np.full(10, 0.3))
    step = moving_average([0, 0, 0, 0, 4, 4, 4, 4], 4)
    np.testing.assert_allclose(step, [0, 0, 0, 0, 1, 2, 3, 4])
    # non-finite values are left out of the mean; an all-NaN window gives NaN
    got = moving_average([np.nan, 2.0, np.inf, 4.0], 2)
    assert math.isnan(got[0])
    np.testing.assert_allclose(got[1:], [2.0, 2.0, 4.0])
    assert moving_average([], 5).shape == (0,)


@pytest.mark.parametrize("window", [0, -1, 2.5, True])
def test_moving_average_bad_window(window) -> None:
    with pytest.raises(ValueError, match="window"):
        moving_average([1.0, 2.0], window)


# ---- Ramachandran plots of several residues ------------------------------------------------


def _panels(rng, shift: float) -> dict[str, tuple]:
    phi = rng.normal(-1.4 + shift, 0.3, 2000)
    psi = rng.normal(1.2, 0.4, 2000)
    return {
        "MD": (phi, psi),
        "generator": (phi + 0.1, psi),
        "generator, reweighted": (phi, psi, rng.normal(0, 1, 2000)),
    }


def test_ramachandran_grid_of_five_residues_is_readable(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    rows = {f"residue {k}": _panels(rng, 0.1 * k) for k in range(1, 6)}
    figs = []
    save = plotting._save
    monkeypatch.setattr(plotting, "_save", lambda fig, path: (figs.append(fig), save(fig, path))[1])
    path = plotting.plot_ramachandran_grid(tmp_path / "grid.png", rows, title="pep5")
    _assert_png(path)
    fig = figs[0]
    maps = [ax for ax in fig.axes if ax.collections and ax.get_aspect() == 1.0]
    assert len(maps) == 15  # 5 residues x 3 sources, square (+ one colour bar)
    width = min(ax.get_position().width * fig.get_figwidth() for ax in maps)
    assert width > 1.8  # inches per panel: readable at 5 rows
    assert fig.get_figheight() < 16 and fig.get_figwidth() < 12
    titles = [ax.get_title() for ax in maps[:3]]
    assert titles == ["MD", "generator", "generator, reweighted"]  # columns, top row only
    assert [maps[3 * i].get_ylabel().split("\n")[0] for i in range(5)] == list(rows)
    assert not any(ax.get_title() for ax in maps[3:])
    assert [ax.get_xlabel() for ax in maps[12:]] == [r"$\phi$ (rad)"] * 3  # bottom row only
    assert not any(ax.get_xlabel() for ax in maps[:12])
    rows["residue 5"] = {"MD": rows["residue 5"]["MD"]}
    with pytest.raises(ValueError, match="row 'residue 5' has panels"):
        plotting.plot_ramachandran_grid(tmp_path / "bad.png", rows)


def test_ramachandran_pairs_picks_figure_and_labels(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(1)
    v = {"phi_1": rng.uniform(-3, 3, 500), "psi_1": rng.uniform(-3, 3, 500)}
    v.update(phi_2=v["phi_1"], psi_2=v["psi_1"])
    sources = {"MD": (v, None), "reweighted": (v, np.zeros(500))}
    called = []
    monkeypatch.setattr(plotting, "plot_ramachandran_grid", lambda p, rows, *a: called.append(rows))
    assert plotting.plot_ramachandran_pairs(tmp_path / "none.png", [], sources) is None
    one = plotting.plot_ramachandran_pairs(tmp_path / "one.png", [("1", "phi_1", "psi_1")], sources)
    _assert_png(one)
    assert called == []
    pairs = [("1", "phi_1", "psi_1"), ("2", "phi_2", "psi_2")]
    plotting.plot_ramachandran_pairs(tmp_path / "two.png", pairs, sources)
    assert list(called[0]) == ["residue 1", "residue 2"]
    assert list(called[0]["residue 2"]) == ["MD", "reweighted"]
    assert called[0]["residue 2"]["reweighted"][2] is sources["reweighted"][1]
    assert plotting.cv_label("phi") == r"$\phi$" and plotting.cv_label("psi_2") == r"$\psi_{2}$"
    assert plotting.cv_label("chi1_3") == r"$\chi_{1,3}$" and plotting.cv_label("d_hb") == "d_hb"
