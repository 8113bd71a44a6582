"""Data-parallel training across processes (``torchrun``) with ``torch.distributed``.

``torchrun --nproc_per_node=N`` starts N copies of a program and tells each its place in
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``). :func:`init_from_env` reads them and joins the process
group: gloo on CPU, NCCL on CUDA with the device ``cuda:LOCAL_RANK``. Without them (a plain
``python`` run) nothing is started and the world has one process.

The :class:`~bgflow_mini.training.Trainer` splits every global batch into *shards*, each
drawn from its own random stream whose seed is derived from ``(seed, shard, step,
purpose)`` (:func:`stream_seed`): rank ``r`` of ``N`` computes its consecutive share of
the shards, and one process given all shards draws exactly their union. Nothing of these
streams needs saving: a resumed run re-derives them from the step.

Every helper here is a no-op (or the identity) in a world of one process, so library code
calls them unconditionally.

Example::

    with init_from_env("cpu") as ctx:      # rank 0 of 1 without torchrun; leaves the group
        trainer = Trainer(generator, ...)  # shards = ctx.world_size
        trainer.fit_phases(phases, data)
        ctx.barrier()
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "Context",
    "init_from_env",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "all_reduce_grads",
    "all_reduce_sum",
    "all_gather_cat",
    "broadcast_module",
    "broadcast_object",
    "stream_seed",
    "shard_counts",
    "rank_shards",
    "batch_generator",
    "rng_stream",
]

# a rank waits in a barrier while rank 0 evaluates (up to 10^5 samples and energies)
DEFAULT_TIMEOUT = timedelta(hours=2)


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of processes in the process group (1 without one)."""
    return torch.distributed.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """True on rank 0, the process that writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank got here (nothing without a process group)."""
    if _initialized():
        torch.distributed.barrier()


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` of
    ``local_world_size`` on this node, the ``device`` it trains on and the ``backend``
    (``None`` without a process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        barrier()

    def shutdown(self) -> None:
        """Leave the process group (if this context joined one)."""
        if self.backend is not None and _initialized():
            torch.distributed.destroy_process_group()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def as_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "local_world_size": self.local_world_size,
        }


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} must be an integer") from None


def init_from_env(
    device: str | torch.device = "cpu",
    env: Mapping[str, str] | None = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> Context:
    """Join the process group that ``torchrun`` describes in the environment.

    Arguments:
        device: the device asked for (``cpu`` or ``cuda``). With CUDA each rank takes
            ``cuda:LOCAL_RANK`` and the NCCL backend; on CPU the backend is gloo.
        env: the environment (default ``os.environ``). Without ``WORLD_SIZE`` or with
            ``WORLD_SIZE=1`` no process group is started and the context is rank 0 of 1.
        timeout: how long a collective (e.g. the barrier while rank 0 evaluates) waits.

    Returns:
        a :class:`Context`.
    """
    env = os.environ if env is None else env
    device = torch.device(device)
    world = _int(env, "WORLD_SIZE", 1)
    if world <= 1:
        return Context(device=device)
    rank_, local = _int(env, "RANK", 0), _int(env, "LOCAL_RANK", 0)
    local_world = _int(env, "LOCAL_WORLD_SIZE", world)
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local >= n:
            raise ValueError(
                f"LOCAL_RANK={local} but this node has {n} CUDA device(s): start at most {n} "
                f"processes per node (torchrun --nproc_per_node={n})"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"data-parallel training runs on cpu or cuda, not {device.type}")
    if not _initialized():
        torch.distributed.init_process_group(
            backend, init_method="env://", rank=rank_, world_size=world, timeout=timeout
        )
    return Context(rank_, world, local, local_world, device, backend)


# ---------------------------------------------------------------------------- collectives
def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: Tensor) -> Tensor:
    """The elementwise sum of ``t`` over all ranks (a new tensor on ``t``'s device)."""
    if world_size() == 1:
        return t.clone()
    buf = t.detach().to(_comm_device(), copy=True)
    torch.distributed.all_reduce(buf)
    return buf.to(t.device)


def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Replace every gradient by its average over the ranks (in place).

    Parameters without a gradient contribute zeros (so every rank sends the same layout);
    gradients are flattened into one buffer per dtype, so there is one collective per
    dtype and step.
    """
    world = world_size()
    if world == 1:
        return
    params = [p for p in params if p.requires_grad]
    groups: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(p.dtype, []).append(p)
    dev = _comm_device()
    for group in groups.values():
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
        ).to(dev)
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for p in group:
            n = p.numel()
            g = flat[offset : offset + n].view_as(p).to(p.device)
            offset += n
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


def all_gather_cat(t: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """Concatenate ``t`` ``(n_r, ...)`` of every rank along dim 0, in rank order.

    The ``n_r`` may differ between ranks; the other dimensions must agree. ``sizes``:
    every rank's ``n_r`` when the caller knows them (then they are not exchanged, which
    would read them back to the host); ``None``: exchange them.
    """
    world = world_size()
    if world == 1:
        return t
    dev = _comm_device()
    if sizes is None:
        n = torch.tensor([t.shape[0]], device=dev)
        parts_n = [torch.zeros_like(n) for _ in range(world)]
        torch.distributed.all_gather(parts_n, n)
        sizes = [int(s) for s in parts_n]
    sizes = [int(s) for s in sizes]
    if len(sizes) != world or sizes[rank()] != t.shape[0]:
        raise ValueError(f"sizes {sizes} do not match {world} ranks and this rank's {t.shape[0]}")
    top = max(sizes)
    buf = t.detach().to(dev)
    if buf.shape[0] < top:
        pad = buf.new_zeros((top - buf.shape[0], *buf.shape[1:]))
        buf = torch.cat([buf, pad])
    parts = [torch.empty_like(buf) for _ in range(world)]
    torch.distributed.all_gather(parts, buf.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(t.device)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks."""
    if world_size() == 1:
        return
    dev = _comm_device()
    with torch.no_grad():
        for t in module.state_dict().values():
            if not isinstance(t, Tensor):
                continue
            buf = t.detach().to(dev, copy=True)
            torch.distributed.broadcast(buf, src)
            t.copy_(buf.to(t.device))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src)
    return box[0]


# ---------------------------------------------------------------------------- shards
def shard_counts(n: int, shards: int) -> list[int]:
    """Every shard's part of ``n`` items split into ``shards`` (the first ``n % shards``
    shards take one more)."""
    q, r = divmod(int(n), int(shards))
    return [q + (s < r) for s in range(int(shards))]


def rank_shards(shards: int, rank_: int | None = None, world: int | None = None) -> range:
    """The consecutive shards that process ``rank_`` (default: this one) draws when
    ``shards`` are split over ``world`` processes (default: the group's size)."""
    rank_ = rank() if rank_ is None else int(rank_)
    world = world_size() if world is None else int(world)
    k = int(shards) // world
    return range(rank_ * k, (rank_ + 1) * k)


# ---------------------------------------------------------------------------- random streams
def stream_seed(seed: int, shard: int, step: int, purpose: int) -> int:
    """A 63-bit seed for one shard's random numbers at one step, for one purpose.

    Derived with numpy's ``SeedSequence`` from the four integers, so distinct tuples give
    independent streams and the same tuple always the same stream (on any rank, after
    any resume).
    """
    words = [int(seed) % 2**64, int(shard), int(step), int(purpose)]
    hi, lo = np.random.SeedSequence(words).generate_state(2, np.uint32)
    return (int(hi) << 31) ^ int(lo)


def batch_generator(seed: int, shard: int, step: int, purpose: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`stream_seed` (e.g. for data indices)."""
    return torch.Generator().manual_seed(stream_seed(seed, shard, step, purpose))


@contextmanager
def rng_stream(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Inside the block torch's global RNG (CPU, and ``device`` if CUDA) starts from
    ``seed``; afterwards it is back where it was.

    The distributions draw from the global RNG (they take no generator), so this is how
    a shard's samples get their own stream without disturbing anyone else's.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    index = None
    if cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(int(seed))
        if cuda:
            torch.cuda.default_generators[index].manual_seed(int(seed))
        yield
