"""Training loop for Boltzmann generators: ML + reverse KL, phases, checkpoints.

The loss of one step is ``w_ml * NLL(data batch) + w_kl * reverse KL(samples)``, both
in kT per sample. A step whose loss or gradient is not finite is skipped (the
parameters, the optimizer's moments and the weight average are not touched) and counted;
the learning-rate schedule advances on every step. The loop reads nothing back from the
device within a step: a step's losses, counts and its skip decision stay tensors (the skip
is applied by the fused Adam kernel's ``found_inf`` flag) and the records of
``sync_every`` steps are read back together (:mod:`bgflow_mini.records`), so a GPU is
never left waiting for the host. Checkpoints hold the model, optimizer,
scheduler, step, history and every random state the loop uses, so a run resumed
from a checkpoint produces the same losses as an uninterrupted one (on CPU).

Data parallel (``torchrun``, see :mod:`bgflow_mini.distributed`; the draws in
:mod:`bgflow_mini.sharded_draws`): every global batch (``batch_size``, ``kl_batch_size``,
the ESS estimate, the importance buffer) is split into ``shards`` parts (equal for the
training batches, which must divide; within one sample for the others), each drawn from
its own random stream derived from ``(seed, shard, step)``; each of the ``N`` ranks
computes ``shards / N`` of them with its own energy backend, and one process given
``shards=N`` draws exactly their union. Gradients are averaged across ranks after every
backward pass with an explicit ``all_reduce``, not with ``DistributedDataParallel``: the
losses call the generator's ``sample`` and ``log_prob``, never its ``forward``, so DDP's
per-iteration bookkeeping would not run, and a step must be skipped on every rank at once
when the *global* loss or gradient is not finite, which the explicit reduction decides in
one place. Losses, counts and ESS in the records are global; rank 0 alone writes
checkpoints, and every rank holds the same parameters.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed as dist
from .annealing import ImportanceBuffer
from .averaging import WeightAverage
from .checkpoint import _alternative, full_spec
from .fileio import load_torch, save_torch
from .flows.compiled import is_compiled
from .losses import nll
from .records import read_back
from .reweighting import effective_sample_size, ess_tensor
from .schedules import Phase, cosine_schedule
from .sharded_draws import ShardedDraws, check_divisible, check_global_batches

__all__ = ["Trainer", "TrainingStalled", "Phase", "cosine_schedule", "check_global_batches"]


def _has_compiled_flow(generator: torch.nn.Module) -> bool:
    """Whether any flow of ``generator`` runs compiled (:func:`~.flows.compile_flow`)."""
    return any(is_compiled(m) for m in generator.modules())


def _weights_cdf(weights: Tensor, data: Tensor) -> Tensor:
    """Normalised cumulative weights ``(n,)`` float64 (CPU) of the ``n`` data rows."""
    w = torch.as_tensor(weights).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if w.numel() != data.shape[0]:
        raise ValueError(f"data_weights has {w.numel()} entries for {data.shape[0]} data rows")
    if not torch.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise ValueError("data_weights must be finite, non-negative and not all zero")
    cdf = torch.cumsum(w, 0)
    return cdf / cdf[-1]


def _phase_weights(
    phases: Sequence[Phase], data_weights: Tensor | Mapping | None
) -> list[Tensor | None]:
    """Each phase's data weights (see :meth:`Trainer.fit_phases`); a phase that names a
    weighting needs ``data_weights`` to be a mapping holding it."""
    if not isinstance(data_weights, Mapping):
        named = sorted({p.replica_weights for p in phases if p.replica_weights is not None})
        if named:
            raise ValueError(
                f"phases ask for replica weightings {named}, but data_weights is one set of "
                "weights: pass a mapping from each phase's replica_weights to its weights"
            )
        return [data_weights] * len(phases)
    missing = sorted(
        {str(p.replica_weights) for p in phases if p.replica_weights not in data_weights}
    )
    if missing:
        raise ValueError(
            f"no data weights for the phases' replica_weights {missing}; "
            f"data_weights holds {sorted(map(str, data_weights))}"
        )
    return [data_weights[p.replica_weights] for p in phases]


class TrainingStalled(RuntimeError):
    """Nearly every recent step was skipped (non-finite loss or gradient): the weights
    stopped changing, so running on would only waste time."""


# Phase, cosine_schedule: see .schedules; check_global_batches: see .sharded_draws


def _adam_kernel(module: torch.nn.Module) -> dict:
    """Adam's fused kernel where the parameters allow it (CPU or CUDA floating point):
    one kernel for all parameters instead of ~10 per tensor (0.4 vs 2.2 ms per step for
    the default generator's 70 tensors on one CPU thread); else torch's default."""
    params = list(module.parameters())
    ok = {"cpu", "cuda"}
    if params and all(p.device.type in ok and p.dtype.is_floating_point for p in params):
        try:
            torch.optim.Adam([torch.zeros(1, device=params[0].device)], fused=True)
        except (RuntimeError, ValueError, TypeError):  # an older torch or another build
            return {}
        return {"fused": True}
    return {}


class Trainer:
    """Adam training of a :class:`~bgflow_mini.BoltzmannGenerator`.

    Arguments:
        generator: the model; its ``energy`` is needed when ``w_kl > 0``.
        lr: Adam learning rate.
        batch_size: data batch size for the ML loss.
        kl_batch_size: samples per step for reverse KL (default ``batch_size``).
        w_ml, w_kl: default loss weights (a :class:`Phase` overrides them).
        clip_grad_norm: max gradient norm (``None``: no clipping; the norm is still logged).
        scheduler: optional factory ``optimizer -> torch LR scheduler`` stepped every step.
        weight_decay: Adam weight decay.
        drop_nonfinite: in reverse KL, average over the samples with finite energy only
            (their count is logged); if ``False`` one infinite energy makes the step's
            loss infinite, so the step is skipped.
        ess_every, ess_samples: every ``ess_every`` steps estimate the normalised ESS on
            ``ess_samples`` fresh samples (0 disables; needs an energy). The estimate is of
            the averaged weights when ``ema_decay`` is set, and the weights with the best
            estimate are kept for :meth:`finalize`.
        ema_decay: keep an exponential moving average of the parameters with this decay
            (e.g. 0.999; ``None``: off). Early steps use ``min(decay, (1 + t) / (10 + t))``.
        buffer_size, resample_every, iw_truncate: the importance buffer of annealing
            phases (``Phase.w_iw > 0``, see :class:`~bgflow_mini.annealing.ImportanceBuffer`;
            ``iw_truncate``: draw with truncated weights).
        val_data, eval_every: validation NLL every ``eval_every`` steps (0 disables).
        checkpoint_path, checkpoint_every: save a checkpoint every ``checkpoint_every``
            steps (atomically) and at the end of :meth:`fit`.
        seed: seed of the generator that draws data batches (model sampling uses the
            global torch RNG, whose state is checkpointed too). With ``shards > 1`` the
            seed of every shard's streams instead (the global RNG is not used).
        progress: show a tqdm progress bar.
        callbacks: functions ``callback(trainer, record)`` called for every step, in
            order, when its record is read back: every ``sync_every`` steps (counted from
            step 0), at every step with an ESS or validation estimate or a checkpoint,
            and at the end of :meth:`fit`. A callback that saves the trainer's state
            must do so at such a step (then ``trainer.step == record["step"]``).
        stall_window, max_skipped: raise :class:`TrainingStalled` when more than
            ``max_skipped`` of the last ``stall_window`` steps were skipped (checked when
            records are read back; the checkpoint on disk is the last one written;
            ``max_skipped=1``: never).
        sync_every: read the step records back from the device every this many steps
            (1: every step). Larger values let a GPU run ahead of the host; on a CPU the
            choice makes no difference to speed. Results do not depend on it.
        shards: split every global batch into this many parts, each with its own random
            stream (see the module docstring); ``None``: the number of processes in the
            ``torch.distributed`` process group (1 without one: the plain single-process
            behaviour). Must be a multiple of the number of processes; a single process
            with ``shards=N`` reproduces an N-process run to float tolerance.
    """

    def __init__(
        self,
        generator,
        lr: float = 1e-3,
        batch_size: int = 256,
        kl_batch_size: int | None = None,
        w_ml: float = 1.0,
        w_kl: float = 0.0,
        clip_grad_norm: float | None = None,
        scheduler: Callable | None = None,
        weight_decay: float = 0.0,
        drop_nonfinite: bool = True,
        ess_every: int = 0,
        ess_samples: int = 1024,
        val_data: Tensor | None = None,
        eval_every: int = 0,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        seed: int = 0,
        progress: bool = True,
        callbacks: Sequence[Callable] = (),
        ema_decay: float | None = None,
        buffer_size: int = 8192,
        resample_every: int = 50,
        shards: int | None = None,
        iw_truncate: bool = False,
        sync_every: int = 1,
        stall_window: int = 200,
        max_skipped: float = 0.9,
    ) -> None:
        if int(sync_every) < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.sync_every = int(sync_every)
        self._pending: list[dict] = []  # records not yet read back from the device
        if lr <= 0 or batch_size < 1:
            raise ValueError(f"need lr > 0 and batch_size >= 1, got lr={lr}, {batch_size=}")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {clip_grad_norm}")
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.draws = ShardedDraws(generator, seed, self.world_size if shards is None else shards)
        if self.shards > 1 and min(int(ess_samples), int(buffer_size)) < self.shards:
            raise ValueError(
                f"ess_samples ({ess_samples}) and buffer_size ({buffer_size}) must be at "
                f"least the number of shards ({self.shards})"
            )
        dist.broadcast_module(generator)  # every rank starts from rank 0's weights
        self.generator = generator
        self.optimizer = torch.optim.Adam(
            generator.parameters(), lr=lr, weight_decay=weight_decay, **_adam_kernel(generator)
        )
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        self.batch_size = int(batch_size)
        self.kl_batch_size = int(kl_batch_size or batch_size)
        self.w_ml, self.w_kl = float(w_ml), float(w_kl)
        self.clip_grad_norm = clip_grad_norm
        self.drop_nonfinite = drop_nonfinite
        self.ess_every, self.ess_samples = int(ess_every), int(ess_samples)
        self.val_data = None if val_data is None else self._check_data(val_data, "val_data")
        self.eval_every = int(eval_every)
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.checkpoint_every = int(checkpoint_every)
        self.progress = progress and self.rank == 0
        self.callbacks = list(callbacks)
        self.step = 0
        self.n_skipped = 0
        if int(stall_window) < 1 or not 0 < float(max_skipped) <= 1:
            raise ValueError(
                f"need stall_window >= 1 and max_skipped in (0, 1], got {stall_window}, "
                f"{max_skipped}"
            )
        self.stall_window, self.max_skipped = int(stall_window), float(max_skipped)
        self._recent_skips: deque[bool] = deque(maxlen=self.stall_window)
        self.n_nonfinite_samples = 0
        self.n_capped_samples = 0
        self.n_energy_evaluations = 0  # target-energy calls (samples), reverse KL and ESS
        self.history: list[dict] = []
        # the EMA of the weights and those with the best ESS estimate so far
        self.average = WeightAverage(generator, ema_decay)
        self.ema_decay = self.average.decay
        self.last_eval_samples: Tensor | None = None
        self.last_eval_log_weights: Tensor | None = None
        self.draw_log_factors: Tensor | None = None  # see set_draw_log_factors
        self._draw_version = 0
        self.buffer = ImportanceBuffer(buffer_size, iw_truncate)  # phases with w_iw > 0
        self.resample_every = int(resample_every)

    # ------------------------------------------------------------------ helpers
    @property
    def _param(self) -> Tensor:
        return next(self.generator.parameters())

    @property
    def shards(self) -> int:
        """The number of parts every global batch is split into (see the module docstring)."""
        return self.draws.shards

    @property
    def seed(self) -> int:
        """The seed of the data-batch generator and of every shard's random streams."""
        return self.draws.seed

    @property
    def ema(self) -> list[Tensor] | None:
        """The averaged weights (``None`` without ``ema_decay``)."""
        return self.average.ema

    @property
    def best(self) -> dict:
        """``{"ess", "step", "params"}`` of the weights with the best ESS estimate."""
        return self.average.best

    def _check_data(self, data: Tensor, name: str = "data") -> Tensor:
        if not isinstance(data, Tensor) or data.ndim != 2:
            shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
            raise ValueError(f"{name} must be a tensor of shape (n, dim), got {shape}")
        if data.shape[0] < 1:
            raise ValueError(f"{name} is empty")
        bad = ~torch.isfinite(data).all(dim=1)
        if bad.any():
            raise ValueError(
                f"{name} contains {int(bad.sum())} rows with NaN/inf (first at row "
                f"{int(bad.nonzero()[0])}); clean the data before training"
            )
        return data

    def set_draw_log_factors(self, log_factors: Tensor | None) -> None:
        """Multiply the ML draw weight of every data row by ``exp(log_factors)`` ``(n,)``
        (on top of a phase's ``data_weights``; ``None``: no factors), from the next step
        on, in this and later :meth:`fit` calls (e.g. :class:`~bgflow_mini.state_feedback.
        StateFeedback`). Not saved in checkpoints: the caller restores them on resuming."""
        if log_factors is not None:
            log_factors = torch.as_tensor(log_factors, dtype=torch.float64).detach().cpu()
            if log_factors.ndim != 1 or not torch.isfinite(log_factors).all():
                raise ValueError("draw log factors must be a finite 1-D tensor, one per data row")
        self.draw_log_factors = log_factors
        self._draw_version += 1

    def _draw_cdf(self, data: Tensor, data_weights: Tensor | None) -> Tensor | None:
        """The cumulative draw weights of ``data``: ``data_weights`` (None: uniform) times
        the draw factors; None for uniform draws."""
        factors = self.draw_log_factors
        if factors is None:
            return None if data_weights is None else _weights_cdf(data_weights, data)
        if factors.numel() != data.shape[0]:
            raise ValueError(
                f"draw log factors have {factors.numel()} entries for {data.shape[0]} data rows"
            )
        base = (
            torch.ones(data.shape[0], dtype=torch.float64)
            if data_weights is None
            else torch.as_tensor(data_weights).detach().cpu().double().reshape(-1)
        )
        return _weights_cdf(base * torch.exp(factors - factors.max()), data)

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)
        if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [float(lr)] * len(self.optimizer.param_groups)

    # ------------------------------------------------------------------ training
    def fit(
        self,
        steps: int,
        data: Tensor | None = None,
        w_ml: float | None = None,
        w_kl: float | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        kl_batch_size: int | None = None,
        name: str = "",
        w_iw: float = 0.0,
        temperature: float = 1.0,
        resample_every: int | None = None,
        data_weights: Tensor | None = None,
    ) -> list[dict]:
        """Run ``steps`` optimisation steps; returns the history records of those steps.

        ``data`` ``(n, dim)`` is required when the ML weight is positive; NaN/inf rows
        raise ``ValueError``. ``data_weights`` ``(n,)`` (non-negative, not all 0; e.g.
        :func:`~bgflow_mini.replica_pool.pool_log_weights` exponentiated) draws data rows
        with probability proportional to them instead of uniformly. Weights, learning
        rate and batch sizes default to the trainer's settings; ``w_iw``, ``temperature``
        and ``resample_every`` are those of :class:`Phase`.
        """
        w_ml = self.w_ml if w_ml is None else float(w_ml)
        w_kl = self.w_kl if w_kl is None else float(w_kl)
        w_iw, temperature = float(w_iw), float(temperature)
        if min(w_ml, w_kl, w_iw) < 0 or (w_ml == 0 and w_kl == 0 and w_iw == 0):
            raise ValueError(
                f"need w_ml, w_kl, w_iw >= 0 and not all 0, got {w_ml=}, {w_kl=}, {w_iw=}"
            )
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be positive, got {temperature}")
        if w_iw > 0 and self.generator.energy is None:
            raise ValueError("w_iw > 0 (importance-weighted ML) needs a generator with an energy")
        anneal = (w_iw, temperature, int(resample_every or self.resample_every))
        if w_ml > 0:
            if data is None:
                raise ValueError("w_ml > 0 needs data: fit(steps, data=...)")
            data = self._check_data(data)
        cdf = None if w_ml == 0 else self._draw_cdf(data, data_weights)
        version = self._draw_version
        if (w_kl > 0 or self.ess_every > 0) and self.generator.energy is None:
            raise ValueError("reverse KL and ESS need a generator with an energy")
        if lr is not None:
            self._set_lr(lr)
        bs = int(batch_size or self.batch_size)
        kl_bs = int(kl_batch_size or self.kl_batch_size)
        if w_ml > 0 or w_iw > 0:
            check_divisible("batch_size", bs, self.shards)
        if w_kl > 0:
            check_divisible("kl_batch_size", kl_bs, self.shards)
        start = len(self.history)
        bar = tqdm(range(int(steps)), disable=not self.progress, desc=name or "train")
        for _ in bar:
            if w_ml > 0 and version != self._draw_version:  # a callback changed the factors
                cdf, version = self._draw_cdf(data, data_weights), self._draw_version
            record = self._train_step((data, cdf), w_ml, w_kl, bs, kl_bs, anneal)
            record["phase"] = name
            checked = self._periodic(record)
            self._pending.append(record)
            save = bool(
                self.checkpoint_path
                and self.checkpoint_every
                and (self.step % self.checkpoint_every == 0)
            )
            if checked or save or self.step % self.sync_every == 0:
                self._read_back(bar)
            if save:
                self.save_checkpoint(self.checkpoint_path)
        self._read_back(bar)
        if self.checkpoint_path is not None:
            self.save_checkpoint(self.checkpoint_path)
        return self.history[start:]

    def _read_back(self, bar=None) -> None:
        """Read the pending records back (one transfer), count them, append them to the
        history and run the callbacks on each, in step order."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        read_back(pending)
        for record in pending:
            self.n_skipped += int(record["skipped"])
            self._recent_skips.append(bool(record["skipped"]))
            self.n_nonfinite_samples += record.get("n_nonfinite", 0)
            self.n_capped_samples += record.get("n_capped", 0)
            self.history.append(record)
            for cb in self.callbacks:
                cb(self, record)
        self._check_stalled()
        if bar is not None:
            last = pending[-1]
            keys = ("loss", "nll", "kl", "ess")
            bar.set_postfix({k: f"{last[k]:.3g}" for k in keys if k in last})

    def _check_stalled(self) -> None:
        recent = self._recent_skips
        n = sum(recent)
        if len(recent) < self.stall_window or n <= self.max_skipped * self.stall_window:
            return
        where = f"; the last checkpoint is {self.checkpoint_path}" if self.checkpoint_path else ""
        raise TrainingStalled(
            f"training stopped at step {self.step}: {n} of the last {self.stall_window} steps "
            f"were skipped (non-finite loss or gradient; {self.n_nonfinite_samples} "
            f"non-finite and {self.n_capped_samples} capped samples so far), so the weights "
            f"have stopped changing{where}. Reverse KL from a poor model often does this: "
            "try bounded_ics=box (keeps the latent near the data), a maximum-likelihood warm "
            "start, or a lower learning rate"
        )

    def fit_phases(
        self,
        phases: Sequence[Phase],
        data: Tensor | None = None,
        data_weights: Tensor | Mapping[str | None, Tensor | None] | None = None,
    ) -> list[dict]:
        """Run a schedule of :class:`Phase` objects, continuing from ``self.step``.

        ``data_weights``: one set for every phase (as in :meth:`fit`), or a mapping from a
        phase's ``replica_weights`` (``None`` for phases without one) to that phase's
        weights ``(n,)`` (a value of ``None``: uniform draws). Steps already done (e.g.
        after :meth:`load_checkpoint`) are not repeated, so calling this again with the
        same phases resumes an interrupted schedule. Every phase's batches and weights
        are checked before the first step.
        """
        check_global_batches(phases, self.batch_size, self.kl_batch_size, self.shards)
        weights = _phase_weights(phases, data_weights)
        for phase, w in zip(phases, weights):
            if w is not None and data is not None and phase.w_ml > 0:
                _weights_cdf(w, data)  # a bad set of a later phase fails before step 1
        done, records = 0, []
        for phase, weights_of_phase in zip(phases, weights):
            end = done + int(phase.steps)
            remaining = end - max(self.step, done)
            if remaining > 0:
                fresh = self.step <= done
                records += self.fit(
                    remaining,
                    data=data,
                    w_ml=phase.w_ml,
                    w_kl=phase.w_kl,
                    lr=phase.lr if fresh else None,
                    batch_size=phase.batch_size,
                    kl_batch_size=phase.kl_batch_size,
                    name=phase.name,
                    w_iw=phase.w_iw,
                    temperature=phase.temperature,
                    resample_every=phase.resample_every,
                    data_weights=weights_of_phase,
                )
            done = end
        return records

    # ------------------------------------------------------------------ one step
    def _train_step(self, rows, w_ml: float, w_kl: float, bs: int, kl_bs: int, anneal) -> dict:
        """One optimisation step.

        With several ranks every loss term below is this rank's *contribution*: the mean
        of the contributions over the ranks is the global term, so averaging gradients
        gives the gradient of the global loss. ML terms are means over equal shares; the
        reverse-KL term, which may drop non-finite samples, is this rank's sum over its
        finite samples times ``world / (finite samples of all ranks)``.
        """
        gen = self.generator
        world = self.world_size
        w_iw, temperature, resample_every = anneal
        p = self._param
        record: dict = {"step": self.step + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        if temperature != 1.0 or w_iw > 0:
            record["temperature"] = temperature
        if w_iw > 0:
            buf = self.buffer
            if buf.temperature != temperature or self.step % resample_every == 0:
                gen.eval()
                self.n_energy_evaluations += self.draws.refill(buf, temperature, self.step)
            record["ess_buffer"] = buf.ess
        gen.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = p.new_zeros(())
        terms: dict[str, Tensor] = {}
        ml_terms: list[tuple[str, float, Tensor]] = []  # maximum-likelihood batches
        if w_iw > 0:
            buffered = self.draws.buffer_batch(self.buffer, bs, self.step).detach()
            ml_terms.append(("nll_iw", w_iw, buffered))
        if w_ml > 0:
            data, cdf = rows  # the data rows and their cumulative draw weights (or None)
            ml_terms.append(("nll", w_ml, self.draws.data_batch(data, bs, self.step, cdf)))
        if len(ml_terms) > 1 and not _has_compiled_flow(gen):
            # one flow pass for both: the maps act per sample, so the values are those of
            # separate passes, at the per-call cost of one (issue 14); a compiled flow keeps
            # the batch size it was compiled for (another size would compile again)
            sizes = [len(b) for _, _, b in ml_terms]
            both = torch.cat([b for _, _, b in ml_terms])
            values = nll(gen, both, "none").split(sizes)
        else:
            values = [nll(gen, b, "none") for _, _, b in ml_terms]
        for (key, w, _), v in zip(ml_terms, values, strict=True):
            term = v.mean()
            loss = loss + w * term
            terms[key] = term
        if w_kl > 0:
            vals = self.draws.kl_values(kl_bs, temperature, self.step)
            finite = torch.isfinite(vals)
            n_bad = (~finite).sum()
            n_capped = torch.zeros_like(n_bad)
            # a regularised energy (LinLogCut) maps non-finite energies to a finite cap:
            # count what the real energy gave, from the wrapper's per-call statistics
            last = getattr(gen.energy, "last_stats", None)
            if isinstance(last, dict):
                n_bad = torch.maximum(n_bad, torch.as_tensor(last.get("nonfinite", 0)).to(n_bad))
                n_capped = torch.as_tensor(last.get("capped", 0)).to(n_bad)
            if world > 1:  # global counts and ESS; the drop decision is global too
                counts = dist.all_reduce_sum(torch.stack([n_bad, n_capped]))
                n_bad, n_capped = counts[0], counts[1]
                every = dist.all_gather_cat(vals.detach(), self.draws.rank_sizes(kl_bs))
                n_fin = torch.isfinite(every).sum()
                dropped = torch.where(finite, vals, 0.0).sum() * (world / n_fin.clamp(min=1))
            else:
                every = vals
                n_fin = finite.sum()
                dropped = torch.where(finite, vals, 0.0).sum() / n_fin.clamp(min=1)
            l_kl = vals.mean()
            if self.drop_nonfinite:  # mean over the finite samples, unless none or all are
                l_kl = torch.where((n_fin > 0) & (n_fin < every.numel()), dropped, l_kl)
            self.n_energy_evaluations += int(every.numel())
            record["n_nonfinite"] = n_bad
            record["n_capped"] = n_capped
            record["ess"] = ess_tensor(-every)
            loss = loss + w_kl * l_kl
            terms["kl"] = l_kl
        if world > 1:  # global means of the loss and its terms (one collective)
            local = torch.stack([loss.detach(), *(t.detach() for t in terms.values())])
            glob = dist.all_reduce_sum(local.double()) / world
            record["loss"] = glob[0]
            record.update(zip(terms, glob[1:], strict=True))
        else:
            record.update({k: t.detach() for k, t in terms.items()})
            record["loss"] = loss.detach()
        # a non-finite loss gives non-finite gradients, so one flag decides (the same on
        # every rank: the loss and the gradients are global)
        loss.backward()
        dist.all_reduce_grads(gen.parameters())
        max_norm = self.clip_grad_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(gen.parameters(), max_norm)
        ok = torch.isfinite(record["loss"]) & torch.isfinite(grad_norm)
        record["grad_norm"] = grad_norm.detach()
        record["skipped"] = ~ok
        self._apply(ok)
        self.step += 1
        return record

    def _apply(self, ok: Tensor) -> None:
        """The optimizer step and the weight average, where the 0-d flag ``ok`` is true.

        Fused Adam skips on the device (its ``found_inf`` flag: parameters, moments and
        step count untouched); another optimizer (e.g. one set by hand) needs the flag
        read on the host. The schedule advances either way.
        """
        opt = self.optimizer
        if opt.defaults.get("fused"):
            opt.found_inf = (~ok).to(torch.float32)
            try:
                opt.step()
            finally:
                opt.found_inf = None
        elif bool(ok):
            opt.step()
        self.average.update(self.step, ok)
        if self.scheduler is not None:
            self.scheduler.step()

    def averaged_weights(self) -> AbstractContextManager[None]:
        """Context manager: inside the block the generator holds the averaged (EMA)
        weights, if any."""
        return self.average.averaged()

    def finalize(self, select: str = "best_ess") -> dict:
        """Put the weights to evaluate into the generator; returns what was chosen.

        ``select``: ``"best_ess"`` (the weights with the best periodic ESS estimate on
        fresh samples; the averaged ones with EMA), ``"ema"`` (the final average) or
        ``"last"`` (the last step's weights). Without an estimate or an average, falls
        back to the next choice in that order.
        """
        self._read_back()
        return self.average.select(select, self.step)

    @torch.no_grad()
    def _periodic(self, record: dict) -> bool:
        """ESS and validation estimates due at this step; returns whether any ran."""
        gen = self.generator
        checked = False
        if self.ess_every and self.step % self.ess_every == 0:
            checked = True
            gen.eval()
            with self.averaged_weights():
                x, log_w = self.draws.ess_log_weights(self.ess_samples, self.step)
                self.n_energy_evaluations += int(x.shape[0])
                ess = effective_sample_size(log_w)
                self.last_eval_samples = x  # for callbacks, e.g. the collapse guard
                self.last_eval_log_weights = log_w  # e.g. the state feedback
                self.average.offer(ess, self.step)
            record["ess_eval"] = ess
        if self.val_data is not None and self.eval_every and self.step % self.eval_every == 0:
            checked = True
            gen.eval()
            p = self._param
            val = self.val_data  # with several ranks, each sums the NLL of its share
            if self.world_size > 1:
                val = val.tensor_split(self.world_size)[self.rank]
            total = p.new_zeros((), dtype=torch.float64)
            for chunk in val.split(4096):
                total += nll(gen, chunk.to(p.device, p.dtype), reduction="sum").double()
            if self.world_size > 1:
                total = dist.all_reduce_sum(total)
            record["val_nll"] = float(total) / self.val_data.shape[0]
        return checked

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue training exactly: model, optimizer, RNGs, ..."""
        self._read_back()  # the history must be complete
        state = {
            "model": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "step": self.step,
            "n_skipped": self.n_skipped,
            "n_nonfinite_samples": self.n_nonfinite_samples,
            "n_capped_samples": self.n_capped_samples,
            "n_energy_evaluations": self.n_energy_evaluations,
            "history": self.history,
            "spec": full_spec(self.generator),
            "rng_torch": torch.get_rng_state(),
            "rng_batch": self.draws.batch_rng.get_state(),
            **self.average.state_dict(),  # "ema", "best"
            "buffer": self.buffer.state_dict(),
            "shards": self.shards,
        }
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save_checkpoint(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write a checkpoint atomically (temp file + rename) and return its path.

        ``extra`` is stored under ``"extra"`` (e.g. the system name and config). With
        several processes only rank 0 writes (every rank holds the same state; the
        random streams of the other ranks' shards are derived from the step, so nothing
        of theirs is missing); the other ranks return the path without writing.
        """
        path = Path(path)
        if self.rank != 0:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        state["extra"] = extra or {}
        return save_torch(state, path)

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        """Restore a checkpoint written by :meth:`save_checkpoint`; returns its ``extra``.

        Raises ``ValueError`` if the file is unreadable (truncated by a crash: the
        message names it and offers ``best.pt`` beside it), the stored model does not
        match this generator (e.g. a checkpoint from a different system or flow) or the
        run split its batches into a different number of shards (processes). Every rank
        reads the file itself.
        """
        path = Path(path)
        state = load_torch(path, alternative=_alternative(path))
        shards = int(state.get("shards", 1))
        if shards != self.shards:
            raise ValueError(
                f"checkpoint {path} was trained with its batches split into {shards} "
                f"shard(s) (processes), this trainer uses {self.shards}: resume it with "
                f"{shards} process(es) (torchrun --nproc_per_node={shards}, or plain python "
                f"for 1) so that its random streams continue"
            )
        try:
            self.generator.load_state_dict(state["model"])
        except RuntimeError as err:
            raise ValueError(
                f"checkpoint {path} does not match this model (different system or flow "
                f"settings?): {str(err).splitlines()[0]}"
            ) from err
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.n_skipped = int(state["n_skipped"])
        self.n_nonfinite_samples = int(state["n_nonfinite_samples"])
        self.n_capped_samples = int(state.get("n_capped_samples", 0))
        self.n_energy_evaluations = int(state.get("n_energy_evaluations", 0))
        self.history = list(state["history"])
        torch.set_rng_state(state["rng_torch"])
        self.draws.batch_rng.set_state(state["rng_batch"])
        self.average.load_state_dict(state)
        if state.get("buffer") is not None:
            self.buffer.load_state_dict(state["buffer"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        return state.get("extra", {})
