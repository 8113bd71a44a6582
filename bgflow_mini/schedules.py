"""Training schedules: :class:`Phase` (one stage of a run) and learning-rate schedules.

A run is a list of phases, each with its loss weights (maximum likelihood on data,
reverse KL, importance-weighted ML on the model's own reweighted samples), learning rate,
batch sizes and temperature; :meth:`bgflow_mini.training.Trainer.fit_phases` runs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Phase", "cosine_schedule"]


@dataclass
class Phase:
    """One stage of a training schedule.

    Arguments:
        steps: number of optimisation steps in this phase.
        w_ml: weight of the maximum-likelihood loss (needs data).
        w_kl: weight of the reverse-KL loss (needs an energy).
        lr: learning rate set when the phase starts (``None`` keeps the current one).
        batch_size: data batch size for ML (``None``: the trainer's default).
        kl_batch_size: number of generator samples for reverse KL (``None``: default).
        name: a label used in the history and progress bar.
        w_iw: weight of maximum likelihood on the model's own samples reweighted to
            ``exp(-u / temperature)`` (an :class:`~bgflow_mini.annealing.ImportanceBuffer`,
            refilled every ``resample_every`` steps); needs an energy, no data.
        temperature: relative temperature ``τ = T / T_target`` of the reverse-KL target
            and of the buffer's weights (1: the energy's own temperature).
        resample_every: steps between buffer refills (``None``: the trainer's default).
        replica_weights: the ML draw weighting of a replica pool in this phase,
            ``"mbar"`` (to the target temperature) or ``"equal"`` (the plain mixture);
            ``None``: the run's own (``data.replica_weights``). The weights come from
            :meth:`~bgflow_mini.training.Trainer.fit_phases`' ``data_weights`` mapping.
    """

    steps: int
    w_ml: float = 1.0
    w_kl: float = 0.0
    lr: float | None = None
    batch_size: int | None = None
    kl_batch_size: int | None = None
    name: str = ""
    w_iw: float = 0.0
    temperature: float = 1.0
    resample_every: int | None = None
    replica_weights: str | None = None


def cosine_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    final_factor: float = 0.01,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay of the learning rate to ``final_factor`` x base.

    The factor multiplies the current base learning rate (a :class:`Phase` ``lr``
    resets the base), evaluated at the global step.
    """
    total, warm = max(int(total_steps), 1), max(int(warmup_steps), 0)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min((step - warm) / max(total - warm, 1), 1.0)
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
