"""ML draw weights with a floor on every state's share (bgflow_mini.state_balance)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bgflow_mini import BoltzmannGenerator, DiagonalNormal, Phase, Trainer
from bgflow_mini.cv import in_state
from bgflow_mini.energies import DoubleWell
from bgflow_mini.flows import coupling_flow
from bgflow_mini.pipeline import DataSplit, apply_state_floor, check_state_floor
from bgflow_mini.reweighting import free_energy_difference
from bgflow_mini.state_balance import (
    disjoint_states,
    max_floor,
    state_floor_log_weights,
    state_masks,
)

ROOT = Path(__file__).resolve().parents[1]


def _share(lw: np.ndarray, mask: np.ndarray) -> float:
    w = np.exp(lw - lw.max())
    return float(w[mask].sum() / w.sum())


@pytest.mark.parametrize("floor", [0.05, 0.2, 0.45])
def test_a_rare_state_reaches_the_floor_and_ratios_inside_and_outside_are_kept(floor):
    rng = np.random.default_rng(0)
    n = 5000
    rare = rng.random(n) < 0.01
    lw0 = rng.normal(size=n)  # e.g. MBAR weights of a replica pool
    lw, report = state_floor_log_weights(lw0, {"rare": rare, "common": ~rare}, floor)
    assert _share(lw, rare) == pytest.approx(floor, rel=1e-3)
    assert report["states"]["rare"]["before"] == pytest.approx(_share(lw0, rare))
    assert report["states"]["rare"]["after"] == pytest.approx(floor, rel=1e-3)
    assert report["states"]["rare"]["raised"] and not report["states"]["common"]["raised"]
    assert lw.max() == pytest.approx(0.0)
    # inside the rare state and outside it, the weights keep their ratios
    for m in (rare, ~rare):
        d = (lw - lw0)[m]
        np.testing.assert_allclose(d, d[0], atol=1e-10)
    assert report["kish_frames"] < report["kish_frames_before"]


def test_overlapping_states_all_reach_the_floor():
    rng = np.random.default_rng(1)
    n = 20000
    phi = rng.random(n) < 0.006  # phi > 0, and three chi1 rotamers across it
    chi = rng.choice(3, size=n, p=[0.6, 0.38, 0.02])
    masks = {"phi_pos": phi, "phi_neg": ~phi, **{f"chi{k}": chi == k for k in range(3)}}
    lw, report = state_floor_log_weights(None, masks, 0.1)
    for name, m in masks.items():
        assert _share(lw, m) >= 0.1 * (1 - 1e-3), name
    # rows in the same states keep their relative weights (six cells of phi x chi)
    for pos in (True, False):
        for k in range(3):
            d = lw[(phi == pos) & (chi == k)]
            if d.size:
                np.testing.assert_allclose(d, d[0], atol=1e-10)
    # the common states were not raised, only diluted by the raised ones
    assert _share(lw, chi == 0) < 0.6 and report["states"]["chi0"]["after"] < 0.6
    raised = {name for name, r in report["states"].items() if r["raised"]}
    assert raised == {"phi_pos", "chi2"}


def test_rows_far_below_the_heaviest_still_count():
    # exp underflows at about 745 below the maximum; the shares are computed in log space
    a = np.arange(1000) < 3
    lw0 = np.where(a, -800.0, 0.0)
    lw, report = state_floor_log_weights(lw0, {"a": a}, 0.1)
    assert report["empty"] == [] and report["states"]["a"]["before"] == 0.0
    assert report["states"]["a"]["after"] == pytest.approx(0.1, rel=1e-3)
    np.testing.assert_allclose(lw[a], lw[a][0])
    np.testing.assert_allclose(lw[~a], lw[~a][0])


@pytest.mark.parametrize(
    "log_w, mask, match",
    [
        (np.zeros(10), (np.arange(10) < 3).astype(int), "bool"),  # 0/1 would index rows 0, 1
        (np.zeros(10), np.ones(9, bool), "shape"),
        (np.r_[np.nan, np.zeros(9)], np.arange(10) < 2, "finite"),
        (np.r_[np.inf, np.zeros(9)], np.arange(10) < 2, "finite"),
        (np.full(10, -np.inf), np.arange(10) < 2, "finite"),
    ],
)
def test_bad_masks_and_weights_are_refused(log_w, mask, match):
    with pytest.raises(ValueError, match=match):
        state_floor_log_weights(log_w, {"a": mask}, 0.2)


def test_states_above_the_floor_leave_the_weights_alone():
    rng = np.random.default_rng(2)
    lw0 = rng.normal(size=1000)
    a = np.arange(1000) < 400
    lw, report = state_floor_log_weights(lw0, {"a": a, "b": ~a}, 0.1)
    np.testing.assert_allclose(lw, lw0 - lw0.max(), atol=1e-12)
    assert report["kish_frames"] == pytest.approx(report["kish_frames_before"])


def test_an_empty_state_is_reported_not_raised():
    a = np.arange(100) < 2
    lw, report = state_floor_log_weights(None, {"a": a, "none": np.zeros(100, bool)}, 0.1)
    assert report["empty"] == ["none"] and report["states"]["none"]["after"] == 0.0
    assert _share(lw, a) == pytest.approx(0.1, rel=1e-3)
    lw0 = np.where(a, -np.inf, 0.0)  # members, but none with weight
    lw, report = state_floor_log_weights(lw0, {"a": a}, 0.1)
    assert report["empty"] == ["a"] and np.isfinite(lw[~a]).all() and np.isneginf(lw[a]).all()


def test_floors_that_cannot_hold_together_are_an_error():
    k = np.arange(300) % 3  # three disjoint states covering everything: floors sum to 1.2
    with pytest.raises(ValueError, match="cannot hold"):
        state_floor_log_weights(None, {"x": k == 0, "y": k == 1, "z": k == 2}, 0.4)


@pytest.mark.parametrize("floor", [0.0, 0.5, -0.1, "0.1", float("nan")])
def test_bad_floors_are_refused(floor):
    with pytest.raises(ValueError, match="floor"):
        state_floor_log_weights(None, {"a": np.ones(3, bool)}, floor)


def test_a_floor_that_exclusive_states_cannot_hold_is_refused_before_any_data():
    # the ring dipeptides' three chi1 rotamers cover the circle and exclude one another
    cvs = {"phi": {"type": "torsion", "atoms": [0, 1, 2, 3]},
           "chi1": {"type": "torsion", "atoms": [1, 2, 3, 4]}}  # fmt: skip
    third = 2 * math.pi / 3
    states = {
        "phi_negative": {"phi": [-math.pi, 0.0]},
        "phi_positive": {"phi": [0.0, 2.0]},
        "chi1_plus": {"chi1": [0.0, third]},
        "chi1_trans": {"chi1": [third, 2 * third]},  # wraps past pi
        "chi1_minus": {"chi1": [-third, 0.0]},
    }
    assert disjoint_states(states, cvs) == ["chi1_plus", "chi1_trans", "chi1_minus"]
    with pytest.raises(ValueError, match=r"exclude one another.*at most 0.3333"):
        check_state_floor(0.4, states, "trp", cvs)
    check_state_floor(1 / 3, states, "trp", cvs)
    # without ``cvs`` the ranges are compared as plain intervals: still three
    assert len(disjoint_states(states)) == 3
    # states of different residues can overlap: the tetrapeptide's per-residue phi states
    ala4 = {f"phi{s}_{k}": {f"phi_{k}": r} for k in (1, 2, 3)
            for s, r in (("neg", [-math.pi, 0.0]), ("pos", [0.0, 2.0]))}  # fmt: skip
    assert len(disjoint_states(ala4)) == 2
    assert disjoint_states({}) == []


def test_the_largest_floor_of_overlapping_ranges_is_exact():
    """Five arcs of 2/5 of the phi circle, one starting every 2/5: every angle lies in two,
    so the shares sum to 2 and no floor above 0.4 can hold, though no three arcs exclude
    one another (the exclusive-states test alone would allow 0.5). The bound is refused
    before any data, and data spread evenly reach a floor just below it."""
    cvs = {"phi": {"type": "torsion", "atoms": [0, 1, 2, 3]}}
    step = 2 * math.pi / 5
    arcs = {f"s{i}": {"phi": [-math.pi + i * step, -math.pi + i * step + 2 * step]}
            for i in range(5)}  # fmt: skip
    assert len(disjoint_states(arcs, cvs)) == 2
    assert max_floor(arcs, cvs) == pytest.approx(0.4, abs=1e-9)
    with pytest.raises(ValueError, match=r"overlap too little.*at most 0.4"):
        check_state_floor(0.45, arcs, "toy", cvs)
    check_state_floor(0.4, arcs, "toy", cvs)
    phi = np.random.default_rng(0).uniform(-math.pi, math.pi, 2000)
    masks = {n: np.asarray(in_state({"phi": phi}, s, cvs), bool) for n, s in arcs.items()}
    lw, _ = state_floor_log_weights(None, masks, 0.38)
    assert min(_share(lw, m) for m in masks.values()) >= 0.38 * (1 - 1e-3)
    # a chain of intervals on a line: a and b share [0.5, 1), b and c share [1.5, 2)
    chain = {"a": {"x": [0.0, 1.0]}, "b": {"x": [0.5, 2.0]}, "c": {"x": [1.5, 3.0]}}
    assert max_floor(chain) == pytest.approx(0.5, abs=1e-9)
    halves = {"lo": {"x": [-math.inf, 0.0]}, "hi": {"x": [0.0, math.inf]}}  # open ends
    assert max_floor(halves) == pytest.approx(0.5, abs=1e-9)
    # the three chi1 rotamers beside two phi states: a third
    third = 2 * math.pi / 3
    rot = {"pos": {"phi": [0.0, 2.0]}, "neg": {"phi": [-math.pi, 0.0]},
           **{f"chi{k}": {"chi1": [k * third, (k + 1) * third]} for k in range(3)}}  # fmt: skip
    assert max_floor(rot, {**cvs, "chi1": cvs["phi"]}) == pytest.approx(1 / 3, abs=1e-9)
    # a state no configuration lies in (an empty range) has nothing to raise: left out,
    # as state_floor_log_weights leaves empty states
    empty = {"a": {"phi": [1.0, 1.0]}, "b": {"phi": [0.0, 2.0]}, "c": {"phi": [2.0, 3.0]}}
    assert max_floor(empty, cvs) == pytest.approx(0.5, abs=1e-9)
    check_state_floor(0.45, empty, "toy", cvs)
    assert max_floor({}) == 1.0


def test_check_state_floor_names_the_problem():
    with pytest.raises(ValueError, match="defines none"):
        check_state_floor(0.1, {}, "toy")
    with pytest.raises(ValueError, match=r"\(0, 0.5\)"):
        check_state_floor(0.6, {"a": {"x": [0, 1]}})
    with pytest.raises(ValueError, match="number"):
        check_state_floor(True, {"a": {"x": [0, 1]}})
    check_state_floor(0.1, {"a": {"x": [0, 1]}})


def _chain(phi: np.ndarray) -> np.ndarray:
    """Four atoms ``(n, 12)`` whose torsion 0-1-2-3 is ``phi`` (radians)."""
    n = len(phi)
    xyz = np.zeros((n, 4, 3))
    xyz[:, 0] = [1.0, 0.0, 0.0]
    xyz[:, 1] = [0.0, 0.0, 0.0]
    xyz[:, 2] = [0.0, 0.0, 1.0]
    xyz[:, 3, 0] = np.cos(phi)
    xyz[:, 3, 1] = np.sin(phi)
    xyz[:, 3, 2] = 1.0
    return xyz.reshape(n, 12)


def test_masks_and_split_from_named_torsion_states():
    cvs = {"phi": {"type": "torsion", "atoms": [0, 1, 2, 3]}}
    states = {"neg": {"phi": [-math.pi, 0.0]}, "pos": {"phi": [0.0, 2.0]}}
    phi = np.r_[np.full(95, -1.2), np.full(5, 1.0)]
    x = _chain(phi)
    masks = state_masks(x, cvs, states)
    assert masks["pos"].sum() == 5 and masks["neg"].sum() == 95
    t = torch.as_tensor(x)
    split = DataSplit(t, t[:2], t[:2], t)
    assert split.ml_data()[1] is None  # uniform draws without a floor
    apply_state_floor(split, cvs, states, 0.25, log=None)
    rows, w = split.ml_data()
    assert rows is split.train and w.shape == (100,)
    assert float(w[95:].sum() / w.sum()) == pytest.approx(0.25, rel=1e-3)
    assert split.info["state_floor"]["states"]["pos"]["before"] == pytest.approx(0.05)
    # a phase's own weighting of the rows is floored too
    split = DataSplit(t, t[:2], t[:2], t, pool=t, pool_log_weights=torch.zeros(100))
    split.info["replica_pool"] = {"weighting": "equal"}
    split.ml_weightings["mbar"] = torch.as_tensor(np.log(np.r_[np.full(50, 3.0), np.ones(50)]))
    apply_state_floor(split, cvs, states, 0.25, log=None)
    for weighting in ("equal", "mbar"):
        w = split.ml_data(weighting)[1]
        assert float(w[95:].sum() / w.sum()) == pytest.approx(0.25, rel=1e-3)
    w = split.ml_data("mbar")[1]  # within a state the weighting's own ratios stay
    assert float(w[0] / w[60]) == pytest.approx(3.0)
    assert float(split.ml_data("equal")[1][0] / split.ml_data("equal")[1][60]) == 1.0


def test_a_flow_trained_on_floored_draws_fills_the_rare_well_and_reweights_exactly():
    """ML on exact double-well samples (state B: 3.3 %) with B's draw share floored at 0.25:
    the flow puts several times more samples in B than the same training without the
    floor, and its reweighted dF still matches the exact 3.380 kT."""
    energy = DoubleWell()
    data = energy.sample(20000, seed=0).float()
    in_b = ~energy.in_state_a(data).numpy()
    lw, _ = state_floor_log_weights(None, {"B": in_b, "A": ~in_b}, 0.25)
    raw_b, runs = {}, {}
    with torch.random.fork_rng(devices=[]):
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for name, w in (("plain", None), ("floor", torch.as_tensor(np.exp(lw)))):
                torch.manual_seed(0)
                prior = DiagonalNormal(2, loc=data.mean(0), scale=data.std(0), learnable=True)
                bg = BoltzmannGenerator(prior, coupling_flow(2, 4, (64, 64), seed=0), energy)
                trainer = Trainer(bg, lr=5e-3, batch_size=256, progress=False, seed=0)
                trainer.fit_phases([Phase(400, w_ml=1.0, name="ml")], data=data, data_weights=w)
                with torch.no_grad():
                    x, log_q, u = bg.sample_weighted(50_000)
                raw_b[name] = float((~energy.in_state_a(x)).double().mean())
                runs[name] = (x, (-u - log_q).double())
        finally:
            torch.set_num_threads(old)
    assert raw_b["plain"] < 0.08 and raw_b["floor"] > 0.15 and raw_b["floor"] > 3 * raw_b["plain"]
    x, log_w = runs["floor"]
    in_a = energy.in_state_a(x).numpy()
    df, err = free_energy_difference(log_w.numpy(), in_a, ~in_a, seed=0)
    exact = energy.reference_delta_f("A", "B")
    assert abs(df - exact) < 4 * err + 0.02, (df, err, exact)


@pytest.mark.parametrize("name", ["trp_dipeptide_vacuum", "ala4_implicit"])
def test_shipped_systems_refuse_floors_their_states_cannot_hold(name):
    import yaml

    spec = yaml.safe_load((ROOT / "systems" / name / "system.yaml").read_text())
    k = len(disjoint_states(spec["states"], spec["cvs"]))
    assert k == (3 if name.startswith("trp") else 2)  # chi1 rotamers; phi_k < 0 / > 0
    check_state_floor(0.999 / k, spec["states"], name, spec["cvs"])
    if k > 2:  # a floor of 0.5 or more is refused by the range check already
        with pytest.raises(ValueError, match="exclude one another"):
            check_state_floor(1.01 / k, spec["states"], name, spec["cvs"])
