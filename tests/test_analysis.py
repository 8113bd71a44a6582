"""Free-energy analysis (bgflow_mini.analysis) of a peptide-like system with several
residues and named CVs of every kind: per-residue Ramachandran grid, PMFs of every CV,
ΔF of each residue's phi > 0 state. Samples are MD frames with made-up weights (no
training), so that every number can be recomputed here."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from bgflow_mini import analysis, plotting
from bgflow_mini import cv as cvmod
from bgflow_mini import free_energy as fe
from bgflow_mini.md import simulate
from bgflow_mini.systems import load_system
from bgflow_mini.targets import MolecularTarget

PI = math.pi


def _two_residues(folder: Path) -> Path:
    """aldp_vacuum with its backbone CVs renamed per residue: residue 1 = (phi, psi),
    residue 2 = (C-N-CA-CB, psi) (a second, different pair); chi1_1, a distance, an angle."""
    shutil.copytree(Path(load_system("aldp_vacuum").path), folder)
    cfg = yaml.safe_load((folder / "system.yaml").read_text())
    phi, psi = cfg["cvs"]["phi"], cfg["cvs"]["psi"]
    cfg["cvs"] = {
        "phi_1": phi,
        "psi_1": psi,
        "chi1_1": {"type": "torsion", "atoms": [6, 8, 10, 11]},
        "phi_2": {"type": "torsion", "atoms": [4, 6, 8, 10]},
        "psi_2": psi,
        "d_hb": {"type": "distance", "atoms": [5, 17]},
        "theta": {"type": "angle", "atoms": [6, 8, 14]},
    }
    cfg["states"] = {
        "phi_1_negative": {"phi_1": [-PI, 0.0]},
        "phi_1_positive": {"phi_1": [0.0, 2.0]},
        "phi_2_negative": {"phi_2": [-PI, 2.2]},  # C-N-CA-CB: near 2 rad, split there
        "phi_2_positive": {"phi_2": [2.2, PI]},
        "chi1_1_negative": {"chi1_1": [-PI, 1.0]},  # HB1 stays near 1 rad in short MD
        "chi1_1_positive": {"chi1_1": [1.0, PI]},
        "psi_1_negative": {"psi_1": [-PI, 0.5]},  # overlaps psi_1_positive: no ΔF
        "psi_1_positive": {"psi_1": [0.0, PI]},
        "c7eq": {"phi_1": [-PI, 0.0], "psi_1": [0.5, 2.5], "d_hb": [0.0, 0.25]},
    }
    (folder / "system.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    system = load_system(_two_residues(tmp_path_factory.mktemp("sys") / "pep2"))
    res = simulate(system, n_frames=800, save_every=50, seed=2, equilibration_steps=500,
                   progress=False)  # fmt: skip
    x = res.trajectory.xyz.reshape(800, -1).astype(np.float64)
    rng = np.random.default_rng(0)
    samples = SimpleNamespace(
        folder=Path("samples"),
        n=600,
        u=np.zeros(600),
        log_w=0.3 * rng.standard_normal(600),
        chunks=lambda: iter([x[200:400], x[400:]]),
    )
    return MolecularTarget(system), samples, (x[:400], "md.h5")


def test_analysis_of_several_residues(setup, tmp_path, monkeypatch):
    target, samples, md = setup
    grids = []
    real_grid = plotting.plot_ramachandran_grid

    def spy(path, rows, *args, **kwargs):
        grids.append({k: list(v) for k, v in rows.items()})
        return real_grid(path, rows, *args, **kwargs)

    monkeypatch.setattr(plotting, "plot_ramachandran_grid", spy)
    st = analysis.AnalysisSettings(bins=24, n_bootstrap=20, n_blocks=8)
    result, table = analysis.analyse(samples, target, tmp_path, st, md)

    # every backbone pair is a default 2-D surface and a row of the Ramachandran grid
    assert result["cvs_2d"] == [["phi_1", "psi_1"], ["phi_2", "psi_2"]]
    assert {"pmf_phi_1_psi_1.csv", "pmf_phi_2_psi_2.csv"} <= set(result["files"])
    columns = ["MD", "generator", next(k for k in grids[0]["residue 1"] if "ESS" in k)]
    assert grids == [{"residue 1": columns, "residue 2": columns}]
    assert (tmp_path / "ramachandran.png").stat().st_size > 10_000
    # a PMF (CSV and plot) for every named CV, torsion or not
    for name in target.cvs:
        assert f"pmf_{name}.csv" in result["files"] and f"pmf_{name}.png" in result["plots"]

    # ΔF of each <cv>_negative / <cv>_positive pair, per source, recomputed here
    pairs = result["state_delta_f"]
    assert list(pairs) == ["phi_1", "phi_2", "chi1_1", "psi_1"]
    assert "overlap" in pairs["psi_1"]["skipped"]  # reported, the rest goes on
    x = np.concatenate(list(samples.chunks()))
    v = cvmod.compute_cvs(x, target.cvs)
    v_md = cvmod.compute_cvs(md[0], target.cvs)
    for name in ("phi_2", "chi1_1"):
        p, a, b = pairs[name], f"{name}_negative", f"{name}_positive"
        rw = fe.state_delta_f(v, target.states, target.cvs, a, b, samples.log_w, 20, 0)
        ref = fe.md_delta_f(v_md, target.states, target.cvs, a, b, 8, 20, 0)
        assert p["reweighted"]["dF"] == pytest.approx(rw["dF"], rel=1e-12)
        assert p["md"]["dF"] == ref["dF"] and math.isfinite(ref["dF"])
        assert p["error_reweighted_vs_md"] == pytest.approx(rw["dF"] - ref["dF"])
        assert f"F({b}) - F({a})" in table
    assert result["state_delta_f"]["phi_1"]["state_b"] == "phi_1_positive"
    saved = json.loads((tmp_path / "free_energy.json").read_text())
    chi = pairs["chi1_1"]["md"]["dF"]
    assert saved["state_delta_f"]["chi1_1"]["md"]["dF"] == pytest.approx(chi)
    assert "| F(psi_1_positive) - F(psi_1_negative) | skipped (states overlap) |" in table


def test_main_delta_f_between_states_over_several_cvs(setup, tmp_path):
    target, samples, md = setup
    st = analysis.AnalysisSettings(
        cvs=["d_hb"], cvs_2d=[], state_a="phi_1_positive", state_b="c7eq", plots=True,
        bins=16, n_bootstrap=10, n_blocks=8,
    )  # fmt: skip
    result, _ = analysis.analyse(samples, target, tmp_path, st, md)
    x = np.concatenate(list(samples.chunks()))
    v = cvmod.compute_cvs(x, target.cvs)
    c7 = (v["phi_1"] < 0) & (v["psi_1"] >= 0.5) & (v["psi_1"] < 2.5) & (v["d_hb"] < 0.25)
    assert result["dF"]["unweighted"]["n_b"] == int(c7.sum()) > 0
    assert not (tmp_path / "ramachandran.png").exists()  # no backbone pair analysed
    assert result["files"] == ["pmf_d_hb.csv"]


def test_one_pair_keeps_the_single_figure(setup, tmp_path, monkeypatch):
    target, samples, md = setup
    calls = []
    monkeypatch.setattr(plotting, "plot_ramachandran_grid", lambda *a, **k: calls.append(a))
    st = analysis.AnalysisSettings(
        cvs=["phi_2", "psi_2"], cvs_2d=[["phi_2", "psi_2"]], bins=16, n_bootstrap=10,
        n_blocks=8,
    )  # fmt: skip
    result, _ = analysis.analyse(samples, target, tmp_path, st, md)
    assert calls == [] and "ramachandran.png" in result["plots"]
