"""State feedback: shares, the update rule, the trainer's draw factors, resuming."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_training import _spy_draws  # the cdf each step draws with

from bgflow_mini import BoltzmannGenerator, StandardNormal
from bgflow_mini.energies import DoubleWell
from bgflow_mini.flows import coupling_flow
from bgflow_mini.state_balance import state_masks
from bgflow_mini.state_feedback import StateFeedback, state_shares
from bgflow_mini.targets import as_target
from bgflow_mini.training import Phase, Trainer

TARGET = as_target(DoubleWell())  # states A (x1 < 0) and B (x1 > 0)


def make_bg() -> BoltzmannGenerator:
    torch.manual_seed(0)
    return BoltzmannGenerator(StandardNormal(2), coupling_flow(2, 2, hidden=(8,)), TARGET.energy())


def rows(n_b: int, n: int = 100) -> torch.Tensor:
    """``n`` configurations ``(n, 2)``, the first ``n_b`` in state B, the rest in A."""
    x = torch.full((n, 2), -1.0, dtype=torch.float64)
    x[:n_b, 0] = 1.0
    return x


def feedback(data: torch.Tensor, **kw) -> StateFeedback:
    masks = state_masks(data.numpy(), TARGET.cvs, TARGET.states)
    return StateFeedback(TARGET.cvs, TARGET.states, masks, **kw)


def test_state_shares_are_raw_and_self_normalised_fractions() -> None:
    masks = {"a": np.array([1, 1, 0, 0], bool), "b": np.array([0, 0, 1, 1], bool)}
    log_w = np.log([1.0, 1.0, 2.0, 4.0])
    raw, rew, n_eff = state_shares(masks, log_w)
    assert raw == {"a": 0.5, "b": 0.5}
    assert rew["a"] == pytest.approx(2 / 8) and rew["b"] == pytest.approx(6 / 8)
    assert n_eff == pytest.approx(64 / 22)
    raw, rew, n_eff = state_shares(masks, np.array([0.0, -np.inf, np.nan, 0.0]))
    assert rew == pytest.approx({"a": 0.5, "b": 0.5}) and n_eff == pytest.approx(2.0)
    assert state_shares(masks, np.full(4, -np.inf))[2] == 0.0


def test_an_under_filled_state_is_raised_and_gives_it_back_when_over_filled() -> None:
    fb = feedback(rows(50), gain=0.5, max_factor=4.0, step_max=0.5, tolerance=0.1, min_ess=0)
    masks = state_masks(rows(20).numpy(), TARGET.cvs, TARGET.states)  # q_B = 0.2
    log_w = np.where(masks["B"], math.log(4.0), 0.0)  # p_B = 0.8 / (0.8 + 0.8) = 0.5
    assert fb.update(masks, log_w)
    # B: log(0.5 / 0.2) = 0.92, clipped to 0.5, times the gain; A is over-filled, stays at 0
    assert fb.log_factors == pytest.approx({"A": 0.0, "B": 0.25})
    for _ in range(20):
        fb.update(masks, log_w)
    assert fb.log_factors["B"] == pytest.approx(math.log(4.0))  # bounded by max_factor
    assert fb.updates == 21
    # now B is over-filled (q_B = 0.8, p_B = 0.5): it gives back, A is raised
    over = state_masks(rows(80).numpy(), TARGET.cvs, TARGET.states)
    log_w = np.where(over["B"], 0.0, math.log(4.0))
    fb.update(over, log_w)
    assert fb.log_factors["B"] == pytest.approx(math.log(4.0) - 0.5 * math.log(0.8 / 0.5))
    assert fb.log_factors["A"] == pytest.approx(0.25)
    for _ in range(20):
        fb.update(over, log_w)
    assert fb.log_factors["B"] == 0.0  # never below a factor of 1


def test_dead_band_minimum_ess_and_unseen_states_hold_the_factors() -> None:
    fb = feedback(rows(50), tolerance=0.1, min_ess=10)
    masks = state_masks(rows(50).numpy(), TARGET.cvs, TARGET.states)
    near = np.where(masks["B"], math.log(1.1), 0.0)  # p_B = 0.524: log(p / q) = 0.048
    assert fb.update(masks, near) and fb.log_factors == {"A": 0.0, "B": 0.0}
    heavy = np.where(np.arange(100) == 0, 50.0, 0.0)  # one weight dominates: n_eff ~ 1
    assert not fb.update(masks, heavy) and fb.updates == 1
    only_a = state_masks(rows(0).numpy(), TARGET.cvs, TARGET.states)
    fb.update(only_a, np.zeros(100))  # B has no sample and no weight: nothing to learn
    assert fb.log_factors["B"] == 0.0


def test_row_factors_sum_over_overlapping_states() -> None:
    masks = {"a": np.array([1, 1, 0], bool), "b": np.array([0, 1, 1], bool)}
    fb = StateFeedback(TARGET.cvs, {"a": {}, "b": {}}, masks)
    fb.log_factors = {"a": 0.3, "b": 0.5}
    torch.testing.assert_close(fb.row_log_factors(), torch.tensor([0.3, 0.8, 0.5]).double())


def test_bad_settings_are_clear_errors() -> None:
    masks = state_masks(rows(5).numpy(), TARGET.cvs, TARGET.states)
    with pytest.raises(ValueError, match="named states"):
        StateFeedback(TARGET.cvs, {}, masks)
    with pytest.raises(ValueError, match="gain"):
        StateFeedback(TARGET.cvs, TARGET.states, masks, gain=0)
    with pytest.raises(ValueError, match="max_factor"):
        StateFeedback(TARGET.cvs, TARGET.states, masks, max_factor=1.0)
    with pytest.raises(ValueError, match=r"lacks the states \['B'\]"):
        StateFeedback(TARGET.cvs, TARGET.states, {"A": masks["A"]})
    with pytest.raises(ValueError, match="bool arrays"):
        StateFeedback(TARGET.cvs, TARGET.states, {"A": masks["A"], "B": masks["B"][:3]})


def test_trainer_draws_with_the_factors_from_the_next_step_on() -> None:
    data = rows(50).float()
    base = torch.linspace(1.0, 2.0, 100)
    trainer = Trainer(make_bg(), batch_size=16, progress=False)
    seen = _spy_draws(trainer)
    factors = torch.where(data[:, 0] > 0, math.log(3.0), 0.0)

    def change_at_step_2(tr, record):
        if record["step"] == 2:
            tr.set_draw_log_factors(factors)

    trainer.callbacks.append(change_at_step_2)
    trainer.fit_phases([Phase(steps=4, w_ml=1.0)], data=data, data_weights=base)
    want = base.double() * torch.exp(factors.double())
    assert len(seen) == 4
    for cdf in seen[:2]:
        torch.testing.assert_close(cdf, torch.cumsum(base.double(), 0) / base.sum().double())
    for cdf in seen[2:]:  # the callback ran after step 2: steps 3 and 4 use the factors
        torch.testing.assert_close(cdf, torch.cumsum(want, 0) / want.sum())
    trainer.set_draw_log_factors(factors)  # no data weights: the factors alone
    seen.clear()
    trainer.fit(1, data=data, w_ml=1.0)
    w = torch.exp(factors.double())
    torch.testing.assert_close(seen[0], torch.cumsum(w, 0) / w.sum())
    with pytest.raises(ValueError, match="3 entries for 100 data rows"):
        trainer.set_draw_log_factors(torch.zeros(3))
        trainer.fit(1, data=data, w_ml=1.0)
    with pytest.raises(ValueError, match="finite 1-D"):
        trainer.set_draw_log_factors(torch.tensor([math.inf]))


class _FakeTrainer:
    def __init__(self, x: torch.Tensor, log_w: torch.Tensor) -> None:
        self.last_eval_samples, self.last_eval_log_weights = x, log_w
        self.factors: list[torch.Tensor] = []

    def set_draw_log_factors(self, f: torch.Tensor) -> None:
        self.factors.append(f)


def test_callback_acts_only_on_reverse_kl_estimates_at_the_target_temperature() -> None:
    data = rows(50)
    fb = feedback(data, gain=0.5, min_ess=0)
    x = rows(20)
    fake = _FakeTrainer(x, torch.where(x[:, 0] > 0, math.log(4.0), 0.0))
    for record in ({"step": 1, "ess_eval": 0.5}, {"step": 2, "kl": 1.0},
                   {"step": 3, "ess_eval": 0.5, "kl": 1.0, "temperature": 2.0}):  # fmt: skip
        fb(fake, record)
        assert not fake.factors
    record = {"step": 4, "ess_eval": 0.5, "kl": 1.0, "temperature": 1.0}
    fb(fake, record)
    assert record["fb_B"] == pytest.approx(math.exp(0.25)) and record["fb_A"] == 1.0
    assert record["fb_updates"] == 1
    torch.testing.assert_close(fake.factors[-1], torch.where(data[:, 0] > 0, 0.25, 0.0).double())
    # a resumed run: a fresh callback takes the last factors of the history
    again, resumed = feedback(data), _FakeTrainer(x, x[:, 0])
    again.replay(resumed, [{"step": 3}, record, {"step": 5}])
    assert again.log_factors == pytest.approx(fb.log_factors) and again.updates == 1
    torch.testing.assert_close(resumed.factors[-1], fake.factors[-1])
    assert fb.summary() == {"factors": {"A": 1.0, "B": pytest.approx(math.exp(0.25))},
                            "updates": 1}  # fmt: skip


def test_the_summary_table_names_the_factors_that_moved() -> None:
    from bgflow_mini.report import summary_table

    fb = {"factors": {"A": 1.0, "B": 2.345}, "updates": 7}
    assert "| ML draws, state feedback after 7 updates: factors | B 2.35 (others 1) |" in (
        summary_table({"state_feedback": fb})
    )
    fb = {"factors": {"A": 1.0, "B": 1.0}, "updates": 3}
    assert "after 3 updates: factors | every factor 1 |" in summary_table({"state_feedback": fb})
    assert "state feedback" not in summary_table({"state_feedback": None})
