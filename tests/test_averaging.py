"""WeightAverage: the EMA of the weights and the best-ESS snapshot (float64)."""

import pytest
import torch

from bgflow_mini.averaging import WeightAverage


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2).double()


def _shift(module: torch.nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(by)


@pytest.mark.parametrize("step", [0, 5, 10_000])
def test_update_follows_the_formula_and_a_false_flag_changes_nothing(step):
    m = _module()
    avg = WeightAverage(m, decay=0.999)
    before = [e.clone() for e in avg.ema]
    _shift(m, 1.0)
    avg.update(step, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(avg.ema, before, strict=True))
    avg.update(step, torch.tensor(True))
    decay = min(0.999, (1 + step) / (10 + step))
    for e, b, p in zip(avg.ema, before, m.parameters(), strict=True):
        torch.testing.assert_close(e, decay * b + (1 - decay) * p.detach())


def test_averaged_swaps_in_the_average_and_restores_the_weights():
    m = _module()
    avg = WeightAverage(m, decay=0.9)
    _shift(m, 2.0)
    avg.update(100, torch.tensor(True))
    now = [p.detach().clone() for p in m.parameters()]
    with avg.averaged():
        assert all(torch.equal(p, e) for p, e in zip(m.parameters(), avg.ema, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), now, strict=True))
    plain = WeightAverage(m, decay=None)
    with plain.averaged():  # no average: the weights stay
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), now, strict=True))


def test_offer_keeps_the_best_and_select_falls_back_in_order():
    m = _module()
    avg = WeightAverage(m, decay=0.9)
    assert avg.select("best_ess", 7) == {"kind": "ema", "step": 7}  # no estimate yet
    assert avg.offer(0.3, 10) and not avg.offer(0.2, 20) and avg.offer(0.5, 30)
    kept = [p.detach().clone() for p in m.parameters()]
    _shift(m, 1.0)
    assert avg.select("last", 40) == {"kind": "last", "step": 40}
    assert avg.select("best_ess", 40) == {"kind": "best_ess", "step": 30, "ess": 0.5}
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), kept, strict=True))
    assert WeightAverage(m).select("ema", 3) == {"kind": "last", "step": 3}
    with pytest.raises(ValueError, match="select must be"):
        avg.select("best", 1)
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(m, decay=1.0)


def test_state_dict_round_trip():
    m = _module()
    avg = WeightAverage(m, decay=0.99)
    _shift(m, 0.5)
    avg.update(50, torch.tensor(True))
    avg.offer(0.4, 50)
    other = WeightAverage(_module(), decay=0.99)
    other.load_state_dict(avg.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.ema, avg.ema, strict=True))
    assert other.best["step"] == 50 and other.best["ess"] == 0.4
    pairs = zip(other.best["params"], avg.best["params"], strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
