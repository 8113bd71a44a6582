"""ShardedDraws: one process with N shards draws the union of the shards' draws."""

import pytest
import torch

from bgflow_mini.annealing import ImportanceBuffer
from bgflow_mini.sharded_draws import ShardedDraws, check_divisible


class _Gen(torch.nn.Module):
    """A stand-in generator: samples are standard normal, ``log q`` their density."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def sample(self, n: int, with_log_prob: bool = True):
        x = torch.randn(n, 2, dtype=torch.float64)
        return x, -0.5 * (x**2).sum(1)

    def log_weights(self, x, log_q):
        return -log_q

    def sample_weighted(self, n: int, batch_size: int = 4096):
        """Batches of at most ``batch_size``, as the real generator's: ``(x, log_q, u)``."""
        parts = [self.sample(min(batch_size, n - i)) for i in range(0, n, batch_size)]
        x, log_q = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return x, log_q, torch.zeros_like(log_q)


@pytest.mark.parametrize("shards", [1, 3])
def test_parts_cover_the_batch(shards):
    draws = ShardedDraws(_Gen(), seed=0, shards=shards)
    parts = draws.parts(10)
    assert [s for s, _ in parts] == list(range(shards))
    assert sum(m for _, m in parts) == 10 and max(m for _, m in parts) <= -(-10 // shards)
    assert draws.rank_sizes(10) == [10]


def test_sharded_draws_are_the_union_of_their_shards_and_repeatable():
    data = torch.arange(100, dtype=torch.float64)[:, None].repeat(1, 2)
    a, b = ShardedDraws(_Gen(), 5, 2), ShardedDraws(_Gen(), 5, 2)
    torch.testing.assert_close(a.data_batch(data, 8, step=3), b.data_batch(data, 8, step=3))
    assert not torch.equal(a.data_batch(data, 8, step=3), a.data_batch(data, 8, step=4))
    x, log_q = a.sample(7, purpose=1, step=2)
    assert x.shape == (7, 2) and log_q.shape == (7,)
    first, _ = ShardedDraws(_Gen(), 5, 1).sample(4, purpose=1, step=2)  # shard 0: 4 of 7
    torch.testing.assert_close(x[:4], first)
    x_ess, log_w = a.ess_log_weights(6, step=1)
    torch.testing.assert_close(log_w, 0.5 * (x_ess**2).sum(1))


def test_shard_checks_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by the 4 shards"):
        check_divisible("batch_size", 10, 4)
    with pytest.raises(ValueError, match="positive multiple"):
        ShardedDraws(_Gen(), 0, 0)


def test_buffer_batch_draws_from_the_buffer():
    buf = ImportanceBuffer(16)
    buf.load_state_dict(
        {"x": torch.randn(16, 2), "log_w": torch.zeros(16), "temperature": 1.0, "ess": 1.0}
    )
    for shards in (1, 2):
        batch = ShardedDraws(_Gen(), 0, shards).buffer_batch(buf, 6, step=0)
        assert batch.shape == (6, 2)
        assert all((row == buf.x).all(1).any() for row in batch)


@pytest.mark.parametrize("shards", [1, 2])
def test_weighted_data_batches_follow_the_weights(shards):
    data = torch.arange(4, dtype=torch.float64)[:, None].repeat(1, 2)
    w = torch.tensor([0.0, 1.0, 3.0, 0.0], dtype=torch.float64)
    cdf = torch.cumsum(w, 0) / w.sum()
    draws = ShardedDraws(_Gen(), 0, shards)
    rows = torch.cat([draws.data_batch(data, 400, step=s, cdf=cdf)[:, 0] for s in range(10)])
    counts = torch.bincount(rows.long(), minlength=4)
    assert counts[0] == 0 and counts[3] == 0  # zero weight: never drawn
    assert counts[2] / counts.sum() == pytest.approx(0.75, abs=0.03)  # 4,000 draws: 3 sigma


@pytest.mark.parametrize("shards", [1, 2])
def test_large_ess_estimates_are_drawn_in_chunks(shards, monkeypatch):
    """Above ESS_CHUNK samples are drawn and weighted a chunk at a time: the same
    weights, at most a chunk per generator call; up to a chunk, one call as before."""
    import bgflow_mini.sharded_draws as sd

    calls = []
    gen = _Gen()
    real = gen.sample
    monkeypatch.setattr(gen, "sample", lambda n, **kw: calls.append(n) or real(n, **kw))
    torch.manual_seed(0)
    whole_x, _ = ShardedDraws(gen, 0, shards).ess_log_weights(10, step=1)
    assert calls == [10 // shards] * shards
    monkeypatch.setattr(sd, "ESS_CHUNK", 4)
    calls.clear()
    torch.manual_seed(0)
    x, log_w = ShardedDraws(gen, 0, shards).ess_log_weights(10, step=1)
    assert max(calls) <= 4 and sum(calls) == 10 and x.shape == (10, 2)
    torch.testing.assert_close(log_w, 0.5 * (x**2).sum(1))
    if shards == 2:  # each shard's stream is the same whatever the chunking
        torch.testing.assert_close(x[:4], whole_x[:4])
