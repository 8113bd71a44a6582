"""The mode-collapse guard fires on a constructed collapse and stays quiet when healthy."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from bgflow_mini import BoltzmannGenerator, StandardNormal
from bgflow_mini.energies import DoubleWell
from bgflow_mini.flows import coupling_flow
from bgflow_mini.monitor import OverfitMonitor, StateMonitor, state_populations
from bgflow_mini.report import summary_table
from bgflow_mini.targets import as_target
from bgflow_mini.training import Trainer

TARGET = as_target(DoubleWell())


def samples(n_b: int, n: int = 2000) -> torch.Tensor:
    """``n`` double-well configurations of which ``n_b`` lie in state B (x1 > 0)."""
    x = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[:, 0] = -1.5 - 0.1 * x[:, 0].abs()
    x[:n_b, 0] = 1.5
    return x


def monitor() -> StateMonitor:
    return StateMonitor(TARGET.cvs, TARGET.states, {"A": 0.97, "B": 0.03})


def test_state_populations_count_raw_fractions() -> None:
    pops = state_populations(samples(100), TARGET.cvs, TARGET.states)
    assert pops == {"A": 0.95, "B": 0.05}


@pytest.mark.parametrize(
    ("n_b", "fires"),
    [(0, True), (5, True), (6, False), (60, False)],  # 6/2000 = 0.003 = 0.1 x 0.03: not below
)
def test_guard_fires_only_below_a_tenth(n_b: int, fires: bool) -> None:
    m = monitor()
    fake = type("T", (), {"last_eval_samples": samples(n_b)})()
    record = {"step": 40, "ess_eval": 0.5}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m(fake, record)
    assert record["pop_B"] == pytest.approx(n_b / 2000)
    assert bool(m.collapsed) == fires and len(caught) == int(fires)
    if fires:
        assert "state 'B'" in str(caught[0].message) and m.collapsed["B"]["step"] == 40
        assert m.summary() and "reference 0.0300" in m.summary()[0]
    quiet = {"step": 41}
    m(fake, quiet)  # no ESS estimate at this step: nothing to do
    assert "pop_A" not in quiet


def test_states_below_the_threshold_are_not_watched_and_replay_works() -> None:
    m = StateMonitor(TARGET.cvs, TARGET.states, {"A": 0.995, "B": 0.005})
    assert m.check({"A": 1.0, "B": 0.0}, 10) == []  # B was never above 1 %
    m2 = monitor()
    with pytest.warns(RuntimeWarning, match="mode collapse at step 7"):
        m2.replay([{"step": 5}, {"step": 7, "pop_A": 1.0, "pop_B": 0.0}])
    assert list(m2.collapsed) == ["B"]


@pytest.mark.parametrize(
    ("n_b", "fires"),
    [(301, True), (300, False), (120, False)],  # 300/2000 = 0.15 = 5 x 0.03: not above
)
def test_overfill_fires_above_five_times_the_reference(n_b: int, fires: bool) -> None:
    m = monitor()
    fake = type("T", (), {"last_eval_samples": samples(n_b)})()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m(fake, {"step": 40, "ess_eval": 0.5})
    assert not m.collapsed and bool(m.overfilled) == fires and len(caught) == int(fires)
    if fires:
        assert "over-filled state at step 40: state 'B'" in str(caught[0].message)
        line = "state 'B': 0.1505 of samples at step 40 (reference 0.0300)"
        assert m.overfill_summary() == [line]
        assert summary_table({"overfill_warnings": m.overfill_summary()}).count("OVER-FILLED") == 1


def test_overfill_needs_an_absolute_excess_and_the_target_temperature() -> None:
    m = StateMonitor(TARGET.cvs, TARGET.states, {"A": 0.998, "B": 0.002})
    assert m.check({"A": 0.96, "B": 0.04}, 5) == [] and not m.overfilled  # 20x, but +0.038
    with pytest.warns(RuntimeWarning, match="over-filled state at step 6"):
        m.check({"A": 0.94, "B": 0.06}, 6)  # a state the data (nearly) never visit
    hot = StateMonitor(TARGET.cvs, TARGET.states, {"A": 0.97, "B": 0.03})
    hot.check({"A": 0.7, "B": 0.3}, 7, temperature=4.0)  # hot phases may over-fill
    assert not hot.overfilled
    hot.replay([{"step": 8, "temperature": 4.0, "pop_A": 0.7, "pop_B": 0.3}])
    assert not hot.overfilled
    with pytest.warns(RuntimeWarning, match="over-filled state at step 9"):
        hot.replay([{"step": 9, "pop_A": 0.7, "pop_B": 0.3}])
    off = StateMonitor(TARGET.cvs, TARGET.states, {"A": 0.97, "B": 0.03}, overfill=None)
    off.check({"A": 0.1, "B": 0.9}, 1)
    assert not off.overfilled
    with pytest.raises(ValueError, match="overfill must be > 1"):
        StateMonitor(TARGET.cvs, TARGET.states, {"A": 1.0}, overfill=0.5)


def test_monitor_as_trainer_callback() -> None:
    data = DoubleWell().sample(2048, seed=3)
    flow = functools.partial(coupling_flow, n_blocks=2, hidden=[16])
    gen = TARGET.generator(data, flow, TARGET.energy())
    reference = state_populations(data, TARGET.cvs, TARGET.states)
    m = StateMonitor(TARGET.cvs, TARGET.states, reference)
    trainer = Trainer(
        gen, batch_size=64, ess_every=10, ess_samples=512, progress=False, callbacks=[m]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 20 steps: B may not be learnt yet
        trainer.fit(20, data=data.float())
    rows = [r for r in trainer.history if "ess_eval" in r]
    assert len(rows) == 2 and all(0 <= r["pop_B"] <= 1 for r in rows)
    assert rows[-1]["pop_A"] + rows[-1]["pop_B"] == pytest.approx(1.0)


def test_overfit_monitor_fires_once_only_with_ml_and_beyond_the_tolerance() -> None:
    m = OverfitMonitor(tolerance=1.0)
    assert not m.check(100, -10.0, ml=True)
    assert not m.check(200, -9.1, ml=True)  # 0.9 above the best
    assert not m.check(300, -8.0, ml=False)  # no ML in the loss: not judged
    assert not m.check(350, float("nan"), ml=True)  # nor a non-finite value
    with pytest.warns(RuntimeWarning, match="overfits the training frames.*near step 100"):
        assert m.check(400, -8.5, ml=True)
    assert m.warning == {"step": 400, "val_nll": -8.5, "best_step": 100, "best_val_nll": -10.0}
    assert not m.check(500, -5.0, ml=True)  # once
    assert m.summary() == [
        "validation NLL -8.50 at step 400 with ML in the loss, 1.50 nats above its best "
        "-10.00 at step 100"
    ]
    assert summary_table({"overfit_warnings": m.summary()}).count("OVERFITTING") == 1
    quiet = OverfitMonitor()
    history = [{"step": 1}, {"step": 2, "val_nll": 3.0, "nll": 3.1}, {"step": 3, "val_nll": 2.0}]
    quiet.replay(history)
    assert quiet.warning is None and quiet.best == (3, 2.0) and quiet.summary() == []
    with pytest.raises(ValueError, match="tolerance"):
        OverfitMonitor(tolerance=0)


@pytest.mark.parametrize(("n_train", "fires"), [(8, True), (4000, False)])
def test_overfit_monitor_sees_a_flow_memorise_a_few_frames(n_train: int, fires: bool) -> None:
    """Maximum likelihood on 8 double-well points drives the validation NLL up; on 4,000
    points of the same distribution it does not (same flow, same schedule)."""
    torch.manual_seed(0)
    x = samples(200, n=n_train + 1000) + 0.3 * torch.randn(n_train + 1000, 2)
    x = x[torch.randperm(x.shape[0])]
    bg = BoltzmannGenerator(StandardNormal(2), coupling_flow(2, 4, hidden=(64, 64)), DoubleWell())
    bg = bg.double()
    m = OverfitMonitor()
    trainer = Trainer(
        bg,
        lr=1e-2,
        batch_size=min(n_train, 64),
        val_data=x[n_train:],
        eval_every=25,
        progress=False,
        callbacks=[m],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(400, data=x[:n_train], w_ml=1.0, w_kl=0.0)
    assert (m.warning is not None) == fires
    assert sum("overfits" in str(w.message) for w in caught) == int(fires)
