"""State feedback: ML draw weights that steer the flow's raw state shares to the reweighted ones.

Reverse KL is mode seeking: a state the flow fits poorly loses samples, and the ML term
keeps it filled only in proportion to its share of the ML draws. On the Trp dipeptide the
chi1 plus rotamer holds 34 % of the reweighted mass, 31 % of the ML draws and only 19-26 %
of the flow's samples, and the samples in it carry most of the weight variance (BENCHMARKS.md,
"A second seed of the cooling phase"). A fixed floor (:mod:`bgflow_mini.state_balance`)
cannot know that a state with a fair share of the data will still be under-filled.

:class:`StateFeedback` is a :class:`~bgflow_mini.training.Trainer` callback. At every
periodic ESS estimate of a step whose loss has reverse KL in it, it takes the fresh samples
and their log weights, and for each named state compares the raw share ``q`` (samples in
it) with the reweighted share ``p`` (self-normalised importance weights). Each state keeps a
log factor ``a >= 0`` on the ML draw weights of the data rows in it. With
``d = clip(log(p / q), -step_max, step_max)``, a state under-filled by more than
``tolerance`` (``d > tolerance``) gets ``a <- min(a + gain * d, log(max_factor))``; one
over-filled by more than ``tolerance`` gives back what it got, ``a <- max(a + gain * d, 0)``;
in between ``a`` holds (an integral controller with a dead band). A data row's draw weight
is multiplied by ``exp(sum of a over the states it lies in)``. Factors never fall below 1:
a rare state that the flow over-fills (e.g. one raised by a state floor, whose weights are
small while the flow fits it poorly) keeps its share of the draws, since under-filling a
state costs far more ESS than over-filling it. The flow's density stays a normalised
density and the importance weights stay exact, so the reweighted results are unbiased
whatever the factors; only the proposal changes. Updates are skipped while the estimate
has fewer than ``min_ess`` effective samples (the shares would be noise), and in phases at
another temperature than the target's. The factors are written to the step's record
(``fb_<state>``, and the number of updates so far in ``fb_updates``) and read back from a
restored history, so a resumed run continues with the same draw weights.

Measured on Trp (BENCHMARKS.md, "State feedback on the ML draws"): it cost ESS at both
settings tried (0.373 against 0.471, 0.359 against 0.387): the draws it gives an
under-filled state come out of the others, whose shapes get worse where the flow has no
capacity to spare. No recipe turns it on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from .replica_pool import kish_size
from .state_balance import _log_share, state_masks

__all__ = ["StateFeedback", "state_shares"]


def state_shares(
    masks: Mapping[str, np.ndarray], log_w: np.ndarray
) -> tuple[dict[str, float], dict[str, float], float]:
    """Raw and reweighted shares of each state, and the Kish effective sample size.

    Arguments:
        masks: ``{state: bool (n,)}`` membership of ``n`` samples.
        log_w: their log importance weights ``(n,)``; non-finite ones count as weight 0
            (and as samples in the raw share).

    Returns ``(raw, reweighted, n_eff)``: ``{state: fraction of the samples}``,
    ``{state: fraction of the weight}`` and ``(sum w)^2 / sum w^2`` (0 without a finite
    weight).
    """
    lw = np.asarray(log_w, dtype=np.float64).reshape(-1)
    ok = np.isfinite(lw)
    raw = {s: float(np.mean(m)) if len(m) else 0.0 for s, m in masks.items()}
    if not ok.any():
        return raw, {s: 0.0 for s in masks}, 0.0
    lw = np.where(ok, lw, -np.inf)
    rew = {s: float(np.exp(_log_share(lw, m & ok))) for s, m in masks.items()}
    return raw, rew, kish_size(lw)


class StateFeedback:
    """Trainer callback: per-state factors on the ML draw weights, fed back from the flow.

    Arguments:
        cvs, states: the target's CV specs and states (CV ranges, as a system's ``states``).
        data_masks: ``{state: bool (n,)}`` membership of the ``n`` ML data rows (the rows
            :meth:`~bgflow_mini.training.Trainer.fit` draws from; see
            :func:`~bgflow_mini.state_balance.state_masks`).
        gain: fraction of ``log(p / q)`` added to a state's log factor per update (> 0).
        max_factor: bound on every state's factor, ``[1, max_factor]`` (> 1).
        tolerance: dead band on ``|log(p / q)|`` within which a factor holds (>= 0).
        step_max: bound on ``|log(p / q)|`` used in one update (one noisy estimate moves a
            factor by at most ``exp(gain * step_max)``).
        min_ess: skip updates whose estimate has fewer effective samples than this.

    Attributes:
        log_factors: ``{state: a}``, the current log factors (0 at the start).
        updates: number of updates applied.
    """

    def __init__(
        self,
        cvs: Mapping,
        states: Mapping,
        data_masks: Mapping[str, np.ndarray],
        gain: float = 0.5,
        max_factor: float = 4.0,
        step_max: float = 0.5,
        min_ess: float = 100.0,
        tolerance: float = 0.1,
    ) -> None:
        if not states:
            raise ValueError("state feedback needs named states (system.yaml: states)")
        if not (gain > 0 and math.isfinite(gain)):
            raise ValueError(f"state feedback gain must be a positive number, got {gain}")
        if not (max_factor > 1 and math.isfinite(max_factor)):
            raise ValueError(f"state feedback max_factor must be a number > 1, got {max_factor}")
        if not step_max > 0 or not min_ess >= 0 or not tolerance >= 0:
            raise ValueError(
                f"need step_max > 0, min_ess >= 0 and tolerance >= 0, got {step_max}, "
                f"{min_ess}, {tolerance}"
            )
        missing = sorted(set(states) - set(data_masks))
        if missing:
            raise ValueError(f"data_masks lacks the states {missing}")
        self.cvs, self.states = cvs, dict(states)
        masks = {s: np.asarray(data_masks[s]) for s in self.states}
        sizes = {m.shape for m in masks.values()}
        if len(sizes) != 1 or any(m.dtype != bool or m.ndim != 1 for m in masks.values()):
            raise ValueError("data_masks must be 1-D bool arrays of one length (one per data row)")
        self.data_masks = masks
        self.gain, self.max_log = float(gain), math.log(float(max_factor))
        self.step_max, self.min_ess = float(step_max), float(min_ess)
        self.tolerance = float(tolerance)
        self.log_factors = {s: 0.0 for s in self.states}
        self.updates = 0

    @property
    def columns(self) -> list[str]:
        """The record keys this callback writes (for a metrics CSV)."""
        return [f"fb_{s}" for s in self.states] + ["fb_updates"]

    def row_log_factors(self) -> torch.Tensor:
        """``(n,)`` float64: the log factor of every data row (sum over its states)."""
        n = len(next(iter(self.data_masks.values())))
        out = np.zeros(n)
        for s, a in self.log_factors.items():
            if a:
                out[self.data_masks[s]] += a
        return torch.from_numpy(out)

    def update(self, masks: Mapping[str, np.ndarray], log_w: np.ndarray) -> bool:
        """One update from samples in ``masks`` with log weights ``log_w``; whether applied
        (not below ``min_ess`` effective samples)."""
        raw, rew, n_eff = state_shares(masks, log_w)
        if n_eff < self.min_ess:
            return False
        n = len(np.asarray(log_w).reshape(-1))
        floor = 0.5 / max(n, 1)  # an empty share counts as half a sample: log stays finite
        for s in self.states:
            if raw[s] == 0 and rew[s] == 0:
                continue  # neither the flow nor the weights see it: nothing to learn
            d = math.log(max(rew[s], floor) / max(raw[s], floor))
            if abs(d) <= self.tolerance:
                continue  # close enough: hold
            d = min(max(d, -self.step_max), self.step_max)
            a = self.log_factors[s] + self.gain * d
            self.log_factors[s] = min(max(a, 0.0), self.max_log)
        self.updates += 1
        return True

    def __call__(self, trainer, record: dict) -> None:
        if "ess_eval" not in record or "kl" not in record:
            return  # reverse KL is what empties states; before it, the ML shares hold
        if float(record.get("temperature", 1.0)) != 1.0:
            return  # a hot phase's flow is meant to differ from the target's shares
        x = getattr(trainer, "last_eval_samples", None)
        log_w = getattr(trainer, "last_eval_log_weights", None)
        if x is None or log_w is None:
            return
        masks = state_masks(x.detach().cpu().double().numpy(), self.cvs, self.states)
        if self.update(masks, log_w.detach().cpu().double().numpy()):
            trainer.set_draw_log_factors(self.row_log_factors())
        record.update({f"fb_{s}": math.exp(a) for s, a in self.log_factors.items()})
        record["fb_updates"] = self.updates

    def replay(self, trainer, history) -> None:
        """Take the factors of the last record of a restored ``history`` that has them and
        hand them to ``trainer`` (after resuming)."""
        for r in reversed(history):
            if all(f"fb_{s}" in r for s in self.states):
                self.log_factors = {s: math.log(float(r[f"fb_{s}"])) for s in self.states}
                self.updates = int(r.get("fb_updates", 0))
                trainer.set_draw_log_factors(self.row_log_factors())
                return

    def summary(self) -> dict:
        """``{"factors": {state: factor}, "updates": n}`` for a run's metrics."""
        return {
            "factors": {s: math.exp(a) for s, a in self.log_factors.items()},
            "updates": self.updates,
        }
