"""Random draws of a training step, split into shards (data parallel training).

Every global batch a step draws (the data batch, the reverse-KL samples, the importance
buffer and its draws, the ESS samples) is split into ``shards`` parts, each drawn from
its own random stream derived from ``(seed, shard, step, purpose)``. Each of the ``N``
processes of a ``torchrun`` job draws the ``shards / N`` consecutive parts of its rank
with its own energy backend, so one process given ``shards=N`` draws exactly their union.
With one shard everything is drawn as in a plain single-process loop: data batches from
one seeded generator, model samples from the global torch RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import distributed as dist
from .annealing import ImportanceBuffer
from .losses import reverse_kl
from .reweighting import effective_sample_size
from .schedules import Phase

__all__ = ["ShardedDraws", "check_global_batches", "check_divisible"]

# what a shard's random stream at one step is for (part of its seed, see stream_seed)
DATA, KL, IW_DRAW, IW_REFILL, ESS = range(5)
ESS_CHUNK = 8192  # samples drawn and weighted at once for an ESS estimate


def check_divisible(name: str, n: int, shards: int) -> None:
    """Raise ``ValueError`` unless the global batch ``n`` splits evenly into ``shards``."""
    if n % shards:
        raise ValueError(
            f"{name}={n} is the global batch and must be divisible by the {shards} shards "
            f"(processes) it is split into; choose a multiple of {shards}"
        )


def check_global_batches(
    phases: Sequence[Phase], batch_size: int, kl_batch_size: int | None, shards: int
) -> None:
    """Raise ``ValueError`` unless every batch the phases draw splits evenly into ``shards``.

    ``batch_size`` / ``kl_batch_size`` are the trainer's defaults (a phase may override
    them); only the batches a phase uses are checked (ML or importance-weighted ML:
    ``batch_size``; reverse KL: ``kl_batch_size``).
    """
    for i, ph in enumerate(phases):
        bs = int(ph.batch_size or batch_size)
        kl_bs = int(ph.kl_batch_size or kl_batch_size or batch_size)
        where = f"phase {i} ({ph.name or 'unnamed'}): " if len(phases) > 1 else ""
        if ph.w_ml > 0 or ph.w_iw > 0:
            check_divisible(f"{where}batch_size", bs, shards)
        if ph.w_kl > 0:
            check_divisible(f"{where}kl_batch_size", kl_bs, shards)


class ShardedDraws:
    """This process's share of a step's random draws from ``generator``.

    ``seed``: the seed of every shard's streams (and, with one shard, of the data-batch
    generator ``batch_rng``, whose state a checkpoint keeps); ``shards``: a positive
    multiple of the number of processes. Methods take the trainer's ``step`` (the steps
    done so far), which every stream's seed includes.
    """

    def __init__(self, generator, seed: int, shards: int) -> None:
        self.generator = generator
        self.seed, self.shards = int(seed), int(shards)
        self.world_size = dist.world_size()
        if self.shards < 1 or self.shards % self.world_size:
            raise ValueError(
                f"shards must be a positive multiple of the {self.world_size} processes, "
                f"got {shards}"
            )
        self.local_shards = dist.rank_shards(self.shards)  # consecutive
        self.batch_rng = torch.Generator().manual_seed(self.seed)

    @property
    def _param(self) -> Tensor:
        return next(self.generator.parameters())

    def parts(self, n: int) -> list[tuple[int, int]]:
        """``(shard, count)`` of this rank's shards when ``n`` is split over all shards."""
        counts = dist.shard_counts(n, self.shards)
        return [(s, counts[s]) for s in self.local_shards]

    def rank_sizes(self, n: int) -> list[int]:
        """Every rank's share of ``n`` split over the shards (known without asking)."""
        counts, world = dist.shard_counts(n, self.shards), self.world_size
        ranks = (dist.rank_shards(self.shards, i, world) for i in range(world))
        return [sum(counts[s] for s in shards) for shards in ranks]

    def _stream(self, shard: int, purpose: int, step: int):
        seed = dist.stream_seed(self.seed, shard, step, purpose)
        return dist.rng_stream(seed, self._param.device)

    def _rng(self, shard: int, purpose: int, step: int) -> torch.Generator:
        return dist.batch_generator(self.seed, shard, step, purpose)

    def sample(self, n: int, purpose: int, step: int) -> tuple[Tensor, Tensor]:
        """This rank's share of ``n`` fresh samples ``(m, dim)`` and their ``log q``."""
        xs, lqs = [], []
        for shard, m in self.parts(n):
            with self._stream(shard, purpose, step):
                x, log_q = self.generator.sample(m, with_log_prob=True)
            xs.append(x)
            lqs.append(log_q)
        return torch.cat(xs), torch.cat(lqs)

    def data_batch(self, data: Tensor, bs: int, step: int, cdf: Tensor | None = None) -> Tensor:
        """This rank's share of a data batch of ``bs`` rows, on the model's device/dtype.

        Rows are drawn uniformly with replacement, or, given ``cdf`` (the normalised
        cumulative row weights ``(n,)`` float64, last entry 1), with probability
        proportional to the weights.
        """

        def draw(m: int, g: torch.Generator) -> Tensor:
            if cdf is None:
                return torch.randint(data.shape[0], (m,), generator=g)
            u = torch.rand(m, generator=g, dtype=torch.float64)
            return torch.searchsorted(cdf, u, right=True).clamp_(max=data.shape[0] - 1)

        if self.shards == 1:
            idx = draw(bs, self.batch_rng)
        else:
            idx = torch.cat([draw(m, self._rng(s, DATA, step)) for s, m in self.parts(bs)])
        p = self._param
        batch = data[idx]
        if p.device.type == "cuda":  # a copy that does not wait for the device
            return batch.pin_memory().to(device=p.device, dtype=p.dtype, non_blocking=True)
        return batch.to(device=p.device, dtype=p.dtype)

    def buffer_batch(self, buffer: ImportanceBuffer, bs: int, step: int) -> Tensor:
        """This rank's share of ``bs`` draws from the importance buffer."""
        if self.shards == 1:
            return buffer.draw(bs, self.batch_rng)
        parts = [buffer.draw(m, self._rng(s, IW_DRAW, step)) for s, m in self.parts(bs)]
        return torch.cat(parts)

    def refill(self, buffer: ImportanceBuffer, temperature: float, step: int) -> int:
        """Refill ``buffer``; returns the (global) number of energy calls.

        Sharded: every shard weights its part with its own stream and energy backend, and
        every rank then holds the whole buffer (gathered in shard order)."""
        gen = self.generator
        if self.shards == 1:
            return buffer.refill(gen, temperature)
        xs, lws = [], []
        for shard, m in self.parts(buffer.size):
            part = ImportanceBuffer(m)
            with self._stream(shard, IW_REFILL, step):
                part.refill(gen, temperature)
            xs.append(part.x)
            lws.append(part.log_w)
        x, log_w = dist.all_gather_cat(torch.cat(xs)), dist.all_gather_cat(torch.cat(lws))
        state = {"x": x, "log_w": log_w, "temperature": float(temperature)}
        buffer.load_state_dict({**state, "ess": effective_sample_size(log_w)})
        return buffer.size

    def kl_values(self, kl_bs: int, temperature: float, step: int) -> Tensor:
        """This rank's per-sample reverse-KL values ``u / τ + log q`` (its share)."""
        gen = self.generator
        if self.shards == 1:
            return reverse_kl(gen, kl_bs, reduction="none", target_temperature=temperature)
        x, log_q = self.sample(kl_bs, KL, step)
        return gen.reduced_energy(x) / float(temperature) + log_q

    def _weighted(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` samples and their log weights from the current random stream, drawn and
        weighted ``ESS_CHUNK`` at a time (bounded memory for large ESS estimates; one call
        when ``n <= ESS_CHUNK``)."""
        x, log_q, u = self.generator.sample_weighted(n, batch_size=ESS_CHUNK)
        return x, -u - log_q

    def ess_log_weights(self, n: int, step: int) -> tuple[Tensor, Tensor]:
        """``n`` fresh samples ``(n, dim)`` and their log weights ``(n,)``, all of them on
        every rank (each shard draws and weights its part, ``ESS_CHUNK`` at a time)."""
        if self.shards == 1:
            return self._weighted(n)
        xs, lws = [], []
        for shard, m in self.parts(n):
            with self._stream(shard, ESS, step):
                x, log_w = self._weighted(m)
            xs.append(x)
            lws.append(log_w)
        log_w = dist.all_gather_cat(torch.cat(lws))
        return dist.all_gather_cat(torch.cat(xs)), log_w
