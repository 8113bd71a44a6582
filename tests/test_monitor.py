"""The mode-collapse guard fires on a constructed collapse and stays quiet when healthy."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from bgflow_mini.energies import DoubleWell
from bgflow_mini.flows import coupling_flow
from bgflow_mini.monitor import StateMonitor, state_populations
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
